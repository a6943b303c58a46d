"""The `[plugins.redis]` settings: where Redis is, how long to wait for it, how to probe it.

Every field has a default; the config loader validates the table into `RedisSettings` with
cattrs, and the attrs validators here state what each key expects. Their errors name the key
themselves: the loader reports a plugin validator's message under `plugins.redis` only.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

import attrs
from attrs import field, frozen

from mqbroker.config import SettingMismatch

SCHEMES = ("redis", "rediss", "unix")


@frozen
class _Url:
    """An attrs validator: a Redis URL with a scheme redis-py understands."""

    expected: str = "a redis://, rediss:// or unix:// URL"

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        scheme = urlsplit(value).scheme
        if scheme not in SCHEMES:
            raise SettingMismatch(self.expected, value, (attribute.name,))


@frozen
class _Seconds:
    """An attrs validator: a finite number of seconds, at least `minimum` (or above it)."""

    expected: str
    minimum: float = 0.0
    exclusive: bool = True

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        low_ok = value > self.minimum if self.exclusive else value >= self.minimum
        if not (math.isfinite(value) and low_ok):
            raise SettingMismatch(self.expected, value, (attribute.name,))


@frozen
class _AtLeast:
    """An attrs validator: an integer no smaller than `minimum`."""

    expected: str
    minimum: int

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < self.minimum:
            raise SettingMismatch(self.expected, value, (attribute.name,))


@frozen
class _Prefix:
    """An attrs validator: a key prefix that is not empty (it keeps our keys apart)."""

    expected: str = "a non-empty key prefix such as 'mqb:'"

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if not value:
            raise SettingMismatch(self.expected, value, (attribute.name,))


@frozen
class _Distinct:
    """An attrs validator: shard URLs that are all different, and different from `url`."""

    expected: str = "URLs of further Redis servers, each listed once and none equal to url"

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
        servers = (instance.url, *value)
        if len(set(servers)) != len(servers):
            raise SettingMismatch(self.expected, value, (attribute.name,))


_POSITIVE_SECONDS = _Seconds("a finite number of seconds greater than 0")
_SECONDS = _Seconds("a finite number of seconds, 0 or more", exclusive=False)


@frozen(kw_only=True)
class RedisSettings:
    """How the Redis plugin reaches Redis. See docs/redis.md for each key's effect."""

    url: str = field(default="redis://127.0.0.1:6379/0", validator=_Url())
    #: Every key and channel name starts with this, so several brokers can share one Redis.
    key_prefix: str = field(default="mqb:", validator=_Prefix())
    connect_timeout: float = field(default=2.0, validator=_POSITIVE_SECONDS)
    socket_timeout: float = field(default=5.0, validator=_POSITIVE_SECONDS)
    #: Connections (and worker threads) for commands; pub/sub has a connection of its own.
    pool_size: int = field(default=8, validator=_AtLeast("an integer, 1 or more", 1))
    #: How long a publish waits for an unreachable Redis to come back; 0 fails at once.
    publish_timeout: float = field(default=0.0, validator=_SECONDS)
    #: How often a probe message round-trips through pub/sub to prove delivery works.
    probe_interval: float = field(default=5.0, validator=_POSITIVE_SECONDS)
    #: The longest wait between two reconnection attempts (the backoff doubles up to it).
    reconnect_max_delay: float = field(default=5.0, validator=_POSITIVE_SECONDS)
    #: How long a topic's offset counter outlives its last message, so that a subscriber
    #: resuming from the newest position is told it missed nothing. Never below max_age.
    offset_ttl: float = field(default=86_400.0, validator=_POSITIVE_SECONDS)

    #: URLs of further Redis servers: with any, topics are sharded over (url, *shards) by a
    #: hash of the topic. Every instance of one broker lists the same servers in one order.
    #: A list, not a tuple, so that the defaults sketched in config.toml (`shards = []`, a TOML
    #: array) compare equal to `attrs.asdict(RedisSettings())`; it takes no part in hashing.
    shards: list[str] = field(
        factory=list,
        hash=False,
        validator=attrs.validators.and_(
            attrs.validators.deep_iterable(_Url(), attrs.validators.instance_of(list)),
            _Distinct(),
        ),
    )

    @property
    def servers(self) -> tuple[str, ...]:
        """Every Redis server that holds topics: `url` first, then `shards`, in order."""
        return (self.url, *self.shards)

    def same_redis(self, other: RedisSettings) -> bool:
        """Whether both settings name the same keys on the same server."""
        return (self.url, self.key_prefix) == (other.url, other.key_prefix)
