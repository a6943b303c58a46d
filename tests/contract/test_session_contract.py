"""The SessionStore contract (mqbroker.sessions), checked against every registry backend.

Time is passed in (`now`): nothing here sleeps, and a reap "later" is a reap with a larger
`now`. Racing tests open two store instances on one backend, as two broker instances would.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from mqbroker.sessions import (
    ENDED,
    IllegalTransition,
    SessionExists,
    SessionNotFound,
    SessionRecord,
    SessionState,
    SessionStore,
    VersionConflict,
    can_transition,
)

from .backends import RegistryBackend

#: The longest any one test may take (a backend that hangs fails instead).
WAIT = 30.0
T0 = 1_700_000_000.0
TTL = 60.0
RETAIN = 300.0
#: How many times the racing tests race.
RACES = 20

P, A, S, E, I = (  # noqa: E741
    SessionState.PENDING,
    SessionState.ACTIVE,
    SessionState.SUSPENDED,
    SessionState.EXPIRED,
    SessionState.INVALIDATED,
)
#: A legal way from a new (pending) session to each state.
PATH_TO: dict[SessionState, tuple[SessionState, ...]] = {
    P: (), A: (A,), S: (A, S), E: (E,), I: (I,),
}  # fmt: skip

METADATA: dict[str, Any] = {
    "client": {"name": "ümlaut ☃ 😀", "versions": [1, 2.5, -3, 10**15], "ok": True},
    "nested": {"a": {"b": {"c": [None, False, "", {"d": []}]}}},
    "empty": {},
    "quote\"and\\slash": "line\nbreak\ttab",
}


def record(
    session_id: str,
    *,
    user: str = "alice",
    now: float = T0,
    ttl: float = TTL,
    metadata: dict[str, Any] | None = None,
) -> SessionRecord:
    """A new pending session, created at `now`."""
    return SessionRecord(
        id=session_id, user=user, state=P, created=now, updated=now, expires=now + ttl,
        ttl=ttl, metadata={} if metadata is None else metadata,
    )  # fmt: skip


@asynccontextmanager
async def stores(backend: RegistryBackend, count: int = 1) -> AsyncIterator[Sequence[SessionStore]]:
    """`count` instances on one fresh registry, the whole test bounded by WAIT."""
    with trio.fail_after(WAIT):
        async with backend.open_sessions(count) as opened:
            yield opened


@asynccontextmanager
async def store(backend: RegistryBackend) -> AsyncIterator[SessionStore]:
    async with stores(backend) as (one,):
        yield one


async def get_one(store: SessionStore, session_id: str, user: str | None = None) -> Any:
    (found,) = await store.get([session_id], user)
    return found


async def walk(store: SessionStore, session_id: str, states: Sequence[SessionState]) -> None:
    for n, state in enumerate(states):
        await store.change(session_id, None, T0 + n + 1, state=state, retain=RETAIN)


async def list_all(store: SessionStore, limit: int, **filters: Any) -> list[list[SessionRecord]]:
    """Every page of `list` with these filters, following `next` to the end."""
    pages: list[list[SessionRecord]] = []
    after: str | None = None
    while True:
        page = await store.list(after=after, limit=limit, **filters)
        assert len(page.records) <= limit
        pages.append(list(page.records))
        if page.next is None:
            return pages
        assert page.records and page.next == page.records[-1].id
        after = page.next


# --- create and get --------------------------------------------------------------------------


async def test_create_stores_the_record_as_given(registry_backend: RegistryBackend) -> None:
    """Every field comes back as created: nested JSON metadata, unicode, empty values."""
    given = [
        record("s1", metadata=METADATA),
        record("s2", user="bob ☃", metadata={}, ttl=0.5, now=T0 + 0.25),
        attrs.evolve(record("s.3_~-"), version=7, state=A),
    ]
    async with store(registry_backend) as sessions:
        for one in given:
            await sessions.create(one)
        assert list(await sessions.get([r.id for r in given], None)) == given


async def test_create_an_existing_id_raises_session_exists(
    registry_backend: RegistryBackend,
) -> None:
    """An id is taken whoever owns it; the first record stays as it was."""
    async with store(registry_backend) as sessions:
        first = record("s1", metadata={"n": 1})
        await sessions.create(first)
        for again in (record("s1"), record("s1", user="bob")):
            with pytest.raises(SessionExists):
                await sessions.create(again)
        assert await get_one(sessions, "s1") == first


async def test_get_answers_in_the_order_asked_with_none_for_absent(
    registry_backend: RegistryBackend,
) -> None:
    """A batch, in the order of `ids` (repeats too), None where no record is."""
    async with store(registry_backend) as sessions:
        created = {n: record(f"s{n}") for n in range(5)}
        for one in created.values():
            await sessions.create(one)
        asked = ["s3", "nope", "s0", "s3", "s4", "also-nope"]
        expected = [created[3], None, created[0], created[3], created[4], None]
        assert list(await sessions.get(asked, "alice")) == expected
        assert list(await sessions.get([], "alice")) == []


async def test_get_is_scoped_by_user(registry_backend: RegistryBackend) -> None:
    """Another user's session is None; user=None sees every user's."""
    async with store(registry_backend) as sessions:
        mine, theirs = record("a1"), record("b1", user="bob")
        await sessions.create(mine)
        await sessions.create(theirs)
        assert list(await sessions.get(["a1", "b1"], "alice")) == [mine, None]
        assert list(await sessions.get(["a1", "b1"], "bob")) == [None, theirs]
        assert list(await sessions.get(["a1", "b1"], None)) == [mine, theirs]
        assert list(await sessions.get(["a1"], "")) == [None]


# --- touch -----------------------------------------------------------------------------------


async def test_touch_extends_live_sessions(registry_backend: RegistryBackend) -> None:
    """expires = now + ttl, updated = now, one more version; the ttl stays unless given."""
    async with store(registry_backend) as sessions:
        for n in range(3):
            await sessions.create(record(f"s{n}"))
        await walk(sessions, "s1", [A])
        await walk(sessions, "s2", [A, S])
        before = await sessions.get(["s0", "s1", "s2"], None)
        now = T0 + 50
        touched = await sessions.touch(["s0", "s1", "s2"], "alice", now)
        assert list(touched) == [
            attrs.evolve(old, expires=now + TTL, updated=now, version=old.version + 1)
            for old in before if old is not None
        ]
        assert list(await sessions.get(["s0", "s1", "s2"], None)) == list(touched)


async def test_touch_with_a_ttl_sets_it(registry_backend: RegistryBackend) -> None:
    """A touch with `ttl` keeps it for the touches after."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("s1"))
        (first,) = await sessions.touch(["s1"], None, T0 + 10, ttl=1000.0)
        assert first is not None
        assert (first.ttl, first.expires, first.version) == (1000.0, T0 + 1010, 2)
        (second,) = await sessions.touch(["s1"], None, T0 + 20)
        assert second is not None
        assert (second.ttl, second.expires, second.version) == (1000.0, T0 + 1020, 3)


async def test_touch_answers_none_for_ended_absent_and_others_sessions(
    registry_backend: RegistryBackend,
) -> None:
    """Only live sessions of the user are touched; the others are left exactly as they were."""
    async with store(registry_backend) as sessions:
        for name in ("live", "expired", "invalidated"):
            await sessions.create(record(name))
        await sessions.create(record("bobs", user="bob"))
        await walk(sessions, "expired", [E])
        await walk(sessions, "invalidated", [I])
        ids = ["expired", "nope", "live", "invalidated", "bobs"]
        before = await sessions.get(ids, None)
        touched = await sessions.touch(ids, "alice", T0 + 30)
        assert [t is not None for t in touched] == [False, False, True, False, False]
        after = await sessions.get(ids, None)
        assert [a for n, a in enumerate(after) if n != 2] == [
            b for n, b in enumerate(before) if n != 2
        ]
        assert list(await sessions.touch([], "alice", T0)) == []


# --- change ----------------------------------------------------------------------------------


async def test_every_sequence_of_transitions_follows_can_transition(
    registry_backend: RegistryBackend,
) -> None:
    """Every sequence of up to three target states from pending: each change succeeds exactly
    when `can_transition` allows it, raises IllegalTransition otherwise (naming both states)
    and leaves the record as it was; a success is one more version at `updated = now`, and an
    ended state sets `expires = now + retain`."""
    sequences = [
        seq for length in (1, 2, 3) for seq in itertools.product(SessionState, repeat=length)
    ]
    async with store(registry_backend) as sessions:
        for n, sequence in enumerate(sequences):
            session_id = f"seq{n}"
            expected = record(session_id)
            await sessions.create(expected)
            for step, target in enumerate(sequence):
                now = T0 + step + 1
                if can_transition(expected.state, target):
                    got = await sessions.change(
                        session_id, "alice", now, state=target, retain=RETAIN
                    )
                    expected = attrs.evolve(
                        expected, state=target, updated=now, version=expected.version + 1
                    )
                    if target in ENDED:
                        expected = attrs.evolve(expected, expires=now + RETAIN)
                    assert got == expected, (sequence, step)
                else:
                    with pytest.raises(IllegalTransition) as raised:
                        await sessions.change(session_id, "alice", now, state=target)
                    assert (raised.value.current, raised.value.target) == (
                        expected.state, target,
                    )  # fmt: skip
                    assert raised.value.code == "illegal_transition"
                assert await get_one(sessions, session_id) == expected, (sequence, step)


async def test_the_transition_table(registry_backend: RegistryBackend) -> None:
    """From each state, to each state: the store agrees with `can_transition` (which allows
    pending -> active -> suspended -> active and live -> ended, and nothing else)."""
    legal = {(P, A), (A, S), (S, A)} | {(a, b) for a in (P, A, S) for b in ENDED}
    assert {(a, b) for a in SessionState for b in SessionState if can_transition(a, b)} == legal
    async with store(registry_backend) as sessions:
        for current, target in itertools.product(SessionState, repeat=2):
            session_id = f"{current}-{target}"
            await sessions.create(record(session_id))
            await walk(sessions, session_id, PATH_TO[current])
            try:
                changed = await sessions.change(session_id, None, T0 + 10, state=target)
            except IllegalTransition:
                assert (current, target) not in legal
            else:
                assert (current, target) in legal
                assert changed.state == target


async def test_change_replaces_the_metadata(registry_backend: RegistryBackend) -> None:
    """Metadata is replaced whole (never merged), round-trips any JSON value, and leaves the
    state alone; state and metadata can change together, in one version."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("s1", metadata={"keep": "no", "x": 1}))
        changed = await sessions.change("s1", "alice", T0 + 1, metadata=METADATA)
        assert (changed.metadata, changed.state, changed.version) == (METADATA, P, 2)
        assert changed.updated == T0 + 1
        assert await get_one(sessions, "s1") == changed
        emptied = await sessions.change("s1", "alice", T0 + 2, metadata={})
        assert (emptied.metadata, emptied.version) == ({}, 3)
        both = await sessions.change("s1", None, T0 + 3, state=A, metadata={"é": ["ü"]})
        assert (both.state, both.metadata, both.version) == (A, {"é": ["ü"]}, 4)
        assert await get_one(sessions, "s1") == both


async def test_change_of_an_absent_or_anothers_session_is_not_found(
    registry_backend: RegistryBackend,
) -> None:
    """SessionNotFound, whatever the change, and another user's session stays unchanged."""
    async with store(registry_backend) as sessions:
        bobs = record("b1", user="bob")
        await sessions.create(bobs)
        for session_id, user in (("nope", None), ("nope", "alice"), ("b1", "alice")):
            with pytest.raises(SessionNotFound) as raised:
                await sessions.change(session_id, user, T0 + 1, state=A, expect_version=1)
            assert raised.value.code == "session_not_found"
        assert await get_one(sessions, "b1") == bobs


async def test_expect_version(registry_backend: RegistryBackend) -> None:
    """The change applies when the version matches; otherwise VersionConflict and nothing
    changes, even for a change that would be legal."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("s1"))
        for wrong in (0, 2, 99):
            with pytest.raises(VersionConflict) as raised:
                await sessions.change("s1", None, T0 + 1, state=A, expect_version=wrong)
            assert raised.value.code == "version_conflict"
        assert await get_one(sessions, "s1") == record("s1")
        changed = await sessions.change("s1", None, T0 + 1, state=A, expect_version=1)
        assert changed.version == 2
        with pytest.raises(VersionConflict):
            await sessions.change("s1", None, T0 + 2, metadata={"a": 1}, expect_version=1)
        again = await sessions.change("s1", None, T0 + 2, metadata={"a": 1}, expect_version=2)
        assert (again.version, again.metadata, again.state) == (3, {"a": 1}, A)


# --- delete ----------------------------------------------------------------------------------


async def test_delete_removes_at_once_and_returns_the_record(
    registry_backend: RegistryBackend,
) -> None:
    """The last record comes back; then the id is free. Absent or another's: None, untouched."""
    async with store(registry_backend) as sessions:
        mine, bobs = record("a1", metadata=METADATA), record("b1", user="bob")
        await sessions.create(mine)
        await sessions.create(bobs)
        assert await sessions.delete("b1", "alice") is None
        assert await sessions.delete("nope", None) is None
        assert await sessions.delete("a1", "alice") == mine
        assert await get_one(sessions, "a1") is None
        assert await sessions.delete("a1", "alice") is None
        assert await sessions.delete("b1", None) == bobs
        await sessions.create(record("a1", user="carol"))  # the id is free again
        assert (await get_one(sessions, "a1")).user == "carol"


# --- list ------------------------------------------------------------------------------------


async def _populate(sessions: SessionStore) -> list[SessionRecord]:
    """37 sessions of three users in every state, created out of id order."""
    users = ("alice", "bob", "carol")
    states = list(SessionState)
    for n in reversed(range(37)):
        session_id = f"s{n:03d}"
        await sessions.create(record(session_id, user=users[n % 3], metadata={"n": n}))
        await walk(sessions, session_id, PATH_TO[states[n % 5]])
    page = await sessions.list(limit=1000)
    assert page.next is None
    return list(page.records)


@pytest.mark.parametrize("limit", [1, 5, 37, 1000])
async def test_list_pages_through_every_record_once_in_id_order(
    registry_backend: RegistryBackend, limit: int
) -> None:
    """Following `next` yields every record exactly once, in id order, at most `limit` a page,
    and `next` is None exactly on the last page (none empty unless nothing matches)."""
    async with store(registry_backend) as sessions:
        everything = await _populate(sessions)
        assert [r.id for r in everything] == sorted(f"s{n:03d}" for n in range(37))
        assert everything == list(await sessions.get([r.id for r in everything], None))
        pages = await list_all(sessions, limit)
        assert [r for page in pages for r in page] == everything
        assert len(pages) == -(-37 // limit)
        assert all(len(page) == limit for page in pages[:-1])


@pytest.mark.parametrize("limit", [1, 3, 100])
async def test_list_filters_by_user_and_state(
    registry_backend: RegistryBackend, limit: int
) -> None:
    """Each filter, and both together, page through exactly the matching records; the last
    page says so (no trailing empty page), and a filter nothing matches is one empty page."""
    async with store(registry_backend) as sessions:
        everything = await _populate(sessions)
        for user, state in itertools.product(("alice", "bob", "dave", None), (*SessionState, None)):
            expected = [
                r for r in everything
                if (user is None or r.user == user) and (state is None or r.state == state)
            ]  # fmt: skip
            pages = await list_all(sessions, limit, user=user, state=state)
            assert [r for page in pages for r in page] == expected, (user, state)
            assert len(pages) == max(1, -(-len(expected) // limit)), (user, state)


async def test_list_after_starts_after_that_id_even_when_it_is_gone(
    registry_backend: RegistryBackend,
) -> None:
    """`after` is a position in id order, not a record: deleting it between pages loses nothing."""
    async with store(registry_backend) as sessions:
        everything = await _populate(sessions)
        first = await sessions.list(limit=10)
        assert first.next == "s009"
        await sessions.delete("s009", None)
        rest = await sessions.list(after=first.next, limit=1000)
        assert list(rest.records) == everything[10:]
        assert list((await sessions.list(after="s0105", limit=2)).records) == everything[11:13]
        assert (await sessions.list(after="z", limit=5)).records == []


# --- reap ------------------------------------------------------------------------------------


async def test_reap_expires_live_sessions_past_their_expiry_once(
    registry_backend: RegistryBackend,
) -> None:
    """Live sessions with expires <= now become EXPIRED (expires = now + retain, one more
    version, updated = now), each once; later ones and ended ones are left alone."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("due", ttl=10))  # expires T0 + 10
        await sessions.create(record("due-active", ttl=5))
        await walk(sessions, "due-active", [A])
        await sessions.create(record("boundary", ttl=20))  # expires exactly at the reap
        await sessions.create(record("later", ttl=21))
        await sessions.create(record("gone", ttl=1))
        await walk(sessions, "gone", [I])  # ended at T0 + 1: purged at T0 + 1 + RETAIN
        before = {r.id: r for r in (await sessions.list(limit=100)).records}
        now = T0 + 20
        reaped = await sessions.reap(now, 100, RETAIN)
        assert reaped.purged == []
        assert sorted(reaped.expired, key=lambda r: r.id) == [
            attrs.evolve(before[i], state=E, expires=now + RETAIN, updated=now,
                         version=before[i].version + 1)
            for i in ("boundary", "due", "due-active")
        ]  # fmt: skip
        for one in reaped.expired:
            assert await get_one(sessions, one.id) == one
        again = await sessions.reap(now + 0.5, 100, RETAIN)
        assert (again.expired, again.purged) == ([], [])
        assert await get_one(sessions, "later") == before["later"]


async def test_reap_purges_ended_sessions_after_their_retention(
    registry_backend: RegistryBackend,
) -> None:
    """An ended session is kept until its expires (now + retain when it ended), then removed
    by one reap, which returns its last record."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("invalidated"))
        invalidated = await sessions.change("invalidated", None, T0 + 5, state=I, retain=100)
        await sessions.create(record("expired", ttl=10))
        (expired,) = (await sessions.reap(T0 + 10, 10, 50)).expired
        assert (invalidated.expires, expired.expires) == (T0 + 105, T0 + 60)
        assert (await sessions.reap(T0 + 59, 10, 50)).purged == []
        assert list((await sessions.reap(T0 + 60, 10, 50)).purged) == [expired]
        assert list((await sessions.reap(T0 + 200, 10, 50)).purged) == [invalidated]
        assert list(await sessions.get(["expired", "invalidated"], None)) == [None, None]
        assert (await sessions.reap(T0 + 10**6, 10, 50)).purged == []


async def test_reap_is_bounded_by_limit(registry_backend: RegistryBackend) -> None:
    """At most `limit` expired and `limit` purged per reap; repeated reaps finish the work,
    each session expired once and purged once."""
    async with store(registry_backend) as sessions:
        for n in range(23):
            await sessions.create(record(f"s{n:02d}", ttl=1 + n % 4))
        expired: list[str] = []
        while reaped := (await sessions.reap(T0 + 10, 5, 1)).expired:
            assert len(reaped) <= 5
            expired.extend(r.id for r in reaped)
        assert sorted(expired) == [f"s{n:02d}" for n in range(23)]
        purged: list[str] = []
        while True:
            reaped_now = await sessions.reap(T0 + 11, 4, 1)
            assert len(reaped_now.purged) <= 4 and reaped_now.expired == []
            if not reaped_now.purged:
                break
            purged.extend(r.id for r in reaped_now.purged)
        assert sorted(purged) == sorted(expired)
        assert (await sessions.list()).records == []


async def test_touched_sessions_are_not_reaped(registry_backend: RegistryBackend) -> None:
    """A touch moves the expiry: the reap at the old expiry passes the session over, the
    reap at the new one expires it."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("s1", ttl=10))
        await sessions.create(record("s2", ttl=10))
        for n in range(1, 6):
            await sessions.touch(["s1"], None, T0 + n)  # now expires T0 + 15
        reaped = await sessions.reap(T0 + 12, 10, RETAIN)
        assert [r.id for r in reaped.expired] == ["s2"]
        assert (await get_one(sessions, "s1")).state == P
        reaped = await sessions.reap(T0 + 15, 10, RETAIN)
        assert [r.id for r in reaped.expired] == ["s1"]


async def test_an_expiry_brought_forward_is_reaped_at_the_new_time(
    registry_backend: RegistryBackend,
) -> None:
    """A touch with a shorter ttl, or an ending, moves the store's next action earlier."""
    async with store(registry_backend) as sessions:
        await sessions.create(record("shorter", ttl=1000))
        await sessions.create(record("ended", ttl=1000))
        await sessions.touch(["shorter"], None, T0 + 1, ttl=5)
        await sessions.change("ended", None, T0 + 1, state=I, retain=10)
        reaped = await sessions.reap(T0 + 11, 10, RETAIN)
        assert [r.id for r in reaped.expired] == ["shorter"]
        assert [r.id for r in reaped.purged] == ["ended"]


# --- counts ----------------------------------------------------------------------------------


async def test_counts_every_state(registry_backend: RegistryBackend) -> None:
    """The number of records in each state, every state present (zeros too)."""
    async with store(registry_backend) as sessions:
        assert dict(await sessions.counts()) == dict.fromkeys(SessionState, 0)
        everything = await _populate(sessions)
        assert dict(await sessions.counts()) == {
            state: sum(r.state == state for r in everything) for state in SessionState
        }
        await sessions.delete("s000", None)
        counts = await sessions.counts()
        assert set(counts) == set(SessionState)
        assert sum(counts.values()) == 36


# --- racing instances ------------------------------------------------------------------------


async def race(*calls: Any) -> list[Any]:
    """Run the calls at once; each one's result or exception, in order."""
    outcomes: list[Any] = [None] * len(calls)

    async def one(index: int) -> None:
        try:
            outcomes[index] = await calls[index]()
        except Exception as error:
            outcomes[index] = error

    async with trio.open_nursery() as nursery:
        for index in range(len(calls)):
            nursery.start_soon(one, index)
    return outcomes


async def test_racing_identical_transitions_one_wins(registry_backend: RegistryBackend) -> None:
    """Two instances making the same change at once, RACES times: exactly one succeeds, the
    other raises IllegalTransition (it saw the first's result)."""
    async with stores(registry_backend, 2) as (a, b):
        for n in range(RACES):
            session_id = f"r{n}"
            await a.create(record(session_id))
            for target in (A, S, A, I):
                outcomes = await race(
                    *(partial(s.change, session_id, None, T0 + 1, state=target)
                      for s in (a, b, a, b))
                )  # fmt: skip
                wins = [o for o in outcomes if isinstance(o, SessionRecord)]
                assert len(wins) == 1, outcomes
                assert all(isinstance(o, IllegalTransition) for o in outcomes if o not in wins)
            assert (await get_one(b, session_id)).version == 5


async def test_racing_expect_version_one_wins(registry_backend: RegistryBackend) -> None:
    """Compare-and-set through several instances: exactly one change per version applies."""
    async with stores(registry_backend, 2) as (a, b):
        await a.create(record("s1"))
        for version in range(1, RACES + 1):
            outcomes = await race(
                *(partial(s.change, "s1", None, T0 + version, metadata={"by": n},
                          expect_version=version)
                  for n, s in enumerate((a, b, a, b)))
            )  # fmt: skip
            wins = [o for o in outcomes if isinstance(o, SessionRecord)]
            assert len(wins) == 1, outcomes
            assert all(isinstance(o, VersionConflict) for o in outcomes if o not in wins)
        assert (await get_one(a, "s1")).version == RACES + 1


async def test_racing_creates_of_one_id_one_wins(registry_backend: RegistryBackend) -> None:
    """Creating one id through several instances at once: one record, the others
    SessionExists."""
    async with stores(registry_backend, 2) as (a, b):
        for n in range(RACES):
            outcomes = await race(
                *(partial(s.create, record(f"c{n}", user=u))
                  for s, u in ((a, "alice"), (b, "bob"), (a, "carol")))
            )  # fmt: skip
            assert sum(o is None for o in outcomes) == 1, outcomes
            assert sum(isinstance(o, SessionExists) for o in outcomes) == 2, outcomes


async def test_racing_touches_and_changes_lose_no_version(
    registry_backend: RegistryBackend,
) -> None:
    """Touches and metadata changes through two instances at once: every one applies, each to
    the result of the ones before (the version counts them all)."""
    async with stores(registry_backend, 2) as (a, b):
        await a.create(record("s1"))
        calls = [
            *(partial(s.touch, ["s1"], None, T0 + 1) for s in (a, b) * RACES),
            *(partial(s.change, "s1", None, T0 + 1, metadata={"x": 1}) for s in (a, b) * 5),
        ]
        outcomes = await race(*calls)
        assert not [o for o in outcomes if isinstance(o, Exception)]
        assert (await get_one(b, "s1")).version == 1 + len(calls)


async def test_racing_reapers_reap_each_record_once(registry_backend: RegistryBackend) -> None:
    """Instances reaping at once, in small batches: every due session is expired by exactly
    one of them, then purged by exactly one."""
    count = 60
    async with stores(registry_backend, 2) as (a, b):
        for n in range(count):
            await a.create(record(f"s{n:02d}", ttl=n % 7))
        await a.create(record("not-yet", ttl=1000))
        expired: Counter[str] = Counter()
        purged: Counter[str] = Counter()

        async def reaper(store: SessionStore, now: float) -> None:
            while True:
                reaped = await store.reap(now, 3, 5)
                expired.update(r.id for r in reaped.expired)
                purged.update(r.id for r in reaped.purged)
                if not reaped.expired and not reaped.purged:
                    return

        for now in (T0 + 10, T0 + 20):
            async with trio.open_nursery() as nursery:
                for one in (a, b, a, b):
                    nursery.start_soon(reaper, one, now)
        assert expired == Counter(f"s{n:02d}" for n in range(count))
        assert purged == expired
        assert [r.id for r in (await b.list()).records] == ["not-yet"]


async def test_any_text_round_trips(registry_backend: RegistryBackend) -> None:
    """Users and metadata are data, never SQL or keys: quotes, NUL, escapes and non-BMP
    characters come back as given and scope lookups exactly."""
    odd_user = "o'brien\"; DROP TABLE x; --\x00 ☃ 😀 \\ %s ?"
    metadata = {"\x00key": "nul \x00 in value", "'": ["%s", "?", "\\u0000"], "": ""}
    async with store(registry_backend) as sessions:
        given = record("s1", user=odd_user, metadata=metadata)
        await sessions.create(given)
        await sessions.create(record("s2", user="o'brien"))
        assert await get_one(sessions, "s1", odd_user) == given
        assert await get_one(sessions, "s1", "o'brien") is None
        assert [r.id for r in (await sessions.list(user=odd_user)).records] == ["s1"]
        changed = await sessions.change("s1", odd_user, T0 + 1, metadata={"\x00": "\x00"})
        assert await get_one(sessions, "s1") == changed
