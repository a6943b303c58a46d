"""The only module that imports sqlite3 and psycopg: sync drivers driven from trio on worker
threads, one transaction per call, their exceptions turned into StoreUnavailable here.

Neither driver runs on trio (psycopg's async API is asyncio's), so each store call is one hop
to a worker thread (`trio.to_thread.run_sync`, as the Redis bridge does) that takes a pooled
connection, runs the call's work in one transaction and gives the connection back. A pool of
`pool_size` connections and a CapacityLimiter of the same size keep one connection per thread.
Every call is bounded by `timeout`, by the database itself (SQLite's busy timeout,
PostgreSQL's statement and lock timeouts), which rolls the transaction back: the caller gets
StoreUnavailable and nothing was done. A trio deadline of `timeout` plus `BACKSTOP` seconds
guards against a driver that never returns (a server that stopped answering): the caller gets
StoreUnavailable then too and the thread, abandoned, closes its connection when it ends; such
a call may still complete later, which is why the backstop comes after the database's own
bound rather than at the same moment (a lock released just after the deadline would otherwise
let an abandoned change go through after its caller was told it failed).
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from typing import Any, Protocol, TypeVar

import trio
from attrs import define, field, frozen

from mqbroker.plugins import PluginError
from mqbroker.sessions import StoreUnavailable

from .settings import SqlSettings, dialect_of, sqlite_path

T = TypeVar("T")

#: Seconds past `timeout` before a call is abandoned (see the module docstring).
BACKSTOP = 1.0


@frozen(kw_only=True)
class Dialect:
    """What differs between the SQL the stores write for SQLite and for PostgreSQL."""

    name: str
    #: Ends a SELECT of the rows a statement will change: lock them for this transaction.
    lock_rows: str
    #: Ends a SELECT of rows to reap: lock them, passing over those another instance holds.
    skip_locked: str
    #: Column types: seconds, and ids compared and ordered byte by byte.
    real: str
    key: str
    #: Run first in the migration's transaction, to serialise instances starting at once.
    migration_lock: str | None


SQLITE = Dialect(
    name="sqlite", lock_rows="", skip_locked="", real="REAL", key="TEXT", migration_lock=None
)  # BEGIN IMMEDIATE takes the database's write lock: one writer at a time, no row locks.
POSTGRESQL = Dialect(
    name="postgresql",
    lock_rows=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    real="DOUBLE PRECISION",
    key='TEXT COLLATE "C"',
    migration_lock="SELECT pg_advisory_xact_lock(7311011)",
)


class Transaction(Protocol):
    """What a store's work sees, on a worker thread: statements with `?` placeholders."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def many(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...


@define
class _SqliteTransaction:
    connection: sqlite3.Connection

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()

    def many(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self.connection.executemany(sql, params)


@cache
def _format_style(sql: str) -> str:
    # psycopg's placeholders are %s; the stores' SQL holds no literal % or ?.
    return sql.replace("?", "%s")


@define
class _PostgresTransaction:
    connection: Any  # psycopg.Connection

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(_format_style(sql), params)
            return cursor.fetchall() if cursor.description is not None else []

    def many(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(_format_style(sql), params)


class _Driver(Protocol):
    dialect: Dialect

    def connect(self) -> Any: ...

    def transact(self, connection: Any, work: Callable[[Transaction], T], write: bool) -> T: ...

    def errors(self) -> tuple[type[BaseException], ...]: ...


@define
class _Sqlite:
    settings: SqlSettings
    dialect: Dialect = SQLITE

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            sqlite_path(self.settings.url),
            timeout=self.settings.timeout,  # how long a writer waits for another's lock
            isolation_level=None,  # transactions are begun explicitly, below
            check_same_thread=False,  # used by one worker thread at a time, not always one
        )
        connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        connection.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints under WAL
        return connection

    def transact(
        self, connection: sqlite3.Connection, work: Callable[[Transaction], T], write: bool
    ) -> T:
        # IMMEDIATE: the write lock is taken at BEGIN, so that a read-then-write transaction
        # never finds the database changed under it (what makes `change` and `reap` atomic).
        connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = work(_SqliteTransaction(connection))
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return result

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


@define
class _Postgres:
    settings: SqlSettings
    dialect: Dialect = POSTGRESQL

    def connect(self) -> Any:
        import psycopg

        timeout_ms = math.ceil(self.settings.timeout * 1000)
        return psycopg.connect(
            self.settings.url,
            autocommit=True,  # transactions are begun explicitly, below
            # libpq takes whole seconds, 2 at least; the caller's own bound is `timeout`.
            connect_timeout=max(2, math.ceil(self.settings.connect_timeout)),
            options=f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
            application_name="mqbroker",
        )

    def transact(self, connection: Any, work: Callable[[Transaction], T], write: bool) -> T:
        with connection.transaction():
            return work(_PostgresTransaction(connection))

    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)


def _driver(settings: SqlSettings) -> _Driver:
    if dialect_of(settings.url) == "sqlite":
        return _Sqlite(settings)
    try:
        import psycopg  # noqa: F401
    except ModuleNotFoundError as error:
        raise PluginError(
            f"plugin 'sql' needs psycopg for PostgreSQL ({error}); install it with: "
            "pip install 'mqbroker[sql]'"
        ) from error
    return _Postgres(settings)


@define(eq=False)
class Database:
    """A pool of connections to one database, used from trio one transaction per call."""

    _driver: _Driver
    _timeout: float
    _limiter: trio.CapacityLimiter
    _idle: list[Any] = field(factory=list)
    _lock: threading.Lock = field(factory=threading.Lock)
    _closed: bool = False

    @property
    def dialect(self) -> Dialect:
        return self._driver.dialect

    async def run(self, work: Callable[[Transaction], T], *, write: bool) -> T:
        """`work` in one transaction on a worker thread: its result, or the SessionError it
        raised (the transaction rolled back). StoreUnavailable when the database fails or
        does not answer within `timeout` (plus BACKSTOP, for a driver that never returns)."""
        with trio.move_on_after(self._timeout + BACKSTOP):
            return await trio.to_thread.run_sync(
                self._run, work, write, limiter=self._limiter, abandon_on_cancel=True
            )
        raise StoreUnavailable(
            f"{self.dialect.name}: no answer within {self._timeout} seconds"
        )

    def _run(self, work: Callable[[Transaction], T], write: bool) -> T:
        with self._translated():
            connection = self._take()
        try:
            with self._translated():
                result = self._driver.transact(connection, work, write)
        except StoreUnavailable:
            _close_quietly(connection)  # it may be broken: the next call connects afresh
            raise
        except BaseException:
            self._give_back(connection)  # the work's own error: rolled back, still good
            raise
        self._give_back(connection)
        return result

    def _take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._driver.connect()

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        _close_quietly(connection)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._driver.errors() as error:
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise StoreUnavailable(f"{self.dialect.name}: {first_line}") from error

    def close(self) -> None:
        """Close the idle connections; those in use close when their thread is done."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            _close_quietly(connection)


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        pass  # closing a broken connection may fail; it is dropped either way


@asynccontextmanager
async def open_database(settings: SqlSettings) -> AsyncIterator[Database]:
    """A Database on `settings.url`; no connection is made until the first call."""
    database = Database(
        _driver(settings), settings.timeout, trio.CapacityLimiter(settings.pool_size)
    )
    try:
        yield database
    finally:
        with trio.move_on_after(settings.timeout, shield=True):
            await trio.to_thread.run_sync(database.close, abandon_on_cancel=True)
