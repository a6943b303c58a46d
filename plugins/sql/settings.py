"""The `[plugins.sql]` settings: which database, how many connections, how long to wait.

Every field has a default; the config loader validates the table into `SqlSettings`, and the
attrs validators here name the key in their errors (`plugins.sql.url: expected ...`).
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

import attrs
from attrs import field, frozen

from mqbroker.config import SettingMismatch

SQLITE_PREFIX = "sqlite:///"
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def dialect_of(url: str) -> str:
    """"sqlite" or "postgresql", from the URL's scheme."""
    return "sqlite" if url.startswith(SQLITE_PREFIX) else "postgresql"


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///PATH` URL: relative after three slashes, absolute after four
    (SQLAlchemy's convention)."""
    return url.removeprefix(SQLITE_PREFIX)


def _url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    expected = (
        "sqlite:///PATH (a file; four slashes for an absolute path) or "
        "postgresql://[user[:password]@]host[:port]/database"
    )
    if value.startswith(SQLITE_PREFIX):
        if sqlite_path(value) in ("", ":memory:") or sqlite_path(value).startswith("file:"):
            raise SettingMismatch(expected, value, (attribute.name,))
    elif urlsplit(value).scheme not in POSTGRESQL_SCHEMES:
        # Not the value itself: a PostgreSQL URL may carry a password.
        raise SettingMismatch(expected, f"{urlsplit(value).scheme}://...", (attribute.name,))


def _positive_seconds(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise SettingMismatch("a finite number of seconds greater than 0", value,
                              (attribute.name,))


def _pool_size(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= 100:
        raise SettingMismatch("an integer from 1 to 100", value, (attribute.name,))


@frozen(kw_only=True)
class SqlSettings:
    """Where the SQL plugin keeps the session registry. docs/sessions.md, "Stores"."""

    #: `sqlite:///PATH` or `postgresql://...` (libpq's URL form; its query parameters too).
    url: str = field(default="sqlite:///mqbroker-sessions.db", validator=_url, repr=False)
    #: Connections (each used by one worker thread at a time), per store.
    pool_size: int = field(default=4, validator=_pool_size)
    #: Seconds to wait for a new connection.
    connect_timeout: float = field(default=5.0, validator=_positive_seconds)
    #: Seconds any one operation may take, waits for locks and connections included; past it
    #: the operation fails with `unavailable` and the broker goes on.
    timeout: float = field(default=5.0, validator=_positive_seconds)
