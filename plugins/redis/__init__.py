"""The Redis plugin: a fan-out over Redis pub/sub, a history in Redis Streams, and the session
registry's stores (`registry`).

Several broker instances on one Redis deliver every message to every instance that watches
it, in one order that the history's positions agree with; with `shards` set, topics spread
over several Redis servers (`sharding`). docs/redis.md describes the key and channel layout,
the scripts, sharding, and what happens when Redis goes away.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext
from mqbroker.plugins import Plugin

from .fanout import RedisFanout, open_redis_fanout
from .history import RedisHistory, open_redis_history
from .registry import RedisPresence, RedisSessions, open_redis_presence, open_redis_sessions
from .settings import RedisSettings
from .sharding import (
    ShardedFanout,
    ShardedHistory,
    open_sharded_fanout,
    open_sharded_history,
    shard_of,
)


@asynccontextmanager
async def open_history(
    settings: RedisSettings | None, config: HistoryConfig
) -> AsyncIterator[RedisHistory | ShardedHistory]:
    """The plugin's history: sharded when `settings.shards` names further servers."""
    settings = settings if settings is not None else RedisSettings()
    opening = open_sharded_history if settings.shards else open_redis_history
    async with opening(settings, config) as history:
        yield history


@asynccontextmanager
async def open_fanout(
    settings: RedisSettings | None, context: FanoutContext
) -> AsyncIterator[RedisFanout | ShardedFanout]:
    """The plugin's fan-out: sharded when `settings.shards` names further servers."""
    settings = settings if settings is not None else RedisSettings()
    opening = open_sharded_fanout if settings.shards else open_redis_fanout
    async with opening(settings, context) as fanout:
        yield fanout


plugin = Plugin(
    name="redis",
    settings_type=RedisSettings,
    open_history=open_history,
    open_fanout=open_fanout,
    open_sessions=open_redis_sessions,
    open_presence=open_redis_presence,
)

__all__ = [
    "RedisFanout",
    "RedisHistory",
    "RedisPresence",
    "RedisSessions",
    "RedisSettings",
    "ShardedFanout",
    "ShardedHistory",
    "open_fanout",
    "open_history",
    "open_redis_fanout",
    "open_redis_history",
    "open_redis_presence",
    "open_redis_sessions",
    "open_sharded_fanout",
    "open_sharded_history",
    "plugin",
    "shard_of",
]
