"""Who a session is (authentication in `hello`) and what it may do (authorization per request).

`[auth] mode` picks an `Authenticator`: "anonymous" lets everyone in with every right (the
embedded default, bound to 127.0.0.1); "token" takes static tokens from the config, stored as
their SHA-256 so that the config file never holds a usable secret. A scheme is any object with
`authenticate` (the `Authenticator` protocol): a plugin could add one (see docs/security.md).

Authorization is per role, `[auth.roles.NAME]`: for each operation a list of MQTT filters, with
`{principal}` and `{session}` substituted from the credential. A topic is allowed when one
filter matches it; a filter (subscribe, forget) when one filter covers every topic it can
match. Decisions are cached per session, bounded, so that the per-publish cost is one lookup.

Nothing here does I/O or logs: the session logs `security.*` events (never the credential).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from attrs import field, frozen

from mqbroker.config import AuthConfig
from mqbroker.topics import covers, matches

#: Decisions remembered per session; past this the cache starts again (a session publishing
#: to ever new topics pays the match each time, which is what it would pay without a cache).
DECISION_CACHE = 4096


class Operation(enum.StrEnum):
    """The rights a role grants, one list of filters each."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    REPLAY = "replay"  # `since` on a subscribe, on top of `subscribe`
    FORGET = "forget"


class AuthFailed(Exception):
    """The credential does not open a session; `reason` is logged (never the credential)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@frozen(kw_only=True)
class Principal:
    """Who a session authenticated as: a name, its roles, and the session ids it may use."""

    name: str
    roles: tuple[str, ...] = ()
    sessions: tuple[str, ...] = ()


class Authenticator(Protocol):
    """A scheme checking the `auth` field of `hello` (None when the hello had none)."""

    def authenticate(self, credential: str | None) -> Principal:
        """The principal the credential names; raises AuthFailed when it names none."""
        ...


#: The principal of anonymous mode; `Permissions.everything` is what it may do.
ANONYMOUS = Principal(name="anonymous")


@frozen
class AnonymousAuthenticator:
    """Everyone is let in, whatever the credential (today's behaviour)."""

    def authenticate(self, credential: str | None) -> Principal:
        return ANONYMOUS


def token_hash(token: str) -> str:
    """What the config stores for a static token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@frozen
class TokenAuthenticator:
    """Static tokens, known by their SHA-256 hex digest."""

    principals: Mapping[str, Principal]

    def authenticate(self, credential: str | None) -> Principal:
        if not credential:
            raise AuthFailed("no credential")
        digest = token_hash(credential)
        for known, principal in self.principals.items():
            # Compared in constant time: the digest of a guess must not leak by timing.
            if hmac.compare_digest(known, digest):
                return principal
        raise AuthFailed("unknown token")


@frozen(kw_only=True)
class Rules:
    """A role's rights: filters per operation, before substitution."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    replay: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()

    def of(self, operation: Operation) -> tuple[str, ...]:
        result: tuple[str, ...] = getattr(self, operation.value)
        return result


def substitute(pattern: str, principal: Principal) -> list[str]:
    """`pattern` with `{principal}` and `{session}` replaced; one filter per session id the
    principal names (none when it names none and the pattern needs one)."""
    text = pattern.replace("{principal}", principal.name)
    if "{session}" not in text:
        return [text]
    return [text.replace("{session}", session) for session in principal.sessions]


@frozen
class Permissions:
    """What one principal may do: the substituted filters per operation, and a decision cache."""

    filters: Mapping[Operation, tuple[str, ...]]
    #: Anonymous mode: every check is skipped.
    everything: bool = False
    _cache: dict[tuple[Operation, str], bool] = field(factory=dict, eq=False, repr=False)

    @classmethod
    def of(cls, principal: Principal, roles: Mapping[str, Rules]) -> Permissions:
        filters: dict[Operation, tuple[str, ...]] = {}
        for operation in Operation:
            found: list[str] = []
            for role in principal.roles:
                rules = roles.get(role)
                if rules is not None:
                    for pattern in rules.of(operation):
                        found.extend(substitute(pattern, principal))
            filters[operation] = tuple(dict.fromkeys(found))
        return cls(filters)

    @classmethod
    def all(cls) -> Permissions:
        return cls({}, everything=True)

    def allows_topic(self, operation: Operation, topic: str) -> bool:
        """Whether `operation` (publish) is allowed on the topic."""
        if self.everything:
            return True
        key = (operation, topic)
        decision = self._cache.get(key)
        if decision is None:
            decision = any(matches(f, topic) for f in self.filters[operation])
            self._remember(key, decision)
        return decision

    def allows_filter(self, operation: Operation, filter: str) -> bool:
        """Whether `operation` is allowed on every topic the filter can match."""
        if self.everything:
            return True
        key = (operation, filter)
        decision = self._cache.get(key)
        if decision is None:
            decision = any(covers(f, filter) for f in self.filters[operation])
            self._remember(key, decision)
        return decision

    def _remember(self, key: tuple[Operation, str], decision: bool) -> None:
        if len(self._cache) >= DECISION_CACHE:
            self._cache.clear()
        self._cache[key] = decision


def principals_of(entries: Iterable[tuple[str, str, Sequence[str], Sequence[str]]]
                  ) -> dict[str, Principal]:
    """(sha256, principal, roles, sessions) rows as TokenAuthenticator takes them."""
    return {digest.lower(): Principal(name=name, roles=tuple(roles), sessions=tuple(sessions))
            for digest, name, roles, sessions in entries}


#: Principals whose permissions (and so decision caches) are kept, shared by their sessions.
PRINCIPALS_CACHE = 1024


@frozen
class Access:
    """The instance's authenticator and rules: what each session is checked against."""

    authenticator: Authenticator
    roles: Mapping[str, Rules]
    anonymous: bool = False
    _shared: dict[Principal, Permissions] = field(factory=dict, eq=False, repr=False)

    @classmethod
    def anyone(cls) -> Access:
        return cls(AnonymousAuthenticator(), {}, anonymous=True)

    def permissions(self, principal: Principal) -> Permissions:
        """The principal's permissions; sessions of one principal share them (and the cache)."""
        if self.anonymous:
            return Permissions.all()
        permissions = self._shared.get(principal)
        if permissions is None:
            if len(self._shared) >= PRINCIPALS_CACHE:
                self._shared.clear()
            permissions = self._shared[principal] = Permissions.of(principal, self.roles)
        return permissions


def access_of(config: AuthConfig) -> Access:
    """The Access an `[auth]` table describes."""
    if config.mode == "anonymous":
        return Access.anyone()
    roles = {name: Rules(publish=role.publish, subscribe=role.subscribe, replay=role.replay,
                         forget=role.forget) for name, role in config.roles.items()}
    tokens = principals_of((token.sha256, token.principal, token.roles, token.sessions)
                           for token in config.tokens)
    return Access(TokenAuthenticator(tokens), roles)
