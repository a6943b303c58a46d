"""The SQL plugin's tables, and the migration every store runs when it opens.

`mqb_schema` holds the schema's version. Opening a store runs, in one transaction (serialised
between instances starting at once), the migrations from the database's version up to
SCHEMA_VERSION; a database at a newer version than this code knows is refused.
"""

from __future__ import annotations

from .database import Dialect, Transaction

SCHEMA_VERSION = 1

#: version -> the statements that bring a database from the version before to it.
#: {key}: an id column (ordered byte by byte); {real}: seconds.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE mqb_sessions (
            id {key} PRIMARY KEY,
            user_name TEXT NOT NULL,
            state TEXT NOT NULL,
            created {real} NOT NULL,
            updated {real} NOT NULL,
            expires {real} NOT NULL,
            ttl {real} NOT NULL,
            metadata TEXT NOT NULL,
            version BIGINT NOT NULL
        )""",
        "CREATE INDEX mqb_sessions_user ON mqb_sessions (user_name, id)",
        "CREATE INDEX mqb_sessions_state ON mqb_sessions (state, id)",
        "CREATE INDEX mqb_sessions_expires ON mqb_sessions (expires)",
        """CREATE TABLE mqb_presence (
            session {key} NOT NULL,
            instance {key} NOT NULL,
            connection {key} NOT NULL,
            client TEXT NOT NULL,
            principal TEXT NOT NULL,
            expires {real} NOT NULL,
            PRIMARY KEY (session, instance, connection)
        )""",
        "CREATE INDEX mqb_presence_expires ON mqb_presence (expires)",
    ),
}


class SchemaTooNew(Exception):
    """The database was migrated by a newer mqbroker: this one does not know its tables."""


def migrate(transaction: Transaction, dialect: Dialect) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it was at (0: empty)."""
    if dialect.migration_lock is not None:
        transaction.rows(dialect.migration_lock)
    transaction.rows("CREATE TABLE IF NOT EXISTS mqb_schema (version INTEGER NOT NULL)")
    found = transaction.rows("SELECT version FROM mqb_schema")
    current = int(found[0][0]) if found else 0
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database's session registry is at schema version {current}, newer than this "
            f"mqbroker's ({SCHEMA_VERSION}): upgrade mqbroker, or point [plugins.sql] url at "
            "another database"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version]:
            transaction.rows(statement.format(key=dialect.key, real=dialect.real))
    if not found:
        transaction.rows("INSERT INTO mqb_schema (version) VALUES (?)", (SCHEMA_VERSION,))
    elif current < SCHEMA_VERSION:
        transaction.rows("UPDATE mqb_schema SET version = ?", (SCHEMA_VERSION,))
    return current
