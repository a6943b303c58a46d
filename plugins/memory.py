"""The `memory` plugin: an in-process history store and fan-out, for a single broker instance."""

from mqbroker.plugins import Plugin

from .memory_fanout import MemoryFanout, open_memory_fanout
from .memory_history import BoundedHistory, MemoryHistory, open_memory_history

__all__ = [
    "BoundedHistory",
    "MemoryFanout",
    "MemoryHistory",
    "open_memory_fanout",
    "open_memory_history",
    "plugin",
]

plugin = Plugin(
    name="memory",
    settings_type=None,
    open_history=open_memory_history,
    open_fanout=open_memory_fanout,
)
