"""The in-memory session and presence stores: the registry of a single broker instance.

Every operation is synchronous underneath (one process, one trio thread: nothing interleaves
inside a method), so the atomicity the contract asks for comes for free. Indexes keep each
operation cheap at 100,000s of sessions: ids in sorted lists (all, and per user) for paging,
and a heap of (expires, id) for the reaper. The heap is rescheduled lazily: a touch that
extends a session pushes nothing (the reaper, finding the session extended when its old entry
comes up, pushes the new time), so the heap holds about one entry per session however often
sessions are touched.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from mqbroker.sessions import (
    PresenceEntry,
    PresenceKey,
    Reaped,
    SessionExists,
    SessionNotFound,
    SessionPage,
    SessionRecord,
    SessionState,
    apply_change,
)


class MemorySessions:
    """A `SessionStore` in this process's memory."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._ids: list[str] = []  # sorted
        self._ids_of_user: dict[str, list[str]] = {}  # sorted, per user
        self._due: list[tuple[float, str]] = []  # (expires, id) heap; stale entries skipped

    async def create(self, record: SessionRecord) -> None:
        await trio.lowlevel.checkpoint()
        if record.id in self._records:
            raise SessionExists(f"session {record.id!r} exists")
        self._put(attrs.evolve(record, metadata=dict(record.metadata)))
        insort(self._ids, record.id)
        insort(self._ids_of_user.setdefault(record.user, []), record.id)

    async def get(self, ids: Sequence[str], user: str | None) -> Sequence[SessionRecord | None]:
        await trio.lowlevel.checkpoint()
        return [self._find(session_id, user) for session_id in ids]

    async def touch(
        self, ids: Sequence[str], user: str | None, now: float, ttl: float | None = None
    ) -> Sequence[SessionRecord | None]:
        await trio.lowlevel.checkpoint()
        touched: list[SessionRecord | None] = []
        for session_id in ids:
            record = self._find(session_id, user)
            if record is None or record.ended:
                touched.append(None)
                continue
            period = record.ttl if ttl is None else ttl
            touched.append(self._put(attrs.evolve(
                record, ttl=period, expires=now + period, updated=now, version=record.version + 1
            )))
        return touched

    async def change(
        self,
        session_id: str,
        user: str | None,
        now: float,
        *,
        state: SessionState | None = None,
        metadata: Mapping[str, Any] | None = None,
        expect_version: int | None = None,
        retain: float = 0.0,
    ) -> SessionRecord:
        await trio.lowlevel.checkpoint()
        record = self._find(session_id, user)
        if record is None:
            raise SessionNotFound(f"no session {session_id!r}")
        changed = apply_change(
            record, now, state=state, metadata=metadata, expect_version=expect_version,
            retain=retain,
        )  # fmt: skip
        return self._put(changed)

    async def delete(self, session_id: str, user: str | None) -> SessionRecord | None:
        await trio.lowlevel.checkpoint()
        record = self._find(session_id, user)
        if record is not None:
            self._remove(record)
        return record

    async def list(
        self,
        *,
        user: str | None = None,
        state: SessionState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> SessionPage:
        await trio.lowlevel.checkpoint()
        ids = self._ids if user is None else self._ids_of_user.get(user, [])
        start = 0 if after is None else bisect_right(ids, after)
        records: list[SessionRecord] = []
        for session_id in ids[start:]:
            record = self._records[session_id]
            if state is None or record.state == state:
                records.append(record)
                if len(records) > limit:  # one more than a page: proof a next page exists
                    break
        more = len(records) > limit
        del records[limit:]
        return SessionPage(records=records, next=records[-1].id if more else None)

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        await trio.lowlevel.checkpoint()
        expired: list[SessionRecord] = []
        purged: list[SessionRecord] = []
        while self._due and self._due[0][0] <= now and min(len(expired), len(purged)) < limit:
            expires, session_id = heapq.heappop(self._due)
            record = self._records.get(session_id)
            if record is None or record.expires < expires:
                continue  # removed, or an earlier entry was pushed and handled since
            if record.expires > expires:
                heapq.heappush(self._due, (record.expires, session_id))  # extended since
                continue
            if record.ended:
                if len(purged) < limit:
                    self._remove(record)
                    purged.append(record)
                    continue
            elif len(expired) < limit:
                expired.append(self._put(attrs.evolve(
                    record, state=SessionState.EXPIRED, expires=now + retain, updated=now,
                    version=record.version + 1,
                )))
                heapq.heappush(self._due, (now + retain, session_id))  # its purge
                continue
            heapq.heappush(self._due, (expires, session_id))  # over this kind's limit: later
            break
        return Reaped(expired=expired, purged=purged)

    async def counts(self) -> Mapping[SessionState, int]:
        await trio.lowlevel.checkpoint()
        counts = dict.fromkeys(SessionState, 0)
        for record in self._records.values():
            counts[record.state] += 1
        return counts

    def _find(self, session_id: str, user: str | None) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is None or (user is not None and record.user != user):
            return None
        return record

    def _put(self, record: SessionRecord) -> SessionRecord:
        previous = self._records.get(record.id)
        self._records[record.id] = record
        if previous is None or record.expires < previous.expires:
            heapq.heappush(self._due, (record.expires, record.id))  # later ones: see reap
        return record

    def _remove(self, record: SessionRecord) -> None:
        del self._records[record.id]
        _discard_sorted(self._ids, record.id)
        user_ids = self._ids_of_user[record.user]
        _discard_sorted(user_ids, record.id)
        if not user_ids:
            del self._ids_of_user[record.user]


def _discard_sorted(ids: list[str], session_id: str) -> None:
    index = bisect_left(ids, session_id)
    if index < len(ids) and ids[index] == session_id:
        del ids[index]


class MemoryPresence:
    """A `PresenceStore` in this process's memory (one instance: nothing else announces).

    Lean for many sessions each with one entry: such a session maps to its entry alone (a
    dict of (instance, connection) -> entry only for a session with several), and the reaper's
    heap holds flat (expires, session, instance, connection) tuples."""

    def __init__(self) -> None:
        self._entries: dict[str, PresenceEntry | dict[tuple[str, str], PresenceEntry]] = {}
        self._due: list[tuple[float, str, str, str]] = []

    async def announce(self, entries: Sequence[PresenceEntry]) -> None:
        await trio.lowlevel.checkpoint()
        for entry in entries:
            previous = self._get(entry.key)
            self._put(entry)
            if previous is None or entry.expires < previous.expires:
                # later ones: see reap
                heapq.heappush(self._due, (entry.expires, *entry.key))

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        await trio.lowlevel.checkpoint()
        for key in keys:
            self._pop(key)

    async def query(self, session: str, now: float) -> Sequence[PresenceEntry]:
        await trio.lowlevel.checkpoint()
        entries = self._of(session)
        return [entries[where] for where in sorted(entries) if entries[where].expires > now]

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]:
        await trio.lowlevel.checkpoint()
        reaped: list[PresenceEntry] = []
        while self._due and self._due[0][0] <= now and len(reaped) < limit:
            expires, *where = heapq.heappop(self._due)
            key: PresenceKey = (where[0], where[1], where[2])
            entry = self._get(key)
            if entry is None or entry.expires < expires:
                continue  # withdrawn, or an earlier entry was pushed and handled since
            if entry.expires > expires:
                heapq.heappush(self._due, (entry.expires, *key))  # announced again since
                continue
            self._pop(key)
            reaped.append(entry)
        return reaped

    def _of(self, session: str) -> Mapping[tuple[str, str], PresenceEntry]:
        held = self._entries.get(session)
        if held is None:
            return {}
        if isinstance(held, PresenceEntry):
            return {(held.instance, held.connection): held}
        return held

    def _get(self, key: PresenceKey) -> PresenceEntry | None:
        session, instance, connection = key
        return self._of(session).get((instance, connection))

    def _put(self, entry: PresenceEntry) -> None:
        held = self._entries.get(entry.session)
        if held is None or (isinstance(held, PresenceEntry) and held.key == entry.key):
            self._entries[entry.session] = entry
            return
        if isinstance(held, PresenceEntry):
            held = self._entries[entry.session] = {(held.instance, held.connection): held}
        held[(entry.instance, entry.connection)] = entry

    def _pop(self, key: PresenceKey) -> None:
        session, instance, connection = key
        held = self._entries.get(session)
        if held is None:
            return
        if isinstance(held, PresenceEntry):
            if held.key == key:
                del self._entries[session]
            return
        held.pop((instance, connection), None)
        if len(held) == 1:
            self._entries[session] = next(iter(held.values()))


@asynccontextmanager
async def open_memory_sessions(settings: Any, config: Any) -> AsyncIterator[MemorySessions]:
    """The `memory` plugin's session store factory (no settings of its own)."""
    yield MemorySessions()


@asynccontextmanager
async def open_memory_presence(settings: Any, config: Any) -> AsyncIterator[MemoryPresence]:
    """The `memory` plugin's presence store factory (no settings of its own)."""
    yield MemoryPresence()
