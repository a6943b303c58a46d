"""The HistoryStore contract (mqbroker.history), checked against every backend."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import trio

from mqbroker.config import HistoryConfig
from mqbroker.history import Gap, HistoryStore
from mqbroker.message import Draft, Message, Position

from .backends import Backend


def drafts(topic: str, count: int, *, first: int = 0) -> list[Draft]:
    """`count` recorded drafts on `topic` with payloads that tell them apart."""
    return [
        Draft(
            topic=topic,
            payload={"n": n, "text": f"message {n} é", "blob": bytes([n % 256]) * 3},
            published_at=1_700_000_000.0 + n,
            msg_id=f"id-{n}",
            record=True,
        )
        for n in range(first, first + count)
    ]


def other_epoch(position: Position) -> str:
    """An epoch that is certainly not `position`'s."""
    return "x" + position.epoch


async def read(
    store: HistoryStore, topic: str, since: Position
) -> tuple[list[Message], Gap | None]:
    with trio.fail_after(10):
        replay = await store.read(topic, since)
    return list(replay.messages), replay.gap


async def append(store: HistoryStore, batch: Sequence[Draft]) -> list[Message]:
    with trio.fail_after(10):
        return list(await store.append(batch))


def assert_strictly_increasing(messages: Sequence[Message]) -> None:
    positions = [m.position for m in messages]
    assert len({p.epoch for p in positions}) <= 1
    assert all(a.offset < b.offset for a, b in pairwise(positions))


async def test_positions_strictly_increase_per_topic_in_one_epoch(backend: Backend) -> None:
    """Every append to a topic gets a later position than the one before, all in one epoch."""
    async with backend.open_history(HistoryConfig()) as store:
        first = await append(store, drafts("a/1", 3))
        await append(store, drafts("a/2", 2))
        second = await append(store, drafts("a/1", 2, first=3))
        assert_strictly_increasing([*first, *second])
        assert first[0].position.epoch == second[0].position.epoch
        assert [Position.parse(m.event_id) for m in first] == [m.position for m in first]


async def test_append_returns_the_drafts_in_order_across_topics(backend: Backend) -> None:
    """A batch over several topics comes back in draft order, each draft's fields intact."""
    batch = [d for n in range(4) for d in (*drafts("b/x", 1, first=n), *drafts("b/y", 1, first=n))]
    async with backend.open_history(HistoryConfig()) as store:
        messages = await append(store, batch)
    assert [(m.topic, m.payload, m.published_at, m.msg_id) for m in messages] == [
        (d.topic, d.payload, d.published_at, d.msg_id) for d in batch
    ]
    assert_strictly_increasing([m for m in messages if m.topic == "b/x"])
    assert_strictly_increasing([m for m in messages if m.topic == "b/y"])


async def test_read_after_a_position_returns_exactly_the_later_messages(backend: Backend) -> None:
    """From any position: every later message in order, never that position or an earlier one."""
    async with backend.open_history(HistoryConfig()) as store:
        messages: list[Message] = []
        for n in range(6):
            # Another topic in between: offsets need not be dense per topic.
            messages += await append(store, drafts("c/t", 1, first=n))
            await append(store, drafts("c/u", 1, first=n))
        for index, message in enumerate(messages):
            assert await read(store, "c/t", message.position) == (messages[index + 1 :], None)


async def test_batch_append_is_read_back_in_draft_order(backend: Backend) -> None:
    """Drafts of one batch over several topics read back per topic in the order they were given."""
    async with backend.open_history(HistoryConfig()) as store:
        [mark_x, mark_y] = await append(store, [*drafts("d/x", 1), *drafts("d/y", 1)])
        batch = [*drafts("d/x", 2, first=1), *drafts("d/y", 3, first=1), *drafts("d/x", 1, first=3)]
        messages = await append(store, batch)
        assert await read(store, "d/x", mark_x.position) == (
            [m for m in messages if m.topic == "d/x"],
            None,
        )
        assert await read(store, "d/y", mark_y.position) == (
            [m for m in messages if m.topic == "d/y"],
            None,
        )


async def test_max_messages_trims_and_reports_the_gap_with_the_rest(backend: Backend) -> None:
    """Past max_messages the oldest go; a read from before them is TRIMMED, with the rest."""
    async with backend.open_history(HistoryConfig(max_messages=3)) as store:
        messages: list[Message] = []
        for n in range(6):
            messages += await append(store, drafts("e/t", 1, first=n))
        assert await read(store, "e/t", messages[0].position) == (messages[3:], Gap.TRIMMED)
        assert await read(store, "e/t", messages[1].position) == (messages[3:], Gap.TRIMMED)
        # Nothing after messages[2] was lost, even though messages[2] itself was.
        assert await read(store, "e/t", messages[2].position) == (messages[3:], None)
        assert await read(store, "e/t", messages[4].position) == (messages[5:], None)


async def test_unknown_epoch_returns_everything_retained(backend: Backend) -> None:
    """A position from another epoch gets every retained message and Gap.UNKNOWN_EPOCH."""
    async with backend.open_history(HistoryConfig(max_messages=2)) as store:
        messages = await append(store, drafts("f/t", 3))
        late = messages[-1].position
        for offset in (0, late.offset, late.offset + 1000):
            since = Position(other_epoch(late), offset)
            assert await read(store, "f/t", since) == (messages[1:], Gap.UNKNOWN_EPOCH)


async def test_read_from_the_newest_position_is_empty_and_complete(backend: Backend) -> None:
    """A subscriber that missed nothing gets nothing, and no gap."""
    async with backend.open_history(HistoryConfig()) as store:
        messages = await append(store, drafts("g/t", 2))
        assert await read(store, "g/t", messages[-1].position) == ([], None)


async def test_forget_an_exact_topic(backend: Backend) -> None:
    """forget(topic) drops that topic only; a read from an old position of it says TRIMMED."""
    async with backend.open_history(HistoryConfig()) as store:
        gone = await append(store, drafts("h/1", 3))
        kept = await append(store, drafts("h/2", 3))
        with trio.fail_after(10):
            assert await store.forget("h/1") == 1
            assert await store.forget("h/1") == 0
        assert await read(store, "h/1", gone[0].position) == ([], Gap.TRIMMED)
        assert await read(store, "h/2", kept[0].position) == (kept[1:], None)


async def test_forget_a_wildcard_filter(backend: Backend) -> None:
    """forget(filter) drops every topic the filter matches, counts them, and keeps the others."""
    topics = ["mcp/session/a/message", "mcp/session/b/message", "mcp/session/a/other"]
    async with backend.open_history(HistoryConfig()) as store:
        written = {topic: await append(store, drafts(topic, 2)) for topic in topics}
        with trio.fail_after(10):
            assert await store.forget("mcp/session/+/message") == 2
        for topic in topics[:2]:
            assert await read(store, topic, written[topic][0].position) == ([], Gap.TRIMMED)
        kept = written["mcp/session/a/other"]
        assert await read(store, "mcp/session/a/other", kept[0].position) == (kept[1:], None)


async def test_a_forgotten_topic_never_reuses_a_position(backend: Backend) -> None:
    """Appends after forget get later positions, and the forgotten ones still read as TRIMMED."""
    async with backend.open_history(HistoryConfig()) as store:
        before = await append(store, drafts("i/t", 2))
        with trio.fail_after(10):
            await store.forget("i/t")
        after = await append(store, drafts("i/t", 2, first=2))
        assert_strictly_increasing([*before, *after])
        assert await read(store, "i/t", before[0].position) == (after, Gap.TRIMMED)
        assert await read(store, "i/t", after[0].position) == (after[1:], None)


async def test_stats_are_counts(backend: Backend) -> None:
    """stats() is a mapping of names to integer counts."""
    async with backend.open_history(HistoryConfig()) as store:
        await append(store, drafts("j/t", 2))
        stats = store.stats()
    assert stats and all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())


async def latest(store: HistoryStore, topic: str) -> Position | None:
    with trio.fail_after(10):
        return await store.latest(topic)


async def test_latest_is_the_newest_retained_position_of_the_topic(backend: Backend) -> None:
    """latest(topic) is the position of the topic's newest message, whatever other topics do;
    None for a topic with nothing recorded."""
    async with backend.open_history(HistoryConfig()) as store:
        assert await latest(store, "k/1") is None
        first = await append(store, drafts("k/1", 3))
        assert await latest(store, "k/1") == first[-1].position
        mixed = await append(store, [*drafts("k/2", 2), *drafts("k/1", 1, first=3)])
        assert await latest(store, "k/1") == mixed[-1].position
        assert await latest(store, "k/2") == mixed[1].position


async def test_a_read_from_latest_is_empty_and_complete(backend: Backend) -> None:
    """latest is a position to resume from: nothing after it, no gap; later appends follow it."""
    async with backend.open_history(HistoryConfig(max_messages=2)) as store:
        await append(store, drafts("l/t", 5))
        newest = await latest(store, "l/t")
        assert newest is not None
        assert await read(store, "l/t", newest) == ([], None)
        later = await append(store, drafts("l/t", 1, first=5))
        assert await read(store, "l/t", newest) == (later, None)


async def test_latest_of_a_forgotten_topic_is_none(backend: Backend) -> None:
    """forget drops what latest would name: a forgotten topic has no newest message."""
    async with backend.open_history(HistoryConfig()) as store:
        await append(store, drafts("m/t", 2))
        with trio.fail_after(10):
            await store.forget("m/#")
        assert await latest(store, "m/t") is None
        again = await append(store, drafts("m/t", 1, first=2))
        assert await latest(store, "m/t") == again[0].position
