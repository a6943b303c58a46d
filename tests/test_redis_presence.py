"""The Redis presence store (`RedisPresence`): the memory store's twin, cheap to re-announce
in bulk, and honest when Redis goes away. Racing reapers are the contract suite's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqbroker.sessions import PresenceEntry, PresenceStore, StoreUnavailable
from mqbroker_plugins.memory import MemoryPresence
from mqbroker_plugins.redis import RedisPresence, RedisSettings, open_redis_presence
from tests.redis_fixtures import (
    WAIT,
    command_calls,
    contract_server,
    redis_server,
    redis_settings,
    reset_stats,
    settings_for,
)
from tests.redis_server import RedisServer

__all__ = ["redis_server", "redis_settings"]  # fixtures used by name below

T0 = 1_700_000_000.5


@asynccontextmanager
async def open_store(settings: RedisSettings | None = None) -> AsyncIterator[RedisPresence]:
    async with open_redis_presence(settings or settings_for(contract_server())) as store:
        yield store


# Names a naive encoding would confuse: separators, a length prefix's digits, NUL, non-ASCII.
names = st.sampled_from(["s1", "1:s", "s1:", "12", "a\x00b", "é", "", "due"])
entries = st.builds(
    PresenceEntry,
    session=names, instance=names, connection=names,
    client=st.text(max_size=4), principal=st.none() | st.text(max_size=4),
    expires=st.sampled_from([T0, T0 + 1, T0 + 2.5, T0 + 1 / 3]),
)  # fmt: skip
operations = st.one_of(
    st.tuples(st.just("announce"), st.lists(entries, max_size=5)),
    st.tuples(st.just("withdraw"), st.lists(st.tuples(names, names, names), max_size=3)),
    st.tuples(st.just("query"), names),
    st.tuples(st.just("reap")),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 1.0, 2.0])),
)


async def apply(store: PresenceStore, now: float, operation: tuple[Any, ...]) -> Any:
    name, *args = operation
    if name == "announce":
        return await store.announce(args[0])
    if name == "withdraw":
        return await store.withdraw(args[0])
    if name == "query":
        return list(await store.query(args[0], now))
    # Everything due at once: which of equally due entries a bounded reap takes first is
    # the backend's choice.
    return sorted(await store.reap(now, 1000), key=lambda entry: entry.key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, min_size=1, max_size=30))
async def test_the_redis_store_answers_as_the_memory_store_does(
    steps: list[tuple[Any, ...]],
) -> None:
    """Any sequence of announces, withdrawals, queries and reaps, over names that share
    separators and digits with the keys' encoding, answers as the memory store does."""
    memory = MemoryPresence()
    now = T0 - 1
    async with open_store() as redis_store:
        with trio.fail_after(WAIT):
            for step in steps:
                if step[0] == "wait":
                    now += step[1]
                    continue
                expected = await apply(memory, now, step)
                assert await apply(redis_store, now, step) == expected, step


async def test_ten_thousand_entries_are_announced_in_one_round_trip(
    redis_server: RedisServer,
) -> None:
    """An instance re-announcing 10,000 entries makes one pipeline of ten script calls (after
    redis-py's check that the script is loaded), and every entry is refreshed."""
    async with open_store(settings_for(redis_server)) as store:
        given = [
            PresenceEntry(session=f"s{n % 2500}", instance="i1", connection=f"c{n}",
                          client="app", principal="alice", expires=T0 + 15)
            for n in range(10_000)
        ]  # fmt: skip
        reset_stats(redis_server)
        with trio.fail_after(WAIT):
            await store.announce(given)
        calls = command_calls(redis_server)
        assert (calls["evalsha"], calls["script|exists"], calls["hset"]) == (10, 1, 10_000)
        found = await store.query("s7", T0)
        assert [entry.connection for entry in found] == ["c2507", "c5007", "c7", "c7507"]


async def test_a_stopped_redis_is_unavailable_then_works_when_restarted_empty(
    redis_server: RedisServer,
) -> None:
    """Redis gone: every call raises StoreUnavailable promptly. Back, empty: the store works
    again and knows nothing of before (instances re-announce within presence_ttl / 3)."""
    one = PresenceEntry(session="s1", instance="i1", connection="c1", expires=T0 + 15)
    async with open_store(settings_for(redis_server)) as store:
        await store.announce([one])
        redis_server.stop()
        calls = [
            lambda: store.announce([one]),
            lambda: store.withdraw([one.key]),
            lambda: store.query("s1", T0),
            lambda: store.reap(T0 + 100, 10),
        ]
        for call in calls:
            with trio.fail_after(2.0):
                try:
                    await call()
                except StoreUnavailable:
                    continue
                raise AssertionError("a call succeeded with Redis away")
        redis_server.start()
        with trio.fail_after(WAIT):
            assert list(await store.query("s1", T0)) == []
            await store.announce([one])
            assert list(await store.query("s1", T0)) == [one]
