"""The session registry's extension points: application sessions and their presence.

An *application session* (an MCP session: one user's conversation with a server) outlives any
one connection and any one broker instance. Its record lives in a `SessionStore`; which
clients hold subscriptions to its topics right now lives in a `PresenceStore`. Both are small
Protocols with one contract suite each (tests/contract), run against every backend (memory in
`mqbroker_plugins.memory`, Redis, SQL). docs/sessions.md is the user's description.

A *connection* is what the rest of the broker calls a session (one WebSocket, the id in the
welcome); here it is always called a connection, to keep the two apart.

Pure: no I/O and no clock. Every method that depends on time takes `now` (Unix seconds), so
that the contract suites run on a fake clock and instances agree on one time base.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
from attrs import field, frozen

__all__ = [
    "ENDED",
    "IllegalTransition",
    "PresenceEntry",
    "PresenceKey",
    "PresenceStore",
    "Reaped",
    "SessionError",
    "SessionExists",
    "SessionNotFound",
    "SessionPage",
    "SessionRecord",
    "SessionState",
    "SessionStore",
    "StoreUnavailable",
    "VersionConflict",
    "apply_change",
    "can_transition",
    "check_session_id",
    "new_session_id",
]


class SessionState(enum.StrEnum):
    """Where a session is in its life (docs/sessions.md, "States")."""

    #: Created, not yet used (an MCP session before its `initialize` completes).
    PENDING = "pending"
    ACTIVE = "active"
    #: Kept, but not in use now (its client went away and may come back).
    SUSPENDED = "suspended"
    #: Its TTL ran out: set by the broker's reaper, never by a caller.
    EXPIRED = "expired"
    #: Ended on purpose (a logout, a revoked credential).
    INVALIDATED = "invalidated"


#: The states nothing leaves: an ended session is kept `retain_ended` seconds, then purged.
ENDED = frozenset({SessionState.EXPIRED, SessionState.INVALIDATED})

_FORWARD: Mapping[SessionState, frozenset[SessionState]] = {
    SessionState.PENDING: frozenset({SessionState.ACTIVE}),
    SessionState.ACTIVE: frozenset({SessionState.SUSPENDED}),
    SessionState.SUSPENDED: frozenset({SessionState.ACTIVE}),
}


def can_transition(current: SessionState, target: SessionState) -> bool:
    """pending -> active -> suspended -> active, and any live state -> expired / invalidated.
    Nothing leaves an ended state, and no state moves to itself (so that of two instances
    making the same change at once, exactly one succeeds)."""
    if current in ENDED:
        return False
    return target in ENDED or target in _FORWARD[current]


#: A session id: what fits one topic level and a Redis key and a URL path segment unescaped.
_SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def check_session_id(session_id: str) -> None:
    """Raises ValueError unless `session_id` is 1 to 128 characters of A-Z a-z 0-9 . _ ~ -
    (so it is one topic level, never a wildcard, and safe in keys and URLs)."""
    if not isinstance(session_id, str) or _SESSION_ID.fullmatch(session_id) is None:
        raise ValueError("a session id is 1 to 128 characters of A-Z a-z 0-9 . _ ~ -")


def new_session_id() -> str:
    """A fresh, unguessable session id (128 random bits, URL-safe)."""
    return secrets.token_urlsafe(16)


@frozen(kw_only=True)
class SessionRecord:
    """What the registry knows of one session. A value: changes make a new record."""

    id: str
    #: The user (or principal) the session belongs to: every lookup is scoped by it.
    user: str
    state: SessionState
    #: Unix seconds.
    created: float
    updated: float
    #: When the store next acts on its own: for a live session, when it expires (its last
    #: touch + `ttl`); for an ended one, when it is purged.
    expires: float
    #: Seconds a touch extends the session by.
    ttl: float
    #: The caller's data: a JSON-compatible map (strings as keys), bounded by
    #: `[sessions] max_metadata_bytes`.
    metadata: Mapping[str, Any] = field(factory=dict)
    #: 1 at creation, one more at every change: `change(..., expect_version=)` compares it.
    version: int = 1

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@frozen(kw_only=True)
class SessionPage:
    """One page of `list`, in session id order."""

    records: Sequence[SessionRecord]
    #: Pass as `after` for the next page; None on the last page.
    next: str | None


@frozen(kw_only=True)
class Reaped:
    """What one `reap` did."""

    #: Live sessions it found past their expiry and moved to EXPIRED (the new records).
    expired: Sequence[SessionRecord]
    #: Ended sessions past their retention it removed (the last records).
    purged: Sequence[SessionRecord]


class SessionError(Exception):
    """A registry request that cannot be carried out; `code` is the protocol's error code."""

    code = "internal"


class SessionNotFound(SessionError):
    """No such session for this user (another user's session is not found either)."""

    code = "session_not_found"


class SessionExists(SessionError):
    """`create` with an id already taken (by any user)."""

    code = "session_exists"


class IllegalTransition(SessionError):
    """The state change is not one `can_transition` allows from the current state."""

    code = "illegal_transition"

    def __init__(self, current: SessionState, target: SessionState) -> None:
        super().__init__(f"a session cannot go from {current} to {target}")
        self.current = current
        self.target = target


class VersionConflict(SessionError):
    """`change(..., expect_version=)` found another version: someone changed it meanwhile."""

    code = "version_conflict"


def apply_change(
    record: SessionRecord,
    now: float,
    *,
    state: SessionState | None = None,
    metadata: Mapping[str, Any] | None = None,
    expect_version: int | None = None,
    retain: float = 0.0,
) -> SessionRecord:
    """`record` after `SessionStore.change` (the rule every store applies, under its own
    lock). Raises VersionConflict, IllegalTransition."""
    if expect_version is not None and record.version != expect_version:
        raise VersionConflict(
            f"session {record.id!r} is at version {record.version}, not {expect_version}"
        )
    changed = attrs.evolve(record, updated=now, version=record.version + 1)
    if state is not None:
        if not can_transition(record.state, state):
            raise IllegalTransition(record.state, state)
        changed = attrs.evolve(changed, state=state)
        if state in ENDED:
            changed = attrs.evolve(changed, expires=now + retain)
    if metadata is not None:
        changed = attrs.evolve(changed, metadata=dict(metadata))
    return changed


class SessionStore(Protocol):
    """Keeps session records, shared by every broker instance configured with the same backend.

    Contract (tests/contract/test_session_contract.py checks it for every backend):
    - `user` scopes every lookup: a record whose user differs is treated as absent. None means
      any user (operators, and principals whose role allows it).
    - `create` stores a new record as given; SessionExists if the id is taken, whoever owns it.
    - `get` answers, in the order of `ids`, each record or None.
    - `touch` sets `expires = now + ttl` (and `ttl` itself when one is given) and `updated`, one
      more version, on each live session of `ids`; ended and absent ones answer None.
    - `change` sets the state (checked with `can_transition`) and/or replaces the metadata, one
      more version, atomically: of concurrent changes made through any instances, each sees the
      result of the ones before it (so two identical transitions: exactly one succeeds, the
      other raises IllegalTransition). An ended state sets `expires = now + retain`.
      SessionNotFound, IllegalTransition, VersionConflict (when `expect_version` differs).
    - `delete` removes a record at once and returns it (None if absent).
    - `list` pages through the records in id order, after `after`, at most `limit`, filtered by
      user and state when given.
    - `reap` moves at most `limit` live sessions with `expires <= now` to EXPIRED (expires =
      now + retain) and purges at most `limit` ended ones with `expires <= now`. Atomic per
      record: run by every instance at once, each record is reaped by exactly one of them.
    - `counts` gives the number of records in each state (every state present, zeros too).
    - A backend that cannot be reached, or does not answer in time, raises StoreUnavailable.
    """

    async def create(self, record: SessionRecord) -> None: ...

    async def get(self, ids: Sequence[str], user: str | None) -> Sequence[SessionRecord | None]: ...

    async def touch(
        self, ids: Sequence[str], user: str | None, now: float, ttl: float | None = None
    ) -> Sequence[SessionRecord | None]: ...

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
    ) -> SessionRecord: ...

    async def delete(self, session_id: str, user: str | None) -> SessionRecord | None: ...

    async def list(
        self,
        *,
        user: str | None = None,
        state: SessionState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> SessionPage: ...

    async def reap(self, now: float, limit: int, retain: float) -> Reaped: ...

    async def counts(self) -> Mapping[SessionState, int]: ...


class StoreUnavailable(SessionError):
    """The backend cannot be reached (or did not answer in time); nothing is known to be done."""

    code = "unavailable"


#: (session, instance, connection): what identifies one presence entry.
PresenceKey = tuple[str, str, str]


@frozen(kw_only=True)
class PresenceEntry:
    """One connection holding subscriptions to a session's topics, on one broker instance."""

    session: str
    #: The broker instance's id (the welcome's `instance`).
    instance: str
    #: The connection's id (the welcome's `session`).
    connection: str
    #: The client's name (the hello's `client`).
    client: str = ""
    #: Who the connection authenticated as; None in anonymous mode.
    principal: str | None = None
    #: Unix seconds after which the entry is gone unless announced again.
    expires: float = 0.0

    @property
    def key(self) -> PresenceKey:
        return (self.session, self.instance, self.connection)


class PresenceStore(Protocol):
    """Which connections, on every instance, hold subscriptions to each session's topics.

    Contract (tests/contract/test_presence_contract.py checks it for every backend):
    - `announce` inserts or refreshes entries (an instance re-announces its own every
      `presence_ttl / 3`, so the entries of a dead instance run out).
    - `withdraw` removes entries at once (a connection left).
    - `query` answers the entries of a session with `expires > now`, ordered by (instance,
      connection).
    - `reap` removes at most `limit` entries with `expires <= now` and returns them; atomic per
      entry, so that of instances reaping at once, one reports each (it publishes the leave).
    """

    async def announce(self, entries: Sequence[PresenceEntry]) -> None: ...

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None: ...

    async def query(self, session: str, now: float) -> Sequence[PresenceEntry]: ...

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]: ...
