"""The sql plugin beyond the contract: its settings, its migration, and a database that is
slow, locked, unreachable or paused (the broker gets StoreUnavailable in bounded time)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import trio

from mqbroker.config import Config, ConfigError, SessionsConfig, plugin_settings
from mqbroker.plugins import load_plugin
from mqbroker.sessions import SessionRecord, SessionState, StoreUnavailable
from mqbroker_plugins.sql import (
    SCHEMA_VERSION,
    SchemaTooNew,
    SqlSettings,
    open_presence,
    open_sessions,
)
from tests.postgres_server import PostgresServer
from tests.redis_server import free_port
from tests.sql_fixtures import contract_postgres, fresh_postgresql, sqlite_url

T0 = 1_700_000_000.0
#: Seconds the unavailability tests give an operation, and the slack they allow beyond it.
TIMEOUT = 1.0
SLACK = 3.0


def record(session_id: str) -> SessionRecord:
    return SessionRecord(
        id=session_id, user="u", state=SessionState.PENDING, created=T0, updated=T0,
        expires=T0 + 60, ttl=60.0,
    )  # fmt: skip


def settings_of(table: dict[str, object]) -> SqlSettings:
    settings: SqlSettings = plugin_settings(Config(plugins={"sql": table}), load_plugin("sql"))
    return settings


# --- Settings --------------------------------------------------------------------------------


def test_settings_have_working_defaults() -> None:
    """An empty [plugins.sql] table is a SQLite file next to the broker."""
    assert settings_of({}) == SqlSettings()
    assert SqlSettings().url.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "mysql://u:secret@h/db"}, "plugins.sql.url: expected sqlite:///PATH"),
        ({"url": "sqlite:///:memory:"}, "plugins.sql.url: expected sqlite:///PATH"),
        ({"url": "sqlite:///"}, "plugins.sql.url: expected sqlite:///PATH"),
        ({"pool_size": 0}, "plugins.sql.pool_size: expected an integer from 1 to 100"),
        ({"timeout": -1}, "plugins.sql.timeout: expected a finite number of seconds"),
        ({"connect_timeout": "soon"}, "plugins.sql.connect_timeout"),
        ({"uri": "sqlite:///x.db"}, "plugins.sql.uri"),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, object], message: str) -> None:
    """Each bad key is named with what it expects; a URL's password is never repeated."""
    with pytest.raises(ConfigError) as raised:
        settings_of(table)
    assert message in str(raised.value)
    assert "secret" not in str(raised.value)


def test_settings_accept_both_databases() -> None:
    for url in ("sqlite:///rel/x.db", "sqlite:////abs/x.db", "postgresql://u@h:5/db",
                "postgres://h/db?sslmode=require"):  # fmt: skip
        assert settings_of({"url": url}).url == url


# --- Migration -------------------------------------------------------------------------------


async def test_open_creates_the_schema_once_and_reopens(tmp_path: Path) -> None:
    """The first open creates the tables at SCHEMA_VERSION; later opens find them and keep
    the data."""
    settings = SqlSettings(url=sqlite_url(tmp_path))
    async with open_sessions(settings, SessionsConfig()) as store:
        await store.create(record("s1"))
    async with open_sessions(settings, SessionsConfig()) as store:
        assert [r.id for r in (await store.list()).records] == ["s1"]
    with sqlite3.connect(settings.url.removeprefix("sqlite:///")) as connection:
        assert connection.execute("SELECT version FROM mqb_schema").fetchall() == [
            (SCHEMA_VERSION,)
        ]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database migrated by a newer mqbroker: the store does not open, and says why."""
    settings = SqlSettings(url=sqlite_url(tmp_path))
    async with open_presence(settings, SessionsConfig()):
        pass
    with sqlite3.connect(settings.url.removeprefix("sqlite:///")) as connection:
        connection.execute("UPDATE mqb_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this mqbroker's"):
        async with open_sessions(settings, SessionsConfig()):
            pass


async def test_instances_starting_at_once_migrate_once() -> None:
    """Several instances opening one empty PostgreSQL database at once all open (the
    migration is serialised), and share it."""
    async with fresh_postgresql() as settings:
        opened: list[object] = []

        async def one() -> None:
            async with open_sessions(settings, SessionsConfig()) as store:
                opened.append(store)
                await trio.sleep(0.2)  # hold it open while the others open

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
        assert len(opened) == 4


# --- Unavailability --------------------------------------------------------------------------


async def test_an_unreachable_postgresql_is_unavailable_in_bounded_time() -> None:
    """Nothing listening: opening fails with StoreUnavailable, well within its bounds."""
    settings = SqlSettings(
        url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
    )  # fmt: skip
    started = time.monotonic()
    with trio.fail_after(TIMEOUT + SLACK), pytest.raises(StoreUnavailable, match="postgresql"):
        async with open_sessions(settings, SessionsConfig()):
            pass
    assert time.monotonic() - started < TIMEOUT + SLACK


async def test_a_locked_sqlite_file_is_unavailable_after_timeout(tmp_path: Path) -> None:
    """Another process holding the write lock longer than `timeout`: StoreUnavailable, and
    the store works again once the lock is released."""
    settings = SqlSettings(url=sqlite_url(tmp_path), timeout=TIMEOUT)
    async with open_sessions(settings, SessionsConfig()) as store:
        await store.create(record("s1"))
        holder = sqlite3.connect(settings.url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with trio.fail_after(TIMEOUT + SLACK), pytest.raises(StoreUnavailable):
                await store.change("s1", None, T0, state=SessionState.ACTIVE)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        changed = await store.change("s1", None, T0, state=SessionState.ACTIVE)
        assert changed.state == SessionState.ACTIVE


async def test_a_paused_postgresql_is_unavailable_then_recovers() -> None:
    """A server that stops answering (SIGSTOP): every call fails with StoreUnavailable within
    `timeout` (the broker never hangs); once it answers again, calls succeed."""
    with PostgresServer() as server:
        settings = SqlSettings(url=server.url(), timeout=TIMEOUT, pool_size=2)
        async with open_sessions(settings, SessionsConfig()) as store:
            await store.create(record("s1"))
            server.pause()
            try:
                for n in range(4):  # more calls than connections: none waits forever
                    started = time.monotonic()
                    with trio.fail_after(TIMEOUT + SLACK), pytest.raises(StoreUnavailable):
                        await store.touch(["s1"], None, T0 + n)
                    assert time.monotonic() - started < TIMEOUT + SLACK
            finally:
                server.resume()
            with trio.fail_after(30):
                while True:
                    try:
                        (touched,) = await store.touch(["s1"], None, T0 + 10)
                        break
                    except StoreUnavailable:
                        await trio.sleep(0.2)  # abandoned calls finishing after the resume
            assert touched is not None and touched.expires == T0 + 70


async def test_the_contract_server_is_private() -> None:
    """The tests' server is never the shared one on 5432."""
    assert contract_postgres().port != 5432
