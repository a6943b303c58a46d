"""The Redis session store (`RedisSessions`): the memory store's twin, atomic across instances,
and honest when Redis goes away.

The memory store is the reference: hypothesis drives both through the same operations (user
scoping, every transition, touches, metadata, paging, reaping on a fake clock) and every
answer must be equal, record for record. The rest pins what only a shared store can get
wrong: batches in one round trip, hostile ids and users as data, and a Redis stopped,
paused, or killed mid-operation, then restarted empty. Racing instances are the contract
suite's (tests/contract). Every server is a private redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqbroker.config import Config, SessionsConfig, plugin_settings
from mqbroker.plugins import load_plugin
from mqbroker.sessions import (
    IllegalTransition,
    SessionExists,
    SessionRecord,
    SessionState,
    SessionStore,
    StoreUnavailable,
)
from mqbroker_plugins.memory import MemorySessions
from mqbroker_plugins.redis import RedisSessions, RedisSettings, open_redis_sessions
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

NOW = 1_700_000_000.25


def record(session_id: str, user: str = "alice", **changes: Any) -> SessionRecord:
    base = SessionRecord(
        id=session_id, user=user, state=SessionState.PENDING, created=NOW, updated=NOW,
        expires=NOW + 60.0, ttl=60.0, metadata={"n": 1},
    )  # fmt: skip
    return attrs.evolve(base, **changes)


@asynccontextmanager
async def open_store(settings: RedisSettings | None = None) -> AsyncIterator[RedisSessions]:
    """A fresh, empty store: its own key prefix on the shared test server unless given."""
    async with open_redis_sessions(settings or settings_for(contract_server())) as store:
        yield store


# --- The memory store's twin ---------------------------------------------------------------

IDS = ["a", "b", "c", "d", "e"]
USERS = ["alice", "bob"]
ids = st.sampled_from(IDS)
users = st.sampled_from(USERS)
scopes = st.one_of(st.none(), users)
states = st.sampled_from(list(SessionState))
durations = st.sampled_from([0.0, 0.5, 1.0, 7.25, 60.0, 1e-3, 1 / 3])
metadata = st.dictionaries(
    st.text(max_size=5),
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
              st.binary(max_size=8), st.lists(st.integers(), max_size=3)),
    max_size=3,
)  # fmt: skip

operations = st.one_of(
    st.tuples(st.just("create"), ids, users, states, durations, metadata),
    st.tuples(st.just("get"), st.lists(ids, max_size=6), scopes),
    st.tuples(st.just("touch"), st.lists(ids, max_size=6), scopes, st.none() | durations),
    st.tuples(st.just("change"), ids, scopes, st.none() | states, st.none() | metadata,
              st.none() | st.integers(1, 4), durations),
    st.tuples(st.just("delete"), ids, scopes),
    st.tuples(st.just("list"), scopes, st.none() | states, st.none() | st.sampled_from(
        ["", "a", "b0", "c", "zz"]), st.integers(1, 4)),
    st.tuples(st.just("reap"), st.integers(0, 3), durations),
    st.tuples(st.just("counts")),
    st.tuples(st.just("wait"), durations),
)  # fmt: skip


async def apply(store: SessionStore, now: float, operation: tuple[Any, ...]) -> Any:
    """What `operation` answers on `store`: its result, or its error's type and details."""
    name, *args = operation
    try:
        if name == "create":
            session_id, user, state, ttl, data = args
            await store.create(record(session_id, user, state=state, ttl=ttl, expires=now + ttl,
                                      created=now, updated=now, metadata=data))  # fmt: skip
            return None
        if name == "get":
            return list(await store.get(*args))
        if name == "touch":
            touched, user, ttl = args
            return list(await store.touch(touched, user, now, ttl))
        if name == "change":
            session_id, user, state, data, version, retain = args
            return await store.change(session_id, user, now, state=state, metadata=data,
                                      expect_version=version, retain=retain)  # fmt: skip
        if name == "delete":
            return await store.delete(*args)
        if name == "list":
            return await every_page(store, *args)
        if name == "reap":
            return await store.reap(now, args[0], args[1])
        return dict(await store.counts())
    except IllegalTransition as error:
        return ("error", IllegalTransition, error.current, error.target)
    except Exception as error:  # the type is the answer
        return ("error", type(error))


async def every_page(
    store: SessionStore, user: str | None, state: SessionState | None, after: str | None,
    limit: int,
) -> tuple[list[SessionRecord], list[SessionRecord]]:
    """The first page, and every record met following `next` to the end."""
    first = await store.list(user=user, state=state, after=after, limit=limit)
    assert len(first.records) <= limit
    seen, page = list(first.records), first
    while page.next is not None:
        assert page.next == page.records[-1].id
        page = await store.list(user=user, state=state, after=page.next, limit=limit)
        seen += page.records
    return list(first.records), seen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations, min_size=1, max_size=40))
async def test_the_redis_store_answers_as_the_memory_store_does(
    steps: list[tuple[Any, ...]],
) -> None:
    """Any sequence of operations, on any records, users, states, times and metadata, gets
    the same answers from Redis as from the memory store: the same records (floats exact,
    metadata with bytes and 64-bit integers intact), the same errors, the same pages."""
    memory = MemorySessions()
    now = NOW
    async with open_store() as redis_store:
        with trio.fail_after(WAIT):
            for step in steps:
                if step[0] == "wait":
                    now += step[1]
                    continue
                expected = await apply(memory, now, step)
                assert await apply(redis_store, now, step) == expected, step


# --- Focused behaviours ----------------------------------------------------------------------


async def test_reap_takes_the_most_overdue_first_and_at_most_limit() -> None:
    """reap moves at most `limit` live sessions, the earliest expiries first; an ended
    session is purged once its retention (from its end) is over, not before."""
    async with open_store() as store:
        for n in range(5):
            await store.create(record(f"s{n}", expires=NOW + 10 - n))
        first = await store.reap(NOW + 20, limit=2, retain=30.0)
        assert [r.id for r in first.expired] == ["s4", "s3"]
        assert all(r.state == SessionState.EXPIRED and r.expires == NOW + 50 for r in first.expired)
        assert not first.purged
        assert not (await store.reap(NOW + 49, limit=10, retain=30.0)).purged
        later = await store.reap(NOW + 50, limit=10, retain=30.0)
        assert sorted(r.id for r in later.purged) == ["s3", "s4"]
        assert (await store.counts())[SessionState.EXPIRED] == 3


async def test_a_large_batch_is_one_answer_in_order(redis_server: RedisServer) -> None:
    """get and touch of 2,500 ids (more than one script call holds) answer in the order of the
    ids, absent ones as None, through one pipeline: three script calls (after redis-py's
    check that the scripts are loaded) and no command of their own."""
    async with open_store(settings_for(redis_server)) as store:
        names = [f"s{n:04}" for n in range(2500)]
        for name in names[::2]:
            await store.create(record(name))
        reset_stats(redis_server)
        touched = await store.touch(names[::-1], "alice", NOW + 5, ttl=100.0)
        calls = command_calls(redis_server)
        assert (calls["evalsha"], calls["script|exists"], calls["hmget"]) == (3, 1, 2500)
        assert [r.id if r else None for r in touched] == [
            name if n % 2 == 0 else None for n, name in reversed(list(enumerate(names)))
        ]
        assert {(r.expires, r.ttl, r.version) for r in touched if r} == {(NOW + 105, 100.0, 2)}
        got = await store.get(names, "alice")
        assert [r == t for r, t in zip(got, touched[::-1], strict=True) if r] == [True] * 1250


async def test_create_refuses_a_taken_id_of_any_user() -> None:
    """An id is taken whoever owns it; the existing record is unchanged."""
    async with open_store() as store:
        await store.create(record("s1", "alice"))
        for user in ("alice", "bob"):
            try:
                await store.create(record("s1", user, metadata={"other": True}))
            except SessionExists:
                pass
            else:
                raise AssertionError("a second create of s1 succeeded")
        assert await store.get(["s1"], None) == [record("s1", "alice")]


async def test_hostile_values_are_data_not_keys() -> None:
    """Ids, users and `after` cursors with key separators, glob and Lua pattern characters,
    NUL bytes and non-ASCII text are plain data: scoping and paging still hold."""
    users = ["a:b", "a", "*", "%d", "\x00", "é", "sessions:ids", ""]
    async with open_store() as store:
        for n, user in enumerate(users):
            await store.create(record(f"s{n}", user))
        for n, user in enumerate(users):
            page = await store.list(user=user, limit=10)
            assert [r.id for r in page.records] == [f"s{n}"]
            assert await store.get([f"s{n}", f"s{(n + 1) % len(users)}"], user) == [
                record(f"s{n}", user), None,
            ]
        page = await store.list(after="s3\x00*%", limit=100)
        assert [r.id for r in page.records] == [f"s{n}" for n in range(4, len(users))]


async def test_metadata_is_replaced_whole_and_kept_exactly() -> None:
    """change(metadata=) replaces the map; a touch leaves it as it was."""
    data = {"nested": {"list": [1, 2.5, None]}, "bytes": b"\x00\xff", "big": 2**64 - 1}
    async with open_store() as store:
        await store.create(record("s1"))
        changed = await store.change("s1", "alice", NOW + 1, metadata=data)
        assert changed.metadata == data
        (touched,) = await store.touch(["s1"], "alice", NOW + 2)
        assert touched is not None and touched.metadata == data and touched.version == 3


async def test_list_rejects_an_empty_page() -> None:
    async with open_store() as store:
        try:
            await store.list(limit=0)
        except ValueError as error:
            assert "at least one" in str(error)
        else:
            raise AssertionError("list(limit=0) answered")


async def test_the_redis_plugin_opens_its_session_store_from_the_configuration(
    redis_server: RedisServer,
) -> None:
    """[sessions] plugin = "redis" with [plugins.redis] opens a working RedisSessions through
    the plugin's factory, under the configured key prefix."""
    config = Config(
        sessions=SessionsConfig(plugin="redis"),
        plugins={"redis": {"url": redis_server.url, "key_prefix": "cfg:"}},
    )
    plugin = load_plugin(config.sessions.plugin)
    assert plugin.open_sessions is not None and plugin.open_presence is not None
    async with plugin.open_sessions(plugin_settings(config, plugin), config.sessions) as store:
        await store.create(record("s1"))
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.hget("cfg:session:s1", "user") == b"alice"


# --- When Redis goes away --------------------------------------------------------------------


async def every_call_is_unavailable(store: RedisSessions, within: float) -> None:
    """Each method raises StoreUnavailable, each within `within` seconds."""
    calls = [
        lambda: store.create(record("new")),
        lambda: store.get(["s1"], None),
        lambda: store.touch(["s1"], None, NOW),
        lambda: store.change("s1", None, NOW, state=SessionState.ACTIVE),
        lambda: store.delete("s1", None),
        lambda: store.list(),
        lambda: store.reap(NOW, 10, 0.0),
        lambda: store.counts(),
    ]
    for call in calls:
        with trio.fail_after(within):
            try:
                await call()
            except StoreUnavailable:
                continue
            raise AssertionError("a call succeeded with Redis away")


async def test_a_stopped_redis_is_unavailable_at_once_then_works_when_restarted_empty(
    redis_server: RedisServer,
) -> None:
    """Redis stopped: every call raises StoreUnavailable (connection refused: at once). Redis
    back, empty (its scripts gone too): the same store works again, from nothing."""
    async with open_store(settings_for(redis_server)) as store:
        await store.create(record("s1"))
        redis_server.stop()
        await every_call_is_unavailable(store, within=2.0)
        redis_server.start()
        with trio.fail_after(WAIT):
            assert await store.get(["s1"], None) == [None]
            await store.create(record("s1"))
            changed = await store.change("s1", "alice", NOW, state=SessionState.ACTIVE)
        assert changed.version == 2


async def test_redis_killed_mid_operation_then_restarted(redis_server: RedisServer) -> None:
    """Redis paused with a batch touch on its way, then killed: the touch raises
    StoreUnavailable (it never hangs), as does every call while Redis is gone; restarted
    empty, the store works again, single script calls and pipelines alike (both load the
    scripts again)."""
    settings = settings_for(redis_server, socket_timeout=5.0, connect_timeout=0.5)
    async with open_store(settings) as store:
        names = [f"s{n}" for n in range(3000)]
        for name in names[:10]:
            await store.create(record(name))
        redis_server.pause()
        failed = trio.Event()

        async def touch_everything() -> None:
            try:
                await store.touch(names, None, NOW + 1)
            except StoreUnavailable:
                failed.set()

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(touch_everything)
                await trio.sleep(0.2)  # the request reaches the paused server's socket
                redis_server.kill()
        assert failed.is_set()
        await every_call_is_unavailable(store, within=2.0)
        redis_server.start()
        with trio.fail_after(WAIT):
            assert await store.touch(names, None, NOW) == [None] * len(names)  # a pipeline
            await store.create(record("s0"))
            assert (await store.counts())[SessionState.PENDING] == 1


async def test_a_paused_redis_is_unavailable_within_the_socket_timeout(
    redis_server: RedisServer,
) -> None:
    """A Redis that accepts but never answers (SIGSTOP): each call gives up with
    StoreUnavailable after socket_timeout, never hangs."""
    settings = settings_for(redis_server, socket_timeout=0.3, connect_timeout=0.3)
    async with open_store(settings) as store:
        await store.create(record("s1"))
        redis_server.pause()
        try:
            await every_call_is_unavailable(store, within=2.0)
        finally:
            redis_server.resume()
        with trio.fail_after(WAIT):
            assert [r.id for r in await store.get(["s1"], None) if r] == ["s1"]
