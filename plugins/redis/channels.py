"""Key and channel names in Redis, filters as (p)subscriptions, and exactly-once pub/sub copies.

Pure: no redis, no trio. `KeyLayout` names every key and channel (docs/redis.md lists them);
`subscription_for` turns a filter into the Redis subscription that carries it; `CopyFilter`
keeps, of the copies Redis sends of one publish, exactly one. The receiver's events
(`Arrived`, `Confirmed`, ...) are plain values handed from the pub/sub thread to trio.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import NamedTuple

from attrs import define, field, frozen

from mqbroker.message import Message
from mqbroker.topics import MULTI_LEVEL, SEPARATOR, SINGLE_LEVEL, is_wildcard

#: Bytes that mean something in a Redis glob; a literal level escapes them with a backslash.
GLOB_SPECIALS = frozenset("*?[]\\")
#: How many channel -> chosen pattern answers `CopyFilter` remembers before starting over.
CHOICE_CACHE_SIZE = 10_000


def escape_glob(text: str) -> str:
    """`text` as a Redis glob that matches exactly it."""
    return "".join("\\" + c if c in GLOB_SPECIALS else c for c in text)


def filter_glob(filter: str) -> str:
    """A Redis glob matching at least every topic that `filter` matches (the broker's index
    does the exact matching downstream).

    `+` becomes `*`; a trailing `#` becomes `*` appended to its parent, so that "a/#" also
    catches "a" itself (MQTT-4.7.1-2). A glob `*` crosses `/`, hence "at least".
    """
    levels = filter.split(SEPARATOR)
    if levels[-1] == MULTI_LEVEL:
        return SEPARATOR.join(_level_glob(level) for level in levels[:-1]) + "*"
    return SEPARATOR.join(_level_glob(level) for level in levels)


def _level_glob(level: str) -> str:
    return "*" if level == SINGLE_LEVEL else escape_glob(level)


def glob_regex(glob: bytes) -> re.Pattern[bytes]:
    """A regex that matches what a glob made by this module matches (only `*` and escapes)."""
    parts: list[bytes] = []
    escaped = False
    for byte in glob:
        char = bytes([byte])
        if escaped:
            parts.append(re.escape(char))
            escaped = False
        elif char == b"\\":
            escaped = True
        else:
            parts.append(b".*" if char == b"*" else re.escape(char))
    return re.compile(b"".join(parts), re.DOTALL)


class Kind(enum.Enum):
    CHANNEL = "channel"
    PATTERN = "pattern"


@frozen
class Subscription:
    """One Redis subscription: SUBSCRIBE of a channel or PSUBSCRIBE of a pattern."""

    kind: Kind
    name: bytes


@frozen
class KeyLayout:
    """Every key and channel the plugin uses, under one prefix (see docs/redis.md)."""

    prefix: str

    @property
    def epoch_key(self) -> bytes:
        return f"{self.prefix}epoch".encode()

    def counter_key(self, topic: str) -> bytes:
        return f"{self.prefix}o:{topic}".encode()

    def stream_key(self, topic: str) -> bytes:
        return f"{self.prefix}s:{topic}".encode()

    def channel(self, topic: str) -> bytes:
        return f"{self.prefix}t:{topic}".encode()

    def instance_channel(self, instance_id: str) -> bytes:
        return f"{self.prefix}i:{instance_id}".encode()

    def stream_topic(self, key: bytes) -> str:
        """The topic a stream key belongs to."""
        return key.decode()[len(self.prefix) + 2 :]

    def stream_scan_glob(self, filter: str) -> bytes:
        """A SCAN MATCH glob for the stream keys of (at least) every topic `filter` matches."""
        return (escape_glob(self.prefix) + "s:" + filter_glob(filter)).encode()

    def subscription_for(self, filter: str) -> Subscription:
        """The subscription that carries `filter`: its channel, or a pattern for a wildcard."""
        if not is_wildcard(filter):
            return Subscription(Kind.CHANNEL, self.channel(filter))
        glob = escape_glob(self.prefix) + "t:" + filter_glob(filter)
        return Subscription(Kind.PATTERN, glob.encode())


# --- What the pub/sub thread hands to trio, in the order Redis sent it ------------------------


@frozen
class Connected:
    """A new pub/sub connection is up; its subscriptions follow as `Confirmed`."""


@frozen
class Disconnected:
    """The pub/sub connection is gone (or could not be made)."""

    reason: str


@frozen
class Confirmed:
    """Redis confirmed a (p)subscribe (`active`) or a (p)unsubscribe."""

    subscription: Subscription
    active: bool


class Arrived(NamedTuple):
    """One copy of a published message: `pattern` is None for a channel subscription's copy.

    A NamedTuple, not attrs: one is made per received copy, on the hot path.
    """

    channel: bytes
    pattern: bytes | None
    data: bytes


@frozen
class Refilled:
    """Recorded messages read back from the streams after a reconnection, oldest first."""

    messages: Sequence[Message]
    #: Topics whose read-back could not be complete (trimmed meanwhile, or a new epoch: Redis
    #: lost its data), so their subscribers may have missed something.
    incomplete: Sequence[str] = ()


Received = Connected | Disconnected | Confirmed | Arrived | Refilled


@define
class CopyFilter:
    """Keeps one copy per publish of what one pub/sub connection receives.

    Redis sends a publish once for a SUBSCRIBEd channel and once more per matching
    PSUBSCRIBEd pattern. The rule: a channel copy is always kept; a pattern copy only if the
    channel is not SUBSCRIBEd too and the pattern is the smallest (bytewise) of the matching
    patterns. The state is what Redis confirmed, updated in the order the connection
    delivered it, so every publish is judged against the subscriptions Redis applied to it.
    """

    _channels: set[bytes] = field(factory=set)
    _patterns: dict[bytes, re.Pattern[bytes]] = field(factory=dict)
    _chosen: dict[bytes, bytes | None] = field(factory=dict)

    def reset(self) -> None:
        """A new connection: nothing is subscribed until Redis confirms it."""
        self._channels.clear()
        self._patterns.clear()
        self._chosen.clear()

    def confirm(self, confirmed: Confirmed) -> None:
        name = confirmed.subscription.name
        if confirmed.subscription.kind is Kind.CHANNEL:
            (self._channels.add if confirmed.active else self._channels.discard)(name)
            return
        if confirmed.active:
            self._patterns.setdefault(name, glob_regex(name))
        else:
            self._patterns.pop(name, None)
        self._chosen.clear()

    def is_live(self, subscription: Subscription) -> bool:
        """Whether Redis confirmed this subscription on the current connection."""
        if subscription.kind is Kind.CHANNEL:
            return subscription.name in self._channels
        return subscription.name in self._patterns

    def keep(self, channel: bytes, pattern: bytes | None) -> bool:
        """Whether this copy is the one to deliver."""
        if pattern is None:
            return True
        if channel in self._channels:
            return False
        chosen = self._chosen.get(channel, b"")
        if chosen == b"":
            chosen = self._choose(channel)
        # None: no known pattern matches by our reading of the glob. Keep the copy rather
        # than lose it; Redis delivered it, so some pattern did match.
        return chosen is None or chosen == pattern

    def _choose(self, channel: bytes) -> bytes | None:
        matching = [name for name, regex in self._patterns.items() if regex.fullmatch(channel)]
        chosen = min(matching) if matching else None
        if len(self._chosen) >= CHOICE_CACHE_SIZE:
            self._chosen.clear()
        self._chosen[channel] = chosen
        return chosen
