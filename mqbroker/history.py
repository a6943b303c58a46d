"""The history store extension point: recent messages per recorded topic, for replay.

Pure: the contract only. Backends live in plugins (memory in `mqbroker_plugins.memory`,
Redis Streams in `mqbroker_plugins.redis`); one contract suite (tests/contract) runs against each.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Protocol

from attrs import frozen

from mqbroker.message import Draft, Message, Position


class Gap(enum.Enum):
    """Why a replay is incomplete (the suback says `recovered: false` with this reason)."""

    #: Messages after the given position were evicted (max_messages, max_age or store bounds).
    TRIMMED = "trimmed"
    #: The position's epoch is not the store's: a restarted broker or a flushed Redis.
    UNKNOWN_EPOCH = "unknown_epoch"
    #: The topic is not recorded (no `[history] record` filter matches it).
    NOT_RECORDED = "not_recorded"
    #: The store could not be reached.
    UNAVAILABLE = "unavailable"


@frozen(kw_only=True)
class Replay:
    """The answer to `read`: what a resuming subscriber missed, in position order."""

    messages: Sequence[Message]
    #: None when the replay is complete: every message after `since` is in `messages`.
    gap: Gap | None = None

    @property
    def recovered(self) -> bool:
        return self.gap is None


class HistoryStore(Protocol):
    """Keeps the recent messages of recorded topics, bounded, and replays them.

    Contract (tests/contract/test_history_contract.py checks it for every backend):
    - `append` gives each draft a position, records it and returns the messages in draft order.
      Positions strictly increase per topic and carry the current epoch of the topic's store
      (one epoch for a whole store, or one per server when topics are sharded over several).
      Appending is atomic per draft: a message is either readable with its position or was
      never returned.
    - `read(topic, since)` returns, in position order, every retained message of `topic` after
      `since`. If a message after `since` was evicted, or `since.epoch` is not the topic's current
      epoch, it still returns what is retained after `since` (everything of the current epoch,
      for an unknown epoch) and sets `gap`. It never returns a message at or before `since`.
    - Bounds: per topic `max_messages` and `max_age`; per store `max_topics` and `max_bytes`,
      evicting the least recently appended topics first. Evictions are counted in `stats`.
    - `forget(filter)` drops every recorded topic the filter matches and returns how many.
      A later read of such a topic from an old position reports `Gap.TRIMMED`.
    - `latest(topic)` is the position of the topic's newest retained message (within the
      bounds, as `read` would return it), or None when none is retained (never recorded,
      evicted, expired or forgotten). A read from it returns no message and no gap.
    - Methods may raise `HistoryUnavailable`; they never raise backend-specific errors.
    - `stats()`: running totals, except the levels a class names in an optional
      `STAT_GAUGES: ClassVar[frozenset[str]]` (see `Fanout`).
    """

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]: ...

    async def read(self, topic: str, since: Position) -> Replay: ...

    async def forget(self, filter: str) -> int: ...

    async def latest(self, topic: str) -> Position | None: ...

    def stats(self) -> Mapping[str, int]: ...


class HistoryUnavailable(Exception):
    """The history store's backend cannot be reached."""
