"""Fixtures for the SQL plugin's tests: fresh SQLite files and fresh PostgreSQL databases.

The contract backends open their stores through `fresh_sqlite` and `fresh_postgresql`: each
open gets an empty database of its own (a new file; a new database on one private PostgreSQL
server started on first use), so every store starts empty without a server per test.
"""

from __future__ import annotations

import atexit
import itertools
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mqbroker_plugins.sql import SqlSettings
from tests.postgres_server import PostgresServer

_files = itertools.count()
_sqlite_directory: tempfile.TemporaryDirectory[str] | None = None
_contract_server: PostgresServer | None = None


def contract_postgres() -> PostgresServer:
    """The PostgreSQL server the contract suites share, started on first use, stopped at exit."""
    global _contract_server
    if _contract_server is None:
        server = PostgresServer()
        server.start()
        atexit.register(server.close)
        _contract_server = server
    return _contract_server


def sqlite_url(directory: str | Path) -> str:
    return f"sqlite:///{Path(directory) / f'sessions-{next(_files)}.db'}"


@asynccontextmanager
async def fresh_sqlite(**settings: Any) -> AsyncIterator[SqlSettings]:
    """Settings for a new SQLite file in a temporary directory."""
    global _sqlite_directory
    if _sqlite_directory is None:
        _sqlite_directory = tempfile.TemporaryDirectory(prefix="mqb-sqlite-")
        atexit.register(_sqlite_directory.cleanup)
    yield SqlSettings(url=sqlite_url(_sqlite_directory.name), **settings)


@asynccontextmanager
async def fresh_postgresql(**settings: Any) -> AsyncIterator[SqlSettings]:
    """Settings for a new database on the contract server, dropped afterwards."""
    # Started on this (the main) thread, not a worker: the server's parent-death signal
    # fires when the thread that started it ends, and trio retires idle worker threads.
    server = contract_postgres()
    url = await trio.to_thread.run_sync(server.create_database)
    try:
        yield SqlSettings(url=url, **settings)
    finally:
        with trio.move_on_after(10, shield=True):
            await trio.to_thread.run_sync(server.drop_database, url)
