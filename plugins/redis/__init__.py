"""The Redis plugin: a fan-out over Redis pub/sub and a history in Redis Streams.

Several broker instances on one Redis deliver every message to every instance that watches
it, in one order that the history's positions agree with. docs/redis.md describes the key
and channel layout, the scripts, and what happens when Redis goes away.
"""

from mqbroker.plugins import Plugin

from .fanout import RedisFanout, open_redis_fanout
from .history import RedisHistory, open_redis_history
from .settings import RedisSettings

plugin = Plugin(
    name="redis",
    settings_type=RedisSettings,
    open_history=open_redis_history,
    open_fanout=open_redis_fanout,
)

__all__ = [
    "RedisFanout",
    "RedisHistory",
    "RedisSettings",
    "open_redis_fanout",
    "open_redis_history",
    "plugin",
]
