"""The memory history store's own rules: bounds, eviction order, expiry, gaps, stats and logs."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from trio.testing import MockClock

from mqbroker.config import HistoryConfig
from mqbroker.history import Gap
from mqbroker.message import Draft, Message, Position
from mqbroker.plugins import load_plugin
from mqbroker_plugins.memory import BoundedHistory, MemoryHistory, open_memory_history
from mqbroker_plugins.memory_history import expiry_interval, message_size


def draft(topic: str, payload: object = "", *, n: int = 0) -> Draft:
    return Draft(topic=topic, payload=payload, published_at=1_700_000_000.0 + n, record=True)


def sized(topic: str, weight: int) -> Draft:
    """A draft that weighs exactly `weight` bytes against max_bytes."""
    payload = b"x" * (weight - len(topic) - 2)  # msgpack: 2 header bytes for short bin
    made = draft(topic, payload)
    assert message_size(made) == weight
    return made


def store(**bounds: Any) -> BoundedHistory:
    return BoundedHistory(HistoryConfig(**bounds))


def start(history: BoundedHistory) -> Position:
    """A position before everything of the current epoch."""
    return Position(history.epoch, 0)


# -- plugin ------------------------------------------------------------------------------


def test_the_memory_plugin_is_installed_under_its_entry_point() -> None:
    """`[history] plugin = "memory"` finds this plugin through the entry point."""
    plugin = load_plugin("memory")
    assert plugin.name == "memory" and plugin.settings_type is None
    assert plugin.open_history is open_memory_history


def test_each_store_life_has_a_new_parseable_epoch() -> None:
    """Two stores never share an epoch, and the epoch survives an event id round trip."""
    first, second = store(), store()
    assert first.epoch != second.epoch
    [message] = first.append([draft("a")], now=0.0)
    assert Position.parse(message.event_id) == message.position


# -- bounds and eviction -----------------------------------------------------------------


def test_max_topics_evicts_the_least_recently_appended_topic() -> None:
    """Eviction order is last append, not creation: a topic written to again stays."""
    history = store(max_topics=2)
    history.append([draft("a"), draft("b"), draft("a"), draft("c")], now=0.0)
    assert history.topic_names() == ["a", "c"]
    assert history.stats()["evicted_topics"] == 1
    assert history.stats()["evicted_messages"] == 1
    assert history.bounds_reached == {"max_topics"}


def test_max_bytes_evicts_whole_topics_least_recent_first() -> None:
    """Over max_bytes, the least recently appended topics go whole until the store fits."""
    history = store(max_bytes=100)
    history.append([sized("t/1", 30), sized("t/2", 30), sized("t/3", 30)], now=0.0)
    history.append([sized("t/2", 30)], now=0.0)
    assert history.topic_names() == ["t/3", "t/2"]
    assert history.stats()["bytes"] == 90
    assert history.bounds_reached == {"max_bytes"}


def test_a_topic_alone_over_max_bytes_gives_up_its_oldest_messages() -> None:
    """When only the appended topic is left, its own oldest messages go, and the gap shows."""
    history = store(max_bytes=100)
    first = history.append([sized("t/1", 40), sized("t/1", 40)], now=0.0)
    [last] = history.append([sized("t/1", 40)], now=0.0)
    replay = history.read("t/1", start(history), now=0.0)
    assert (list(replay.messages), replay.gap) == ([first[1], last], Gap.TRIMMED)
    assert history.stats()["evicted_messages"] == 1


def test_a_message_heavier_than_max_bytes_is_not_kept() -> None:
    """A single message over max_bytes is positioned but evicted at once, with a gap for it."""
    history = store(max_bytes=50)
    [message] = history.append([sized("t/1", 60)], now=0.0)
    replay = history.read("t/1", Position(history.epoch, message.position.offset - 1), now=0.0)
    assert (list(replay.messages), replay.gap) == ([], Gap.TRIMMED)
    assert history.stats()["topics"] == 0 and history.stats()["bytes"] == 0


def test_message_size_counts_topic_and_packed_payload() -> None:
    """A message weighs its topic's UTF-8 length plus its msgpack-packed payload."""
    assert message_size(draft("é/t", "abc")) == len("é/t".encode()) + 4
    assert message_size(draft("t", {"k": 1})) == 1 + 4
    assert message_size(draft("t", object())) == 1 + 64


# -- gaps on topics the store no longer holds --------------------------------------------


def test_a_topic_never_seen_reads_complete_on_a_fresh_store() -> None:
    """Nothing was ever dropped, so nothing after any position can be missing."""
    history = store()
    history.append([draft("other")], now=0.0)
    replay = history.read("never", start(history), now=0.0)
    assert (list(replay.messages), replay.gap) == ([], None)


def test_a_dropped_topic_keeps_its_last_position_as_a_tombstone() -> None:
    """From its last position a dropped topic is complete; from earlier, TRIMMED."""
    history = store(max_topics=1)
    first, last = history.append([draft("a"), draft("a")], now=0.0)
    history.append([draft("b")], now=0.0)
    assert history.read("a", last.position, now=0.0).gap is None
    assert history.read("a", first.position, now=0.0).gap is Gap.TRIMMED


def test_when_tombstones_overflow_unknown_topics_err_towards_a_gap() -> None:
    """Past max_topics tombstones, a forgotten topic's old position still reads as TRIMMED."""
    history = store(max_topics=2)
    [old_a, _] = history.append([draft("a"), draft("a")], now=0.0)
    history.append([draft(f"t/{n}") for n in range(6)], now=0.0)
    assert history.stats()["tombstones"] == 2
    assert history.read("a", old_a.position, now=0.0).gap is Gap.TRIMMED
    # A topic coming back after its tombstone went keeps the gap on its old positions.
    [new_a] = history.append([draft("a")], now=0.0)
    replay = history.read("a", old_a.position, now=0.0)
    assert (list(replay.messages), replay.gap) == ([new_a], Gap.TRIMMED)


# -- expiry (pure) -----------------------------------------------------------------------


def test_messages_older_than_max_age_are_not_replayed() -> None:
    """A read drops what has aged past max_age and reports the gap it leaves."""
    history = store(max_age=10)
    [old] = history.append([draft("t")], now=0.0)
    [young] = history.append([draft("t")], now=6.0)
    replay = history.read("t", start(history), now=10.5)
    assert (list(replay.messages), replay.gap) == ([young], Gap.TRIMMED)
    assert history.read("t", old.position, now=10.5).gap is None
    assert history.stats()["expired_messages"] == 1


def test_expire_idle_drops_topics_in_last_append_order() -> None:
    """Idle topics (newest message past max_age) go; a topic appended recently stays."""
    history = store(max_age=10)
    history.append([draft("a"), draft("b")], now=0.0)
    history.append([draft("a")], now=5.0)
    assert history.expire_idle(now=10.5) == 1
    assert history.topic_names() == ["a"]
    assert history.stats()["expired_topics"] == 1


@pytest.mark.parametrize(("max_age", "interval"), [(300.0, 10.0), (10.0, 1.0), (0.001, 0.01)])
def test_expiry_interval_is_a_tenth_of_max_age_within_limits(
    max_age: float, interval: float
) -> None:
    """The sweep runs often enough to matter and rarely enough to cost nothing."""
    assert expiry_interval(max_age) == interval


# -- the trio store: expiry sweep, logs --------------------------------------------------


async def test_the_sweep_expires_idle_topics_and_old_messages(autojump_clock: MockClock) -> None:
    """Without any read, the sweep drops idle topics and trims aged messages."""
    async with open_memory_history(None, HistoryConfig(max_age=10)) as history:
        await history.append([draft("idle"), draft("busy")])
        await trio.sleep(6)
        await history.append([draft("busy")])
        await trio.sleep(5 + expiry_interval(10) + 0.1)
        stats = history.stats()
        assert (stats["topics"], stats["messages"]) == (1, 1)
        assert (stats["expired_topics"], stats["expired_messages"]) == (1, 2)


async def test_the_store_reads_ages_on_trio_clock(autojump_clock: MockClock) -> None:
    """max_age is measured on trio's clock, not on the drafts' wall-clock published_at."""
    async with open_memory_history(None, HistoryConfig(max_age=10)) as history:
        [message] = await history.append([draft("t", n=-1_000_000)])
        replay = await history.read("t", Position(history.epoch, 0))
        assert list(replay.messages) == [message]
        await trio.sleep(10.5)
        replay = await history.read("t", Position(history.epoch, 0))
        assert (list(replay.messages), replay.gap) == ([], Gap.TRIMMED)


async def test_the_first_bound_hit_is_logged_once_and_evictions_at_debug() -> None:
    """One info line per store bound the first time it evicts; each eviction batch at debug."""
    async with open_memory_history(None, HistoryConfig(max_topics=1)) as history:
        with capture_logs() as logs:
            await history.append([draft("a"), draft("b")])
            await history.append([draft("c")])
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("history.topics_evicted", "debug"),
        ("history.bound_reached", "info"),
        ("history.topics_evicted", "debug"),
    ]
    assert logs[1]["bound"] == "max_topics" and logs[1]["limit"] == 1


async def test_a_cancelled_append_changes_nothing() -> None:
    """An append cancelled at its checkpoint neither positions nor keeps anything."""
    async with open_memory_history(None, HistoryConfig()) as history:
        with trio.CancelScope() as scope:
            scope.cancel()
            await history.append([draft("t")])
        assert history.stats()["appended"] == 0


# -- bounded memory ----------------------------------------------------------------------


async def test_memory_stays_within_the_bounds_under_a_flood() -> None:
    """200,000 messages over 5,000 topics never take the store past any bound.

    Half the messages go to 50 hot topics (max_messages binds), half sweep over 5,000 cold
    ones (max_topics binds); payloads grow tenfold halfway through (max_bytes binds).
    """
    config = HistoryConfig(max_messages=20, max_topics=1_000, max_bytes=150_000)
    async with open_memory_history(None, config) as history:
        for batch in _batches(200_000, 1_000):
            await history.append([flood_draft(n) for n in batch])
            assert_within(history, config)
        assert history.stats()["appended"] == 200_000
        assert history.store.bounds_reached == {"max_topics", "max_bytes"}
        counts = [
            len((await history.read(topic, Position(history.epoch, 0))).messages)
            for topic in history.store.topic_names()
        ]
        assert max(counts) == config.max_messages


def flood_draft(n: int) -> Draft:
    topic = f"hot/{n % 50}" if n % 2 else f"cold/{n * 7919 % 5_000}"
    return draft(topic, "p" * (10 if n < 100_000 else 100), n=n)


def _batches(total: int, size: int) -> list[range]:
    return [range(start, min(start + size, total)) for start in range(0, total, size)]


def assert_within(history: MemoryHistory, config: HistoryConfig) -> None:
    stats = history.stats()
    assert stats["topics"] <= config.max_topics
    assert stats["tombstones"] <= config.max_topics
    assert stats["bytes"] <= config.max_bytes
    assert stats["messages"] <= config.max_topics * config.max_messages
    dropped = stats["evicted_messages"] + stats["expired_messages"] + stats["forgotten_messages"]
    assert stats["appended"] == stats["messages"] + dropped


# -- property: replays are exact ---------------------------------------------------------

#: The bounds of the property tests: small, so that every one of them is hit.
PROPERTY_BOUNDS = {"max_messages": 3, "max_bytes": 150, "max_age": 10.0}


def operations(topics: list[str]) -> st.SearchStrategy[list[tuple[object, ...]]]:
    """Appends (topic, payload length, seconds since the last step), forgets and sweeps."""
    return st.lists(
        st.one_of(
            st.tuples(
                st.just("append"), st.sampled_from(topics), st.integers(0, 40), st.floats(0, 4)
            ),
            st.tuples(st.just("forget"), st.sampled_from([*topics, "p/+", "#"])),
            st.tuples(st.just("sweep"), st.floats(0, 4)),
        ),
        max_size=40,
    )


class Model:
    """Every message ever appended per topic, with its append time, next to the store."""

    def __init__(self, history: BoundedHistory, topics: list[str]) -> None:
        self.history = history
        self.now = 0.0
        self.written: dict[str, list[tuple[float, Message]]] = {topic: [] for topic in topics}

    def apply(self, operation: tuple[object, ...]) -> None:
        match operation:
            case ("append", str(topic), int(length), float(elapsed)):
                self.now += elapsed
                [message] = self.history.append([draft(topic, "x" * length)], self.now)
                self.written[topic].append((self.now, message))
            case ("forget", str(filter)):
                self.history.forget(filter)
            case ("sweep", float(elapsed)):
                self.now += elapsed
                self.history.expire_idle(self.now)
                self.history.trim_expired(self.history.topic_names(), self.now)

    def check(self, *, exact: bool) -> None:
        for topic, written in self.written.items():
            self.check_topic(topic, written, exact=exact)
        stats = self.history.stats()
        assert stats["bytes"] <= PROPERTY_BOUNDS["max_bytes"]
        assert stats["topics"] <= self.history.config.max_topics

    def check_topic(self, topic: str, written: list[tuple[float, Message]], *, exact: bool) -> None:
        retained = list(self.history.read(topic, start(self.history), self.now).messages)
        # Only the oldest go: what is retained is the newest part of what was written.
        kept_from = len(written) - len(retained)
        assert retained == [message for _, message in written[kept_from:]]
        assert len(retained) <= PROPERTY_BOUNDS["max_messages"]
        assert all(self.now - at <= PROPERTY_BOUNDS["max_age"] for at, _ in written[kept_from:])
        lost = [message.position.offset for _, message in written[:kept_from]]
        for since in [start(self.history), *(message.position for _, message in written)]:
            replay = self.history.read(topic, since, self.now)
            assert list(replay.messages) == [m for m in retained if m.position > since]
            missing = any(offset > since.offset for offset in lost)
            if exact:
                assert (replay.gap is Gap.TRIMMED) == missing
            else:
                assert replay.gap is Gap.TRIMMED or not missing


@settings(max_examples=300, deadline=None)
@given(operations(["p/a", "p/b", "p/c"]))
def test_replays_and_gaps_are_exact_while_tombstones_fit(steps: list[tuple[object, ...]]) -> None:
    """With no more topics than max_topics, a gap is reported exactly when a message is lost."""
    model = Model(store(max_topics=3, **PROPERTY_BOUNDS), ["p/a", "p/b", "p/c"])
    for step in steps:
        model.apply(step)
        model.check(exact=True)


@settings(max_examples=300, deadline=None)
@given(operations(["p/a", "p/b", "p/c", "p/d", "p/e"]))
def test_a_lost_message_is_never_reported_as_recovered(steps: list[tuple[object, ...]]) -> None:
    """With more topics than tombstones, gaps may be spurious but never missed."""
    model = Model(store(max_topics=2, **PROPERTY_BOUNDS), ["p/a", "p/b", "p/c", "p/d", "p/e"])
    for step in steps:
        model.apply(step)
        model.check(exact=False)
