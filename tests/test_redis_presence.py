"""The Redis presence store (`RedisPresence`): the memory store's twin, cheap to re-announce
in bulk, and honest when Redis goes away. Racing reapers are the contract suite's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqbroker.broker import open_broker
from mqbroker.config import Config, ServerConfig, SessionsConfig
from mqbroker.server.presence import RETRY_DELAY, PresenceService
from mqbroker.sessions import PresenceEntry, PresenceStore, StoreUnavailable
from mqbroker.testing import watching
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


async def test_a_join_redis_answers_after_request_timeout_is_withdrawn_when_its_connection_closes(
    redis_server: RedisServer,
) -> None:
    """Redis slower than request_timeout (paused, then back well within socket_timeout): the
    announce of a join may still be carried out after its caller gave up on it. When that
    connection then closes, its entry must not stay behind in the store (queried as present
    until presence_ttl, then reaped with a leave that no join ever preceded)."""
    cfg = Config(server=ServerConfig(port=0),
                 sessions=SessionsConfig(presence_ttl=60.0, reap_interval=60.0,
                                         request_timeout=0.3))
    settings = settings_for(redis_server, socket_timeout=5.0)
    async with (open_store(settings) as store, open_broker(cfg, "a") as broker,
                trio.open_nursery() as nursery):
        service = PresenceService(broker, store, cfg.sessions)
        await nursery.start(service.run)
        broker.presence = service
        redis_server.pause()
        try:
            session = await watching(broker, "mcp/session/S/message", client_name="app")
            await trio.sleep(0.5)  # the announce is past request_timeout
            await broker.detach(session)
            await trio.sleep(0.2)
        finally:
            redis_server.resume()
        with trio.fail_after(WAIT):
            while service.tracker.pending:  # noqa: ASYNC110 - the tracker has no event
                await trio.sleep(0.05)
        await trio.sleep(RETRY_DELAY + 0.5)  # whatever is left to write is written
        assert list(await store.query("S", time.time())) == []
        nursery.cancel_scope.cancel()
