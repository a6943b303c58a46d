"""The PresenceStore contract (mqbroker.sessions), checked against every registry backend.

Time is passed in (`now`): nothing sleeps. Racing tests open two store instances on one
backend, as two broker instances would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from mqbroker.sessions import PresenceEntry, PresenceStore

from .backends import RegistryBackend

WAIT = 30.0
T0 = 1_700_000_000.0


def entry(
    session: str, instance: str, connection: str, expires: float = T0 + 15, **fields: str | None
) -> PresenceEntry:
    return PresenceEntry(
        session=session, instance=instance, connection=connection, expires=expires, **fields
    )  # type: ignore[arg-type]


@asynccontextmanager
async def stores(
    backend: RegistryBackend, count: int = 1
) -> AsyncIterator[Sequence[PresenceStore]]:
    """`count` instances on one fresh registry, the whole test bounded by WAIT."""
    with trio.fail_after(WAIT):
        async with backend.open_presence(count) as opened:
            yield opened


@asynccontextmanager
async def store(backend: RegistryBackend) -> AsyncIterator[PresenceStore]:
    async with stores(backend) as (one,):
        yield one


async def test_announce_then_query_in_instance_connection_order(
    registry_backend: RegistryBackend,
) -> None:
    """A session's entries come back ordered by (instance, connection), every field intact,
    and only that session's."""
    given = [
        entry("s1", "i2", "c1", client="ünï ☃", principal="alice"),
        entry("s1", "i1", "c9", client="", principal=None),
        entry("s1", "i1", "c10"),
        entry("s2", "i1", "c1"),
        entry("s1", "i10", "c0", expires=T0 + 1000),
    ]
    async with store(registry_backend) as presence:
        await presence.announce(given[:2])
        await presence.announce(given[2:])
        assert list(await presence.query("s1", T0)) == sorted(
            (e for e in given if e.session == "s1"), key=lambda e: (e.instance, e.connection)
        )
        assert list(await presence.query("s2", T0)) == [given[3]]
        assert list(await presence.query("nobody", T0)) == []
        await presence.announce([])


async def test_announce_again_refreshes_the_entry(registry_backend: RegistryBackend) -> None:
    """One entry per (session, instance, connection): the latest announce replaces it."""
    async with store(registry_backend) as presence:
        first = entry("s1", "i1", "c1", expires=T0 + 15, client="a")
        await presence.announce([first])
        refreshed = attrs.evolve(first, expires=T0 + 30, client="b", principal="p")
        await presence.announce([refreshed])
        assert list(await presence.query("s1", T0 + 20)) == [refreshed]


async def test_query_leaves_out_what_has_expired(registry_backend: RegistryBackend) -> None:
    """Only entries with expires > now: an entry is gone at its expiry, reaped or not."""
    async with store(registry_backend) as presence:
        await presence.announce([entry("s1", "i1", "a", T0 + 10), entry("s1", "i1", "b", T0 + 20)])
        assert [e.connection for e in await presence.query("s1", T0 + 9.5)] == ["a", "b"]
        assert [e.connection for e in await presence.query("s1", T0 + 10)] == ["b"]
        assert [e.connection for e in await presence.query("s1", T0 + 20)] == []


async def test_withdraw_removes_at_once(registry_backend: RegistryBackend) -> None:
    """Withdrawn entries are gone from queries and reaps; unknown keys are no error."""
    async with store(registry_backend) as presence:
        entries = [entry("s1", "i1", "a"), entry("s1", "i1", "b"), entry("s2", "i1", "a")]
        await presence.announce(entries)
        await presence.withdraw([("s1", "i1", "a"), ("s2", "i1", "a"), ("s9", "x", "y")])
        assert list(await presence.query("s1", T0)) == [entries[1]]
        assert list(await presence.query("s2", T0)) == []
        await presence.withdraw([])
        assert list(await presence.reap(T0 + 100, 10)) == [entries[1]]


async def test_reap_removes_expired_entries_once_bounded_by_limit(
    registry_backend: RegistryBackend,
) -> None:
    """At most `limit` entries with expires <= now per reap, each returned once; entries
    announced again since are not reaped."""
    async with store(registry_backend) as presence:
        entries = [entry(f"s{n % 3}", f"i{n % 2}", f"c{n}", T0 + n % 5) for n in range(20)]
        await presence.announce(entries)
        await presence.announce([attrs.evolve(entries[0], expires=T0 + 100)])
        reaped: list[PresenceEntry] = []
        while batch := await presence.reap(T0 + 4, 3):
            assert len(batch) <= 3
            reaped.extend(batch)
        key = lambda e: e.key  # noqa: E731
        assert sorted(reaped, key=key) == sorted(entries[1:], key=key)
        assert list(await presence.reap(T0 + 99, 10)) == []
        assert [e.connection for e in await presence.query("s0", T0 + 99)] == ["c0"]
        refreshed = attrs.evolve(entries[0], expires=T0 + 100)
        assert list(await presence.reap(T0 + 100, 10)) == [refreshed]


async def test_instances_share_entries(registry_backend: RegistryBackend) -> None:
    """What one instance announces, another sees and can withdraw."""
    async with stores(registry_backend, 2) as (a, b):
        await a.announce([entry("s1", "ia", "c1")])
        await b.announce([entry("s1", "ib", "c1")])
        assert [e.instance for e in await b.query("s1", T0)] == ["ia", "ib"]
        await b.withdraw([("s1", "ia", "c1")])
        assert [e.instance for e in await a.query("s1", T0)] == ["ib"]


async def test_racing_reapers_report_each_entry_once(registry_backend: RegistryBackend) -> None:
    """Instances reaping at once, in small batches: each expired entry is reported by exactly
    one of them (so exactly one publishes its leave)."""
    async with stores(registry_backend, 2) as (a, b):
        entries = [entry(f"s{n % 4}", f"i{n % 3}", f"c{n}", T0 + n % 3) for n in range(60)]
        await a.announce(entries[:30])
        await b.announce(entries[30:])
        await a.announce([entry("s0", "live", "c", T0 + 1000)])
        reported: Counter[tuple[str, str, str]] = Counter()

        async def reaper(presence: PresenceStore) -> None:
            while batch := await presence.reap(T0 + 5, 4):
                reported.update(e.key for e in batch)

        async with trio.open_nursery() as nursery:
            for one in (a, b, a, b):
                nursery.start_soon(reaper, one)
        assert reported == Counter(e.key for e in entries)
        assert [e.instance for e in await b.query("s0", T0 + 5)] == ["live"]


async def test_any_client_name_round_trips(registry_backend: RegistryBackend) -> None:
    """A client's name is whatever its hello said: quotes, NUL and escapes come back as given."""
    async with store(registry_backend) as presence:
        odd = entry("s1", "i1", "c1", client="x'\"\x00\\%s?😀", principal="p\x00'")
        await presence.announce([odd])
        assert list(await presence.query("s1", T0)) == [odd]
