"""What an idle subscription inside an application session's topics costs the indexes that
track it (docs/performance.md, "Idle sessions with presence"): the session-scoped index, the
presence tracker and the memory presence store stay lean for 10,000s of sessions each held by
one connection with one subscription, and stay right as sessions gain and lose holders."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from mqbroker.presence import Holder, PresenceTracker
from mqbroker.registry import ScopedSubscriptions, SessionTopics
from mqbroker.sessions import PresenceEntry, PresenceKey
from mqbroker_plugins.memory import MemoryPresence

PREFIX = "mcp/session"
N = 2_000
FILTERS = [f"{PREFIX}/{n}/message" for n in range(N)]
CONNECTIONS = [f"c{n:05}" for n in range(N)]


def per_subscription(build: Callable[[], object]) -> float:
    """Bytes the structure `build` returns holds per subscription (its inputs pre-made)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept is not None
    return (after - before) / N


def test_the_scoped_index_holds_an_idle_subscription_in_under_250_bytes() -> None:
    def build() -> object:
        scoped: ScopedSubscriptions[str] = ScopedSubscriptions(SessionTopics(PREFIX))
        for connection, filter in zip(CONNECTIONS, FILTERS, strict=True):
            scoped.add(connection, 1, filter)
        return scoped

    assert per_subscription(build) < 250  # 559 B with a dict and a set per session


def test_the_presence_tracker_holds_an_announced_connection_in_under_300_bytes() -> None:
    holders = [Holder(connection=c) for c in CONNECTIONS]

    def build() -> object:
        tracker = PresenceTracker(PREFIX)
        for holder, filter in zip(holders, FILTERS, strict=True):
            tracker.subscribed(holder, filter)
        assert len(tracker.take(N)) == N
        return tracker

    assert per_subscription(build) < 300  # 393 B with a dict of counts per connection


def test_the_memory_presence_store_holds_an_entry_in_under_300_bytes() -> None:
    entries = [PresenceEntry(session=str(n), instance="i", connection=c, expires=1e9)
               for n, c in enumerate(CONNECTIONS)]

    async def announce() -> MemoryPresence:
        store = MemoryPresence()
        await store.announce(entries)
        return store

    assert per_subscription(lambda: trio.run(announce)) < 300  # 550 B with a dict per session


_ops = st.one_of(
    st.tuples(st.just("announce"), st.sampled_from("AB"), st.sampled_from(["c1", "c2", "c3"]),
              st.integers(1, 5)),
    st.tuples(st.just("withdraw"), st.sampled_from("AB"), st.sampled_from(["c1", "c2", "c3"])),
    st.tuples(st.just("reap"), st.integers(0, 6), st.integers(1, 3)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ops, max_size=40))
def test_the_memory_presence_store_follows_a_model(ops: list[tuple[object, ...]]) -> None:
    """Sessions going from one entry to several and back: query and reap answer as a plain
    map of (session, instance, connection) -> entry would."""
    model: dict[PresenceKey, PresenceEntry] = {}

    async def run() -> None:
        store = MemoryPresence()
        for op in ops:
            if op[0] == "announce":
                entry = PresenceEntry(session=str(op[1]), instance="i", connection=str(op[2]),
                                      expires=float(str(op[3])))
                await store.announce([entry])
                model[entry.key] = entry
            elif op[0] == "withdraw":
                key = (str(op[1]), "i", str(op[2]))
                await store.withdraw([key])
                model.pop(key, None)
            else:
                now, limit = float(str(op[1])), int(str(op[2]))
                reaped = await store.reap(now, limit)
                assert len(reaped) <= limit
                for entry in reaped:
                    assert model.pop(entry.key).expires <= now
            for session in "AB":
                expected = sorted((k for k in model if k[0] == session), key=lambda k: k[1:])
                assert [e.key for e in await store.query(session, 0.0)] == expected
        assert {e.key for e in await store.reap(1e9, 100)} == set(model)

    trio.run(run)
