"""The in-process fan-out's own rules: one delivery per publish, its epoch, counts, failures."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
from attrs import define, field
from trio.testing import MockClock

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext, FanoutUnavailable
from mqbroker.history import HistoryStore, HistoryUnavailable, Replay
from mqbroker.message import Draft, Message, Position
from mqbroker.plugins import load_plugin
from mqbroker_plugins.memory import MemoryFanout, open_memory_fanout, open_memory_history
from mqbroker_plugins.memory_fanout import DEDUP_EXPIRE_PERIOD


def draft(topic: str, payload: object, *, msg_id: str | None = None, record: bool = False) -> Draft:
    return Draft(topic=topic, payload=payload, published_at=0.0, msg_id=msg_id, record=record)


@define
class CountedHistory:
    """A real memory store that also counts the appends made to it."""

    store: HistoryStore
    appends: list[int] = field(factory=list)

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        self.appends.append(len(drafts))
        return await self.store.append(drafts)

    async def read(self, topic: str, since: Position) -> Replay:
        return await self.store.read(topic, since)

    async def forget(self, filter: str) -> int:
        return await self.store.forget(filter)

    async def latest(self, topic: str) -> Position | None:
        return await self.store.latest(topic)

    def stats(self) -> Mapping[str, int]:
        return self.store.stats()


@define
class UnreachableHistory:
    """A history store whose backend is gone: every call raises HistoryUnavailable."""

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        raise HistoryUnavailable("connection refused")

    async def read(self, topic: str, since: Position) -> Replay:
        raise HistoryUnavailable("connection refused")

    async def forget(self, filter: str) -> int:
        raise HistoryUnavailable("connection refused")

    async def latest(self, topic: str) -> Position | None:
        raise HistoryUnavailable("connection refused")

    def stats(self) -> Mapping[str, int]:
        return {}


@define
class Rig:
    fanout: MemoryFanout
    history: CountedHistory
    batches: list[list[Message]]


@asynccontextmanager
async def open_rig(dedup_window: float = 60.0, dedup_max_bytes: int = 64 << 20
                   ) -> AsyncIterator[Rig]:
    batches: list[list[Message]] = []
    async with open_memory_history(None, HistoryConfig()) as store:
        history = CountedHistory(store)
        context = FanoutContext(
            instance_id="test",
            history=history,
            deliver=lambda messages: batches.append(list(messages)),
            dedup_window=dedup_window,
            dedup_max_bytes=dedup_max_bytes,
        )
        async with open_memory_fanout(None, context) as fanout:
            yield Rig(fanout, history, batches)


def test_the_memory_plugin_provides_this_fanout() -> None:
    """`[fanout] plugin = "memory"` opens the in-process fan-out."""
    assert load_plugin("memory").open_fanout is open_memory_fanout


async def test_one_publish_is_one_delivery_and_one_history_append() -> None:
    """A batch reaches deliver in one call, and its recorded drafts the store in one append."""
    async with open_rig() as rig:
        drafts = [draft("a", 1, record=True), draft("b", 2), draft("a", 3, record=True)]
        messages = await rig.fanout.publish(drafts)
    assert rig.batches == [list(messages)]
    assert rig.history.appends == [2]


async def test_a_publish_with_nothing_recorded_does_not_touch_the_store() -> None:
    """No recorded draft, no append."""
    async with open_rig() as rig:
        await rig.fanout.publish([draft("a", 1)])
    assert rig.history.appends == []


async def test_unrecorded_drafts_get_the_fanouts_own_epoch() -> None:
    """Recorded drafts carry the store's epoch; the others the fan-out's, increasing."""
    async with open_rig() as rig:
        recorded, first, second = await rig.fanout.publish(
            [draft("a", 1, record=True), draft("b", 2), draft("b", 3)]
        )
        mark = await rig.history.store.append([draft("a", 0, record=True)])
    assert recorded.position.epoch == mark[0].position.epoch
    assert first.position.epoch == second.position.epoch == rig.fanout.epoch
    assert rig.fanout.epoch != recorded.position.epoch
    assert first.position < second.position


async def test_only_fresh_messages_are_delivered_and_duplicates_are_counted() -> None:
    """A batch mixing repeats and new drafts delivers the new ones only, and counts both."""
    async with open_rig() as rig:
        [original] = await rig.fanout.publish([draft("a", 1, msg_id="k", record=True)])
        repeat, fresh = await rig.fanout.publish(
            [draft("a", 2, msg_id="k", record=True), draft("a", 3, msg_id="j", record=True)]
        )
        stats = rig.fanout.stats()
    assert (repeat.event_id, repeat.published_at) == (original.event_id, original.published_at)
    assert rig.batches == [[original], [fresh]]
    assert rig.history.appends == [1, 1]
    assert (stats["published"], stats["duplicates"], stats["dedup_entries"]) == (2, 1, 2)


async def test_a_publish_of_only_duplicates_delivers_nothing() -> None:
    """deliver is never called with an empty batch."""
    async with open_rig() as rig:
        await rig.fanout.publish([draft("a", 1, msg_id="k")])
        await rig.fanout.publish([draft("a", 1, msg_id="k")])
    assert len(rig.batches) == 1


async def test_the_dedup_window_runs_on_trio_clock(autojump_clock: MockClock) -> None:
    """Dedup ages on trio's clock: just inside the window a repeat is absorbed, past it not."""
    async with open_rig(dedup_window=30.0) as rig:
        [original] = await rig.fanout.publish([draft("a", 1, msg_id="k")])
        await trio.sleep(29.9)
        [repeat] = await rig.fanout.publish([draft("a", 2, msg_id="k")])
        assert repeat.event_id == original.event_id
        await trio.sleep(0.2)
        [again] = await rig.fanout.publish([draft("a", 3, msg_id="k")])
    assert again != original and rig.batches == [[original], [again]]


async def test_the_dedup_window_is_freed_on_time_without_another_publish(
    autojump_clock: MockClock,
) -> None:
    """Entries leave the window once it has passed, by the fan-out's timer: no later publish is
    needed to give their memory back."""
    async with open_rig(dedup_window=5.0) as rig:
        await rig.fanout.publish([draft("a", n, msg_id=f"m{n}") for n in range(100)])
        assert rig.fanout.stats()["dedup_entries"] == 100
        await trio.sleep(5.0 + DEDUP_EXPIRE_PERIOD)
        stats = rig.fanout.stats()
    assert stats["dedup_entries"] == 0
    assert (stats["dedup_bytes"], stats["dedup_evicted"]) == (0, 0)


async def test_the_dedup_window_holds_no_payloads() -> None:
    """The issue's case: many 256 KiB publishes with a msg_id. Once delivered (and not
    recorded), their payloads are not held by the fan-out: what it keeps per publish is a few
    hundred bytes, not the payload."""
    async with open_rig(dedup_window=60.0) as rig:
        payloads = 200
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(payloads):
                await rig.fanout.publish([draft(f"big/{n}", os.urandom(256 * 1024),
                                                msg_id=f"m{n}")])
                rig.batches.clear()  # as the broker would, once delivered
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        stats = rig.fanout.stats()
    assert stats["dedup_entries"] == payloads
    assert held < payloads * 2048, f"{held:,} bytes held after {payloads} publishes"
    assert stats["dedup_bytes"] < payloads * 1024


async def test_the_dedup_window_is_bounded_in_bytes() -> None:
    """dedup_max_bytes bounds the window, whatever the size of the msg_ids; the oldest pairs go
    first and are counted."""
    async with open_rig(dedup_window=60.0, dedup_max_bytes=100_000) as rig:
        for n in range(50):
            await rig.fanout.publish([draft("a", n, msg_id=f"{n}:" + "x" * 10_000)])
        stats = rig.fanout.stats()
    assert 0 < stats["dedup_bytes"] <= 100_000
    assert stats["dedup_entries"] + stats["dedup_evicted"] == 50


async def test_watches_are_counted_per_filter() -> None:
    """stats count watched filters and watches; an unwatch too many is a no-op."""
    async with open_rig() as rig:
        for filter in ("a/+", "a/+", "b/#"):
            await rig.fanout.watch(filter)
        assert (rig.fanout.stats()["watched_filters"], rig.fanout.stats()["watches"]) == (2, 3)
        await rig.fanout.unwatch("a/+")
        await rig.fanout.unwatch("b/#")
        await rig.fanout.unwatch("b/#")
        assert (rig.fanout.stats()["watched_filters"], rig.fanout.stats()["watches"]) == (1, 1)


async def test_an_unreachable_history_fails_the_publish_and_delivers_nothing() -> None:
    """HistoryUnavailable surfaces as FanoutUnavailable, before anything is delivered."""
    batches: list[Sequence[Message]] = []
    context = FanoutContext(
        instance_id="test", history=UnreachableHistory(), deliver=batches.append, dedup_window=60
    )
    async with open_memory_fanout(None, context) as fanout:
        with pytest.raises(FanoutUnavailable, match="connection refused"):
            await fanout.publish([draft("a", 1, record=True), draft("b", 2)])
        assert fanout.health().ok
    assert batches == []
