"""The in-process fan-out: one broker instance, so publishing is positioning and delivering here.

Recorded drafts are positioned by the history store (one `append` per publish); the others by
this fan-out's own counter under its own epoch. Publishes run one at a time, in arrival order,
so delivery order agrees with history order even when the store awaits real I/O, and the dedup
check cannot race with the publish it guards. A task of the fan-out's own expires the dedup
window every DEDUP_EXPIRE_PERIOD seconds, so its memory is freed when no publish comes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

import trio
from attrs import define, field

from mqbroker.dedup import DedupKey, DedupWindow, Original
from mqbroker.fanout import FanoutContext, FanoutUnavailable, Health
from mqbroker.history import HistoryUnavailable
from mqbroker.message import Draft, Message, Position

from .memory_history import new_epoch

#: Seconds between two expiries of the dedup window: an entry's memory is freed at most this
#: long after its window ends.
DEDUP_EXPIRE_PERIOD = 1.0

#: Per draft of a publish: the first publish it is a duplicate of, the index of an earlier draft
#: of the same publish it repeats, or None for a fresh draft.
_Plan = Original | int | None


@define
class MemoryFanout:
    """The `Fanout` of a single instance: everything published here is delivered here.

    `watch` and `unwatch` only keep count (there is nothing to subscribe to); `health` is
    always ok. A `HistoryUnavailable` from the store is raised as `FanoutUnavailable`, having
    delivered nothing.
    """

    local: ClassVar[bool] = True

    context: FanoutContext
    #: The epoch of the positions of drafts that are not recorded.
    epoch: str = field(factory=new_epoch)
    _dedup: DedupWindow = field(init=False)
    _lock: trio.StrictFIFOLock = field(factory=trio.StrictFIFOLock, init=False)
    _last_offset: int = field(default=0, init=False)
    _watches: Counter[str] = field(factory=Counter, init=False)
    _counts: Counter[str] = field(factory=Counter, init=False)

    @_dedup.default
    def _new_dedup(self) -> DedupWindow:
        context = self.context
        return DedupWindow(context.dedup_window, context.dedup_max_entries,
                           context.dedup_max_bytes)

    async def publish(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        # Uncontended (the common case: sessions publish inline, one at a time), the lock is
        # taken without a trip through the scheduler, which would cost as much as the rest of
        # a small publish.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            now = trio.current_time()
            plan = self._plan(drafts, now)
            if plan is None:
                fresh = (await self._position(drafts) if any(d.record for d in drafts)
                         else [self._next(draft) for draft in drafts])
            else:
                fresh = await self._position(
                    [d for d, s in zip(drafts, plan, strict=True) if s is None])
                for message in fresh:
                    if message.msg_id is not None:
                        self._dedup.put(message.topic, message.msg_id, Original.of(message),
                                        now)
            if fresh:
                self.context.deliver(fresh)
            self._counts["published"] += len(fresh)
            self._counts["duplicates"] += len(drafts) - len(fresh)
            return fresh if plan is None else _in_draft_order(drafts, plan, fresh)
        finally:
            self._lock.release()

    async def expire_dedup(self, period: float = DEDUP_EXPIRE_PERIOD) -> None:
        """Expire the dedup window every `period` seconds, forever (the fan-out's own task)."""
        while True:
            await trio.sleep(period)
            self._dedup.expire(trio.current_time())

    async def watch(self, filter: str) -> None:
        await trio.lowlevel.checkpoint()
        self._watches[filter] += 1

    async def unwatch(self, filter: str) -> None:
        await trio.lowlevel.checkpoint()
        # Unwatching what is not watched is a no-op: counts never go negative.
        if self._watches[filter] <= 1:
            del self._watches[filter]
        else:
            self._watches[filter] -= 1

    def health(self) -> Health:
        return Health(ok=True)

    #: The stats that are levels (gauges), not totals.
    STAT_GAUGES: ClassVar[frozenset[str]] = frozenset(
        {"watched_filters", "watches", "dedup_entries"})

    def stats(self) -> dict[str, int]:
        return {
            "published": self._counts["published"],
            "duplicates": self._counts["duplicates"],
            "watched_filters": len(self._watches),
            "watches": self._watches.total(),
            "dedup_entries": len(self._dedup),
            "dedup_bytes": self._dedup.bytes,
            "dedup_evicted": self._dedup.evicted,
        }

    def _plan(self, drafts: Sequence[Draft], now: float) -> list[_Plan] | None:
        """What each draft is; None when no draft has a msg_id (the common case)."""
        if all(draft.msg_id is None for draft in drafts):
            return None
        plan: list[_Plan] = []
        first_in_batch: dict[DedupKey, int] = {}
        for index, draft in enumerate(drafts):
            if draft.msg_id is None:
                plan.append(None)
                continue
            key = (draft.topic, draft.msg_id)
            original = self._dedup.get(*key, now)
            plan.append(original if original is not None else first_in_batch.get(key))
            first_in_batch.setdefault(key, index)
        return plan

    async def _position(self, drafts: Sequence[Draft]) -> list[Message]:
        recorded = [draft for draft in drafts if draft.record]
        try:
            in_history = iter(await self.context.history.append(recorded) if recorded else ())
        except HistoryUnavailable as exc:
            raise FanoutUnavailable(f"the history store is unavailable: {exc}") from exc
        return [next(in_history) if draft.record else self._next(draft) for draft in drafts]

    def _next(self, draft: Draft) -> Message:
        self._last_offset += 1
        return Message.from_draft(draft, Position(self.epoch, self._last_offset))


def _in_draft_order(drafts: Sequence[Draft], plan: Sequence[_Plan], fresh: Sequence[Message]
                    ) -> list[Message]:
    """Every draft's message: a fresh one, the one it repeats in this publish, or, for a repeat
    of an earlier publish, the draft as it was first published (the window keeps no payload)."""
    fresh_messages = iter(fresh)
    messages: list[Message] = []
    for draft, step in zip(drafts, plan, strict=True):
        if step is None:
            messages.append(next(fresh_messages))
        elif isinstance(step, int):
            messages.append(messages[step])
        else:
            messages.append(Message(topic=draft.topic, payload=draft.payload,
                                    published_at=step.published_at, position=step.position,
                                    msg_id=draft.msg_id))
    return messages


@asynccontextmanager
async def open_memory_fanout(settings: None, context: FanoutContext) -> AsyncIterator[MemoryFanout]:
    """An in-process fan-out over `context`, with its task that expires the dedup window."""
    fanout = MemoryFanout(context)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fanout.expire_dedup)
        yield fanout
        nursery.cancel_scope.cancel()
