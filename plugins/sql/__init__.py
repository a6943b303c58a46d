"""The `sql` plugin: the session registry in SQLite or PostgreSQL ([sessions] plugin = "sql").

`[plugins.sql] url` picks the database (`sqlite:///PATH` or `postgresql://...`); every broker
instance pointed at one database shares one registry. docs/sessions.md ("Stores") describes
the tables, the drivers, and the migration each store runs when it opens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from mqbroker.plugins import Plugin

from .database import Database, open_database
from .schema import SCHEMA_VERSION, SchemaTooNew, migrate
from .sessions import SqlPresence, SqlSessions
from .settings import SqlSettings


@asynccontextmanager
async def open_migrated(settings: SqlSettings | None) -> AsyncIterator[Database]:
    """A Database on `settings.url`, its schema brought up to date (SchemaTooNew if newer)."""
    settings = settings if settings is not None else SqlSettings()
    async with open_database(settings) as database:
        await database.run(partial(migrate, dialect=database.dialect), write=True)
        yield database


@asynccontextmanager
async def open_sessions(settings: SqlSettings | None, config: Any) -> AsyncIterator[SqlSessions]:
    """The plugin's session store factory."""
    async with open_migrated(settings) as database:
        yield SqlSessions(database)


@asynccontextmanager
async def open_presence(settings: SqlSettings | None, config: Any) -> AsyncIterator[SqlPresence]:
    """The plugin's presence store factory."""
    async with open_migrated(settings) as database:
        yield SqlPresence(database)


plugin = Plugin(
    name="sql",
    settings_type=SqlSettings,
    open_sessions=open_sessions,
    open_presence=open_presence,
)

__all__ = [
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "SqlPresence",
    "SqlSessions",
    "SqlSettings",
    "open_presence",
    "open_sessions",
    "plugin",
]
