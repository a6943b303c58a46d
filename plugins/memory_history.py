"""The in-memory history store: recent messages per recorded topic, bounded, in this process.

`BoundedHistory` is the store itself, synchronous and clock-free (callers pass `now`), so it is
tested without an event loop. `MemoryHistory` is the `HistoryStore` the broker uses: it reads
trio's clock, runs the expiry sweep, and logs the rare events.

Positions. One store-wide counter numbers every append (offsets are not dense per topic). That
makes gaps decidable without per-topic bookkeeping that could grow without bound:
- each retained topic keeps a `floor`: the highest offset of its messages that may have been
  lost. A read from `since` has a gap exactly when `since.offset < floor`;
- a dropped topic (evicted, expired or forgotten) leaves a tombstone holding its last offset,
  so a resume from its last message is complete and one from earlier reports `Gap.TRIMMED`;
- tombstones are bounded by `max_topics`; the oldest is folded into one store-wide floor that
  then stands in for every topic the store no longer knows. A topic the store does not know is
  answered with that floor, erring towards `Gap.TRIMMED`: a missed gap loses messages silently,
  a spurious one only costs the client a refetch.

Size. A message weighs the UTF-8 length of its topic plus the length of its payload packed with
msgpack (packed once, on append); Python's object overhead is not counted, so `max_bytes`
bounds the data, not the process size. Tombstones (at most `max_topics` topic names) are not
counted either.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from itertools import islice
from typing import ClassVar

import structlog
import trio
from attrs import define, field, frozen

from mqbroker.config import HistoryConfig
from mqbroker.history import Gap, Replay
from mqbroker.message import Draft, Message, Payload, Position
from mqbroker.protocol.codec import payload_size as encoded_size
from mqbroker.topics import TopicTree, is_wildcard

#: The weight of a payload msgpack cannot pack (the broker only carries packable ones).
UNPACKABLE_PAYLOAD_SIZE = 64
#: How many topics the expiry sweep trims between two checkpoints.
SWEEP_CHUNK = 1000

_log = structlog.get_logger("mqbroker.history")


def new_epoch() -> str:
    """A fresh epoch: alphanumeric, as `Position.parse` requires."""
    return secrets.token_hex(4)


def payload_size(payload: Payload) -> int:
    """The msgpack-packed length of a payload (see the module docstring)."""
    try:
        return encoded_size(payload)
    except (TypeError, ValueError, OverflowError):
        return UNPACKABLE_PAYLOAD_SIZE


def topic_size(topic: str) -> int:
    return len(topic.encode("utf-8", "surrogatepass"))


def message_size(draft: Draft) -> int:
    """What a message weighs against `max_bytes`: its topic plus its payload."""
    return topic_size(draft.topic) + payload_size(draft.payload)


def expiry_interval(max_age: float) -> float:
    """How often the sweep runs: a tenth of `max_age`, between 10 ms and 10 s."""
    return min(max(max_age / 10, 0.01), 10.0)


def _offset(message: Message) -> int:
    return message.position.offset


@define
class RetainedTopic:
    """One topic's retained messages, oldest first, with their append times and sizes.

    Three parallel deques rather than one of records: numbers in a deque are not objects the
    garbage collector has to scan, and a store holds millions of them.
    """

    #: Messages of this topic at or below this offset may have been lost.
    floor: int
    #: The UTF-8 length of the topic, part of every message's size.
    topic_size: int
    messages: deque[Message] = field(factory=deque)
    #: On the caller's monotonic clock: the wall-clock `published_at` may jump.
    appended_at: deque[float] = field(factory=deque)
    sizes: deque[int] = field(factory=deque)
    bytes: int = 0

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def last_offset(self) -> int:
        return self.messages[-1].position.offset if self.messages else self.floor

    def add(self, message: Message, now: float) -> int:
        """Retain `message` as the newest; returns its size."""
        size = self.topic_size + payload_size(message.payload)
        self.messages.append(message)
        self.appended_at.append(now)
        self.sizes.append(size)
        self.bytes += size
        return size

    def pop_oldest(self) -> int:
        """Drop the oldest message, raising the floor to it; returns its size."""
        self.floor = self.messages.popleft().position.offset
        self.appended_at.popleft()
        size = self.sizes.popleft()
        self.bytes -= size
        return size

    def after(self, offset: int) -> tuple[Message, ...]:
        """The retained messages positioned after `offset`, oldest first."""
        start = bisect_right(self.messages, offset, key=_offset)
        return tuple(islice(self.messages, start, None))


@frozen
class DropReason:
    """The two counters a dropped topic and its messages are added to."""

    topics: str
    messages: str


EVICTED = DropReason("evicted_topics", "evicted_messages")
EXPIRED = DropReason("expired_topics", "expired_messages")
FORGOTTEN = DropReason("forgotten_topics", "forgotten_messages")
COUNTERS = (
    "appended",
    *(EVICTED.topics, EVICTED.messages),
    *(EXPIRED.topics, EXPIRED.messages),
    *(FORGOTTEN.topics, FORGOTTEN.messages),
)


@define
class BoundedHistory:
    """The store's state and rules, synchronous; every method that needs the time takes `now`.

    `bounds_reached` names each store-wide bound (`max_topics`, `max_bytes`) that has evicted
    a topic at least once.
    """

    #: Its bounds are all positive: `HistoryConfig` validates them.
    config: HistoryConfig
    epoch: str = field(factory=new_epoch)
    bounds_reached: set[str] = field(factory=set, init=False)
    # Least recently appended first: the eviction order, and the idle-expiry order.
    _topics: OrderedDict[str, RetainedTopic] = field(factory=OrderedDict, init=False)
    # The same topics by level: a wildcard forget (every session end forgets `{prefix}/{id}/#`)
    # visits the topics under the filter's literal levels, not all of them.
    _tree: TopicTree = field(factory=TopicTree, init=False)
    # Topic -> its last offset, oldest tombstone first.
    _tombstones: OrderedDict[str, int] = field(factory=OrderedDict, init=False)
    # The floor of every topic that has neither a retained history nor a tombstone.
    _lost_floor: int = field(default=0, init=False)
    _last_offset: int = field(default=0, init=False)
    _messages: int = field(default=0, init=False)
    _bytes: int = field(default=0, init=False)
    _counts: dict[str, int] = field(factory=lambda: dict.fromkeys(COUNTERS, 0), init=False)

    def append(self, drafts: Sequence[Draft], now: float) -> list[Message]:
        """Position and retain each draft in order; see `HistoryStore.append`."""
        self._counts["appended"] += len(drafts)
        return [self._append_one(draft, now) for draft in drafts]

    def read(self, topic: str, since: Position, now: float) -> Replay:
        """What is retained of `topic` after `since`; see `HistoryStore.read`."""
        retained = self._expire_messages(topic, now)
        if since.epoch != self.epoch:
            messages = tuple(retained.messages) if retained else ()
            return Replay(messages=messages, gap=Gap.UNKNOWN_EPOCH)
        if retained is None:
            floor = self._tombstones.get(topic, self._lost_floor)
            return Replay(messages=(), gap=Gap.TRIMMED if since.offset < floor else None)
        gap = Gap.TRIMMED if since.offset < retained.floor else None
        return Replay(messages=retained.after(since.offset), gap=gap)

    def latest(self, topic: str, now: float) -> Position | None:
        """The position of `topic`'s newest retained message; see `HistoryStore.latest`."""
        retained = self._expire_messages(topic, now)
        return retained.messages[-1].position if retained else None

    def forget(self, filter: str) -> int:
        """Drop every retained topic `filter` matches; returns how many."""
        if is_wildcard(filter):
            topics = self._tree.matching(filter)
        else:
            topics = [filter] if filter in self._topics else []
        for topic in topics:
            self._drop(topic, FORGOTTEN)
        return len(topics)

    def expire_idle(self, now: float) -> int:
        """Drop every topic whose newest message is older than `max_age`; returns how many."""
        expired = 0
        # Least recently appended first, so the idle topics are a prefix of the order.
        for retained in self._topics.values():
            if not self._too_old(retained.appended_at[-1], now):
                break
            expired += 1
        for topic in list(islice(self._topics, expired)):
            self._drop(topic, EXPIRED)
        return expired

    def trim_expired(self, topics: Iterable[str], now: float) -> None:
        """Drop the messages of `topics` older than `max_age` (the sweep calls this in chunks)."""
        for topic in topics:
            self._expire_messages(topic, now)

    def count(self, counter: str) -> int:
        """One of the `COUNTERS`."""
        return self._counts[counter]

    def topic_names(self) -> list[str]:
        """The retained topics, least recently appended first (a snapshot)."""
        return list(self._topics)

    def stats(self) -> dict[str, int]:
        return {
            "topics": len(self._topics),
            "messages": self._messages,
            "bytes": self._bytes,
            "tombstones": len(self._tombstones),
            **self._counts,
        }

    def _append_one(self, draft: Draft, now: float) -> Message:
        self._last_offset += 1
        message = Message.from_draft(draft, Position(self.epoch, self._last_offset))
        retained = self._retain(draft.topic)
        self._bytes += retained.add(message, now)
        self._messages += 1
        while len(retained) > self.config.max_messages:
            self._pop_oldest(retained, EVICTED)
        self._enforce_store_bounds(draft.topic, retained)
        return message

    def _retain(self, topic: str) -> RetainedTopic:
        retained = self._topics.get(topic)
        if retained is None:
            # A topic coming back continues from its tombstone: its old positions keep their gap.
            floor = self._tombstones.pop(topic, self._lost_floor)
            retained = self._topics[topic] = RetainedTopic(
                floor=floor, topic_size=topic_size(topic)
            )
            self._tree.add(topic)
        else:
            self._topics.move_to_end(topic)
        return retained

    def _enforce_store_bounds(self, topic: str, retained: RetainedTopic) -> None:
        # `topic` was just appended to, so it is last in the order and evicted last.
        while len(self._topics) > self.config.max_topics:
            self._evict_least_recent("max_topics")
        while self._bytes > self.config.max_bytes and len(self._topics) > 1:
            self._evict_least_recent("max_bytes")
        # Alone and still too heavy: the topic gives up its own oldest messages.
        while self._bytes > self.config.max_bytes and retained:
            self.bounds_reached.add("max_bytes")
            self._pop_oldest(retained, EVICTED)
        if not retained:
            self._drop(topic, EVICTED)

    def _evict_least_recent(self, bound: str) -> None:
        self.bounds_reached.add(bound)
        self._drop(next(iter(self._topics)), EVICTED)

    def _expire_messages(self, topic: str, now: float) -> RetainedTopic | None:
        retained = self._topics.get(topic)
        if retained is None:
            return None
        while retained and self._too_old(retained.appended_at[0], now):
            self._pop_oldest(retained, EXPIRED)
        if retained:
            return retained
        self._drop(topic, EXPIRED)
        return None

    def _too_old(self, appended_at: float, now: float) -> bool:
        return now - appended_at > self.config.max_age

    def _pop_oldest(self, retained: RetainedTopic, reason: DropReason) -> None:
        self._bytes -= retained.pop_oldest()
        self._messages -= 1
        self._counts[reason.messages] += 1

    def _drop(self, topic: str, reason: DropReason) -> None:
        retained = self._topics.pop(topic)
        self._tree.discard(topic)
        self._bytes -= retained.bytes
        self._messages -= len(retained)
        self._counts[reason.messages] += len(retained)
        self._counts[reason.topics] += 1
        self._bury(topic, retained.last_offset)

    def _bury(self, topic: str, last_offset: int) -> None:
        self._tombstones[topic] = last_offset
        while len(self._tombstones) > self.config.max_topics:
            _topic, floor = self._tombstones.popitem(last=False)
            self._lost_floor = max(self._lost_floor, floor)


@define
class MemoryHistory:
    """The `HistoryStore` kept in this process: `BoundedHistory` on trio's clock.

    Every method is a checkpoint and does its work after it, all at once: a cancelled call
    changed nothing, and a returned one is complete.
    """

    store: BoundedHistory
    _logged_bounds: set[str] = field(factory=set, init=False)

    @property
    def epoch(self) -> str:
        return self.store.epoch

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        await trio.lowlevel.checkpoint()
        evicted = self.store.count(EVICTED.topics)
        messages = self.store.append(drafts, trio.current_time())
        self._log_evictions(evicted)
        return messages

    async def read(self, topic: str, since: Position) -> Replay:
        await trio.lowlevel.checkpoint()
        return self.store.read(topic, since, trio.current_time())

    async def forget(self, filter: str) -> int:
        await trio.lowlevel.checkpoint()
        return self.store.forget(filter)

    async def latest(self, topic: str) -> Position | None:
        await trio.lowlevel.checkpoint()
        return self.store.latest(topic, trio.current_time())

    #: The stats that are levels (gauges), not totals.
    STAT_GAUGES: ClassVar[frozenset[str]] = frozenset({"topics", "messages", "bytes", "tombstones"})

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    async def expire(self) -> None:
        """Drop idle topics, then trim old messages off the others, a chunk per checkpoint."""
        now = trio.current_time()
        expired = self.store.expire_idle(now)
        if expired:
            _log.debug("history.topics_expired", count=expired)
        topics = self.store.topic_names()
        for start in range(0, len(topics), SWEEP_CHUNK):
            self.store.trim_expired(topics[start : start + SWEEP_CHUNK], now)
            await trio.lowlevel.checkpoint()

    async def run_expiry(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sweep every `expiry_interval(max_age)` seconds, forever."""
        interval = expiry_interval(self.store.config.max_age)
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self.expire()

    def _log_evictions(self, evicted_before: int) -> None:
        evicted = self.store.count(EVICTED.topics) - evicted_before
        if evicted:
            _log.debug("history.topics_evicted", count=evicted)
        for bound in self.store.bounds_reached - self._logged_bounds:
            self._logged_bounds.add(bound)
            _log.info("history.bound_reached", bound=bound, limit=getattr(self.store.config, bound))


@asynccontextmanager
async def open_memory_history(
    settings: None, config: HistoryConfig
) -> AsyncIterator[MemoryHistory]:
    """A fresh store (a new epoch) with its expiry sweep running; the sweep stops on exit."""
    history = MemoryHistory(BoundedHistory(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run_expiry)
        try:
            yield history
        finally:
            nursery.cancel_scope.cancel()
