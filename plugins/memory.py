"""The `memory` plugin: an in-process history store, fan-out and session registry, for a single
broker instance."""

from mqbroker.plugins import Plugin

from .memory_fanout import MemoryFanout, open_memory_fanout
from .memory_history import BoundedHistory, MemoryHistory, open_memory_history
from .memory_sessions import (
    MemoryPresence,
    MemorySessions,
    open_memory_presence,
    open_memory_sessions,
)

__all__ = [
    "BoundedHistory",
    "MemoryFanout",
    "MemoryHistory",
    "MemoryPresence",
    "MemorySessions",
    "open_memory_fanout",
    "open_memory_history",
    "open_memory_presence",
    "open_memory_sessions",
    "plugin",
]

plugin = Plugin(
    name="memory",
    settings_type=None,
    open_history=open_memory_history,
    open_fanout=open_memory_fanout,
    open_sessions=open_memory_sessions,
    open_presence=open_memory_presence,
)
