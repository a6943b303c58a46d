"""A `SessionStore` and a `PresenceStore` in SQL tables (SQLite or PostgreSQL; schema.py).

One implementation for both databases: the statements differ only in the Dialect's lock
clauses. Every call is one transaction on a worker thread (database.py). A change reads the
row under a lock (`FOR UPDATE` on PostgreSQL; SQLite's write lock, taken at BEGIN IMMEDIATE)
and writes what `apply_change` makes of it, so concurrent changes through any instances each
see the ones before. Reaping selects due rows `FOR UPDATE SKIP LOCKED` on PostgreSQL, so
instances reaping at once take different rows; on SQLite one reaper holds the lock at a time.

Free-form text (user, client, principal) is stored as JSON text, as the metadata is, so that
any string round-trips (PostgreSQL's TEXT cannot hold NUL); ids are stored as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mqbroker.sessions import (
    ENDED,
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

from .database import Database, Transaction

#: Ids per `IN (...)`: well under SQLite's and PostgreSQL's parameter limits.
CHUNK = 500
_COLUMNS = "id, user_name, state, created, updated, expires, ttl, metadata, version"
_LIVE = "state IN ('pending', 'active', 'suspended')"
#: The same test, which no index can serve: for statements that find their rows by id. With
#: `_LIVE` there, PostgreSQL without statistics yet (a new table) scanned every live row
#: through the state index (1,700 touches/s at 10,000 sessions, batches of 100).
_LIVE_ROW = "(state || '') IN ('pending', 'active', 'suspended')"
_ENDED = "state IN ('expired', 'invalidated')"
assert {s.value for s in ENDED} == {"expired", "invalidated"}
_PRESENCE_COLUMNS = "session, instance, connection, client, principal, expires"


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _row(record: SessionRecord) -> tuple[Any, ...]:
    return (
        record.id, _text(record.user), record.state.value, record.created, record.updated,
        record.expires, record.ttl, _text(dict(record.metadata)), record.version,
    )  # fmt: skip


def _record(row: Sequence[Any]) -> SessionRecord:
    session_id, user, state, created, updated, expires, ttl, metadata, version = row
    return SessionRecord(
        id=session_id, user=json.loads(user), state=SessionState(state), created=created,
        updated=updated, expires=expires, ttl=ttl, metadata=json.loads(metadata),
        version=int(version),
    )  # fmt: skip


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[start : start + CHUNK] for start in range(0, len(ids), CHUNK)]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _user_clause(user: str | None) -> tuple[str, tuple[Any, ...]]:
    return ("", ()) if user is None else (" AND user_name = ?", (_text(user),))


class SqlSessions:
    """A `SessionStore` on one database, shared by every instance pointed at it."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def create(self, record: SessionRecord) -> None:
        def work(tx: Transaction) -> bool:
            return bool(tx.rows(
                f"INSERT INTO mqb_sessions ({_COLUMNS}) VALUES ({_marks(9)}) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                _row(record),
            ))  # fmt: skip

        if not await self._database.run(work, write=True):
            raise SessionExists(f"session {record.id!r} exists")

    async def get(self, ids: Sequence[str], user: str | None) -> Sequence[SessionRecord | None]:
        def work(tx: Transaction) -> dict[str, SessionRecord]:
            found: dict[str, SessionRecord] = {}
            for chunk in _chunks(list(dict.fromkeys(ids))):
                sql = f"SELECT {_COLUMNS} FROM mqb_sessions WHERE id IN ({_marks(len(chunk))})"
                found.update((r.id, r) for r in map(_record, tx.rows(sql, chunk)))
            return found

        found = await self._database.run(work, write=False) if ids else {}
        return [_scoped(found.get(session_id), user) for session_id in ids]

    async def touch(
        self, ids: Sequence[str], user: str | None, now: float, ttl: float | None = None
    ) -> Sequence[SessionRecord | None]:
        # The same sum as the memory store's, in the same float arithmetic.
        setting = "expires = ? + ttl" if ttl is None else "ttl = ?, expires = ?"
        values: tuple[Any, ...] = (now,) if ttl is None else (ttl, now + ttl)
        where, scope = _user_clause(user)

        def work(tx: Transaction) -> dict[str, SessionRecord]:
            touched: dict[str, SessionRecord] = {}
            for chunk in _chunks(list(dict.fromkeys(ids))):
                rows = tx.rows(
                    f"UPDATE mqb_sessions SET {setting}, updated = ?, version = version + 1 "
                    f"WHERE id IN ({_marks(len(chunk))}) AND {_LIVE_ROW}{where} "
                    f"RETURNING {_COLUMNS}",
                    (*values, now, *chunk, *scope),
                )
                touched.update((r.id, r) for r in map(_record, rows))
            return touched

        touched = await self._database.run(work, write=True) if ids else {}
        return [touched.get(session_id) for session_id in ids]

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
        lock = self._database.dialect.lock_rows

        def work(tx: Transaction) -> SessionRecord:
            rows = tx.rows(f"SELECT {_COLUMNS} FROM mqb_sessions WHERE id = ?{lock}", (session_id,))
            current = _scoped(_record(rows[0]), user) if rows else None
            if current is None:
                raise SessionNotFound(f"no session {session_id!r}")
            changed = apply_change(
                current, now, state=state, metadata=metadata, expect_version=expect_version,
                retain=retain,
            )  # fmt: skip
            tx.rows(
                "UPDATE mqb_sessions SET state = ?, updated = ?, expires = ?, metadata = ?, "
                "version = ? WHERE id = ?",
                (changed.state.value, changed.updated, changed.expires,
                 _text(dict(changed.metadata)), changed.version, session_id),
            )  # fmt: skip
            return changed

        return await self._database.run(work, write=True)

    async def delete(self, session_id: str, user: str | None) -> SessionRecord | None:
        where, scope = _user_clause(user)

        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            return tx.rows(
                f"DELETE FROM mqb_sessions WHERE id = ?{where} RETURNING {_COLUMNS}",
                (session_id, *scope),
            )

        rows = await self._database.run(work, write=True)
        return _record(rows[0]) if rows else None

    async def list(
        self,
        *,
        user: str | None = None,
        state: SessionState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> SessionPage:
        where, params = _user_clause(user)
        if state is not None:
            where, params = f"{where} AND state = ?", (*params, state.value)
        if after is not None:
            where, params = f"{where} AND id > ?", (*params, after)

        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            # One more than a page: whether a next page exists, without an empty last page.
            return tx.rows(
                f"SELECT {_COLUMNS} FROM mqb_sessions WHERE 1 = 1{where} ORDER BY id LIMIT ?",
                (*params, limit + 1),
            )

        records = [_record(row) for row in await self._database.run(work, write=False)]
        more = len(records) > limit
        del records[limit:]
        return SessionPage(records=records, next=records[-1].id if more else None)

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        skip_locked = self._database.dialect.skip_locked

        def due(kind: str) -> tuple[str, str]:
            # The due rows picked once, in a materialized CTE: as a subquery PostgreSQL may
            # run it again per row, passing over the rows already taken, past `limit`. The
            # outer conditions again: a row changed since the snapshot is taken only if it is
            # still due.
            return (
                f"WITH due AS MATERIALIZED (SELECT id FROM mqb_sessions WHERE {kind} "
                f"AND expires <= ? ORDER BY expires LIMIT ?{skip_locked}) ",
                f"id IN (SELECT id FROM due) AND {kind} AND expires <= ?",
            )

        def work(tx: Transaction) -> Reaped:
            with_ended, ended = due(_ENDED)
            purged = tx.rows(
                f"{with_ended}DELETE FROM mqb_sessions WHERE {ended} RETURNING {_COLUMNS}",
                (now, limit, now),
            )
            with_live, live = due(_LIVE)
            expired = tx.rows(
                f"{with_live}UPDATE mqb_sessions SET state = ?, expires = ?, updated = ?, "
                f"version = version + 1 WHERE {live} RETURNING {_COLUMNS}",
                (now, limit, SessionState.EXPIRED.value, now + retain, now, now),
            )
            return Reaped(
                expired=[_record(r) for r in expired], purged=[_record(r) for r in purged]
            )

        return await self._database.run(work, write=True)

    async def counts(self) -> Mapping[SessionState, int]:
        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            return tx.rows("SELECT state, COUNT(*) FROM mqb_sessions GROUP BY state")

        counts = dict.fromkeys(SessionState, 0)
        for state, count in await self._database.run(work, write=False):
            counts[SessionState(state)] = int(count)
        return counts


def _scoped(record: SessionRecord | None, user: str | None) -> SessionRecord | None:
    if record is None or (user is not None and record.user != user):
        return None
    return record


def _presence_row(entry: PresenceEntry) -> tuple[Any, ...]:
    return (
        entry.session, entry.instance, entry.connection, _text(entry.client),
        _text(entry.principal), entry.expires,
    )  # fmt: skip


def _presence_entry(row: Sequence[Any]) -> PresenceEntry:
    session, instance, connection, client, principal, expires = row
    return PresenceEntry(
        session=session, instance=instance, connection=connection, client=json.loads(client),
        principal=json.loads(principal), expires=expires,
    )  # fmt: skip


class SqlPresence:
    """A `PresenceStore` on one database, shared by every instance pointed at it."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def announce(self, entries: Sequence[PresenceEntry]) -> None:
        # In key order, so that two instances' overlapping batches cannot deadlock.
        rows = [_presence_row(e) for e in sorted(entries, key=lambda e: e.key)]

        def work(tx: Transaction) -> None:
            tx.many(
                f"INSERT INTO mqb_presence ({_PRESENCE_COLUMNS}) VALUES ({_marks(6)}) "
                "ON CONFLICT (session, instance, connection) DO UPDATE SET "
                "client = excluded.client, principal = excluded.principal, "
                "expires = excluded.expires",
                rows,
            )

        if rows:
            await self._database.run(work, write=True)

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        def work(tx: Transaction) -> None:
            tx.many(
                "DELETE FROM mqb_presence WHERE session = ? AND instance = ? AND connection = ?",
                sorted(keys),
            )

        if keys:
            await self._database.run(work, write=True)

    async def query(self, session: str, now: float) -> Sequence[PresenceEntry]:
        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            return tx.rows(
                f"SELECT {_PRESENCE_COLUMNS} FROM mqb_presence WHERE session = ? "
                "AND expires > ? ORDER BY instance, connection",
                (session, now),
            )

        return [_presence_entry(row) for row in await self._database.run(work, write=False)]

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]:
        skip_locked = self._database.dialect.skip_locked

        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            return tx.rows(
                "WITH due AS MATERIALIZED (SELECT session, instance, connection "
                f"FROM mqb_presence WHERE expires <= ? ORDER BY expires LIMIT ?{skip_locked}) "
                "DELETE FROM mqb_presence WHERE (session, instance, connection) IN "
                f"(SELECT * FROM due) AND expires <= ? RETURNING {_PRESENCE_COLUMNS}",
                (now, limit, now),
            )

        return [_presence_entry(row) for row in await self._database.run(work, write=True)]
