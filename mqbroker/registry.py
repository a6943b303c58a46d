"""The session registry's rules, pure: what a request may ask, who it is for, what it answers.

The broker side of the registry (mqbroker.server.registry) does the store calls, the reaper
and the lifecycle events; what is decided without I/O lives here: checking a request's fields
against `[sessions]`, scoping it to a user ("own" / "any" / "none", docs/sessions.md), the
record maps of the protocol, the lifecycle events' payloads, the session topics
(`{topic_prefix}/{id}/...`) and which subscriptions lie inside them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from attrs import define, field, frozen

from mqbroker.config import SessionsConfig
from mqbroker.protocol import (
    Error,
    ErrorCode,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionRequest,
    SessionTouch,
    SessionUpdate,
)
from mqbroker.protocol.codec import payload_problem, payload_size
from mqbroker.sessions import SessionRecord, SessionState, check_session_id
from mqbroker.topics import MULTI_LEVEL, SEPARATOR, SINGLE_LEVEL

#: The most session ids one `session_get` or `session_touch` may name (the welcome's
#: `max_session_batch`): it bounds the store work and the reply one request costs.
MAX_SESSION_BATCH = 100
#: The longest user name, in characters.
MAX_USER_CHARS = 256
#: `user` on `session_list` meaning every user (for those allowed to see them).
EVERY_USER = "*"
#: States a request may set: `expired` is the reaper's alone.
_SETTABLE = frozenset(SessionState) - {SessionState.EXPIRED}
_CREATABLE = frozenset({SessionState.PENDING, SessionState.ACTIVE})


class SessionsRight(enum.IntEnum):
    """A role's `sessions` key: whose sessions its principals may see and change."""

    NONE = 0
    OWN = 1
    ANY = 2

    @classmethod
    def parse(cls, text: str) -> SessionsRight:
        return cls[text.upper()]


class BadRequest(ValueError):
    """A request whose fields the registry refuses (answered with `bad_event`)."""


class Forbidden(Exception):
    """The principal may not act on this user's sessions (answered with `forbidden`)."""


@frozen(kw_only=True)
class Caller:
    """Who makes registry requests on one connection."""

    #: The principal's name; None in anonymous mode (trusted: `user` is then required).
    principal: str | None
    right: SessionsRight = SessionsRight.ANY


class Lifecycle(enum.StrEnum):
    """The `event` of a lifecycle message (docs/sessions.md, "Lifecycle events")."""

    CREATED = "created"
    ACTIVATED = "activated"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    INVALIDATED = "invalidated"
    DELETED = "deleted"


#: The events after which the session's topics are closed: history forgotten, subscriptions
#: inside `{prefix}/{id}/#` ended on every instance.
ENDING = frozenset({Lifecycle.EXPIRED, Lifecycle.INVALIDATED, Lifecycle.DELETED})
_ON_STATE = {
    SessionState.ACTIVE: Lifecycle.ACTIVATED,
    SessionState.SUSPENDED: Lifecycle.SUSPENDED,
    SessionState.EXPIRED: Lifecycle.EXPIRED,
    SessionState.INVALIDATED: Lifecycle.INVALIDATED,
}


def lifecycle_of_state(state: SessionState) -> Lifecycle:
    """The event a change to `state` publishes (pending is only ever a starting state)."""
    return _ON_STATE[state]


def lifecycle_payload(event: Lifecycle, record: SessionRecord, *, now: float,
                      instance: str) -> dict[str, Any]:
    """What a lifecycle message carries (docs/sessions.md)."""
    return {"event": event.value, "session": record.id, "user": record.user,
            "state": record.state.value, "version": record.version, "time": now,
            "instance": instance}


def record_map(record: SessionRecord) -> dict[str, Any]:
    """A record as the protocol sends it."""
    return {"id": record.id, "user": record.user, "state": record.state.value,
            "created": record.created, "updated": record.updated, "expires": record.expires,
            "ttl": record.ttl, "metadata": dict(record.metadata), "version": record.version}


def record_of(values: Mapping[str, Any]) -> SessionRecord:
    """A record from its protocol map (the clients' side); ValueError if it is not one."""
    try:
        return SessionRecord(
            id=str(values["id"]), user=str(values["user"]),
            state=SessionState(values["state"]), created=float(values["created"]),
            updated=float(values["updated"]), expires=float(values["expires"]),
            ttl=float(values["ttl"]), metadata=dict(values.get("metadata") or {}),
            version=int(values["version"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a session record: {e!r}") from None


# --- checking requests -----------------------------------------------------------------------


@frozen
class Rules:
    """`[sessions]` as the checks of requests use it."""

    config: SessionsConfig

    def ttl(self, ttl: float | None) -> float | None:
        if ttl is None:
            return None
        if not math.isfinite(ttl) or ttl <= 0:
            raise BadRequest("`ttl` must be a finite number of seconds greater than 0")
        if ttl > self.config.max_ttl:
            raise BadRequest(f"`ttl` must be at most max_ttl ({self.config.max_ttl:g} s)")
        return ttl

    def metadata(self, metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        if metadata is None:
            return None
        problem = payload_problem(metadata)
        if problem is not None:
            raise BadRequest(f"`metadata` must be a map any session can receive, not {problem}")
        size, limit = payload_size(metadata), self.config.max_metadata_bytes
        if size > limit:
            raise BadRequest(f"`metadata` is {size} bytes packed, over max_metadata_bytes "
                             f"({limit})")
        return metadata

    def ids(self, ids: Sequence[str]) -> Sequence[str]:
        if not ids:
            raise BadRequest("`sessions` must name at least one session")
        if len(ids) > MAX_SESSION_BATCH:
            raise BadRequest(f"`sessions` names at most {MAX_SESSION_BATCH} sessions "
                             f"(max_session_batch), not {len(ids)}")
        for session_id in ids:
            self.id(session_id)
        return ids

    @staticmethod
    def id(session_id: str, key: str = "session") -> str:
        try:
            check_session_id(session_id)
        except ValueError as e:
            raise BadRequest(f"`{key}`: {e}, not {_shown(session_id)}") from None
        return session_id

    @staticmethod
    def state(text: str | None, allowed: Iterable[SessionState]) -> SessionState | None:
        if text is None:
            return None
        allowed = sorted(allowed)
        try:
            state = SessionState(text)
        except ValueError:
            state = None
        if state not in allowed:
            raise BadRequest(f"`state` must be one of {', '.join(allowed)}, not {_shown(text)}")
        return state

    def limit(self, limit: int | None) -> int:
        page = self.config.max_page
        if limit is None:
            return min(100, page)
        if not 1 <= limit <= page:
            raise BadRequest(f"`limit` must be from 1 to max_page ({page})")
        return limit

    def creatable(self, text: str | None) -> SessionState:
        return self.state(text, _CREATABLE) or SessionState.PENDING

    def settable(self, text: str | None) -> SessionState | None:
        return self.state(text, _SETTABLE)

    def listable(self, text: str | None) -> SessionState | None:
        return self.state(text, SessionState)


def _shown(text: str, limit: int = 40) -> str:
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def check_user(user: str) -> str:
    if not user or len(user) > MAX_USER_CHARS:
        raise BadRequest(f"`user` must be 1 to {MAX_USER_CHARS} characters")
    return user


def scope(caller: Caller, request: SessionRequest) -> str | None:
    """The user the store call is scoped to (None: every user, `session_list` only).

    Anonymous mode is trusted but still needs `user` (a session id alone is never enough),
    except on `session_list`, where its absence means every user. With [auth], `user`
    defaults to the principal; another user, or every user (`"*"` on `session_list`), needs
    the right "any"; the right "none" refuses every registry request.
    """
    user = request.user
    listing = type(request) is SessionList
    if user is not None and user == EVERY_USER and not listing:
        raise BadRequest('`user` "*" (every user) is only for session_list')
    if user is not None and user != EVERY_USER:
        check_user(user)
    if caller.principal is None:
        if user is None and not listing:
            raise BadRequest("`user` is required in anonymous mode")
        return None if user in (None, EVERY_USER) else user
    if caller.right is SessionsRight.NONE:
        raise Forbidden(f"not allowed: {request.OP}: the principal's roles grant no sessions")
    if user is None or user == caller.principal:
        return caller.principal
    if caller.right is not SessionsRight.ANY:
        raise Forbidden(f"not allowed: {request.OP} for another user than the principal "
                        "(name the principal as `user`, or give the role sessions = \"any\")")
    return None if user == EVERY_USER else user


def error_reply(request: SessionRequest, code: str, message: str) -> Error:
    return Error(code=code, message=message, id=request.id, ref=request.OP)


def bad_request(request: SessionRequest, problem: BadRequest) -> Error:
    return error_reply(request, ErrorCode.BAD_EVENT, f"{request.OP}: {problem}")


#: The requests that change the registry (a timeout leaves their outcome unknown).
CHANGES: tuple[type[SessionRequest], ...] = (SessionCreate, SessionTouch, SessionUpdate,
                                            SessionDelete)
READS: tuple[type[SessionRequest], ...] = (SessionGet, SessionList)


# --- the session topics ----------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)
LIFECYCLE, PRESENCE = "lifecycle", "presence"
_BROKER_LEVELS = (LIFECYCLE, PRESENCE)


@frozen
class SessionTopics:
    """The topics of application sessions: `{prefix}/{id}/...`."""

    prefix: str

    def lifecycle(self, session_id: str) -> str:
        return f"{self.prefix}{SEPARATOR}{session_id}{SEPARATOR}{LIFECYCLE}"

    def presence(self, session_id: str) -> str:
        """Where the join and leave events of a session are published (mqbroker.presence)."""
        return f"{self.prefix}{SEPARATOR}{session_id}{SEPARATOR}{PRESENCE}"

    def everything(self, session_id: str) -> str:
        """The filter of every topic of a session."""
        return f"{self.prefix}{SEPARATOR}{session_id}{SEPARATOR}{MULTI_LEVEL}"

    @property
    def every_lifecycle(self) -> str:
        """The filter of every session's lifecycle topic (each instance watches it)."""
        return f"{self.prefix}{SEPARATOR}{SINGLE_LEVEL}{SEPARATOR}{LIFECYCLE}"

    def _rest(self, text: str) -> str | None:
        head = self.prefix + SEPARATOR
        return text[len(head):] if text.startswith(head) else None

    def reserved(self, topic: str) -> bool:
        """Whether only the broker may publish on `topic` (a lifecycle or presence topic)."""
        if not topic.endswith(_BROKER_LEVELS):  # most topics: one check, no split
            return False
        rest = self._rest(topic)
        if rest is None:
            return False
        levels = rest.split(SEPARATOR)
        return len(levels) == 2 and levels[1] in (LIFECYCLE, PRESENCE)

    def session_of_lifecycle(self, topic: str) -> str | None:
        """The session id of a lifecycle topic; None for any other topic."""
        if not topic.endswith(LIFECYCLE):
            return None
        rest = self._rest(topic)
        if rest is None:
            return None
        session_id, _, tail = rest.partition(SEPARATOR)
        return session_id if tail == LIFECYCLE else None

    def session_of_filter(self, filter: str) -> str | None:
        """The session a filter lies inside (`{prefix}/{id}` or below, the id literal)."""
        rest = self._rest(filter)
        if rest is None:
            return None
        session_id = rest.partition(SEPARATOR)[0]
        if session_id in (SINGLE_LEVEL, MULTI_LEVEL) or not session_id:
            return None
        return session_id


@define
class ScopedSubscriptions(Generic[K]):
    """Which subscriptions lie inside each application session's topics, on this instance:
    what ends when the session ends. Connections are the keys (any hashable value).

    Lean, for 10,000s of idle sessions each holding one subscription: a subscription is one
    `(key, id)` tuple, shared by both maps, and a session held by one subscription maps to that
    tuple itself (only a session held by several gets a dict of them, in the order added)."""

    topics: SessionTopics
    _by_session: dict[str, tuple[K, int] | dict[tuple[K, int], None]] = field(factory=dict)
    _session_of: dict[tuple[K, int], str] = field(factory=dict)

    def add(self, key: K, sub_id: int, filter: str) -> None:
        session_id = self.topics.session_of_filter(filter)
        if session_id is None:
            return
        held = (key, sub_id)
        self.remove(key, sub_id)
        self._session_of[held] = session_id
        current = self._by_session.get(session_id)
        if current is None:
            self._by_session[session_id] = held
        elif isinstance(current, dict):
            current[held] = None
        else:
            self._by_session[session_id] = {current: None, held: None}

    def remove(self, key: K, sub_id: int) -> None:
        held = (key, sub_id)
        session_id = self._session_of.pop(held, None)
        if session_id is None:
            return
        current = self._by_session[session_id]
        if not isinstance(current, dict):
            del self._by_session[session_id]
            return
        del current[held]
        if len(current) == 1:
            self._by_session[session_id] = next(iter(current))

    def remove_all(self, key: K, sub_ids: Iterable[int]) -> None:
        for sub_id in sub_ids:
            self.remove(key, sub_id)

    def pop(self, session_id: str) -> dict[K, tuple[int, ...]]:
        """Forget the subscriptions inside one session's topics; each key's ids, ascending."""
        current = self._by_session.pop(session_id, None)
        if current is None:
            return {}
        by_key: dict[K, list[int]] = {}
        for held in current if isinstance(current, dict) else (current,):
            del self._session_of[held]
            by_key.setdefault(held[0], []).append(held[1])
        return {key: tuple(sorted(ids)) for key, ids in by_key.items()}

    def __len__(self) -> int:
        return len(self._session_of)
