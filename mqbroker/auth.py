"""Who a session is (authentication in `hello`) and what it may do (authorization per request).

`[auth] mode` picks an `Authenticator`: "anonymous" lets everyone in with every right (the
embedded default, bound to 127.0.0.1); "token" takes static tokens from the config, stored as
their SHA-256 so that the config file never holds a usable secret; "jwt" verifies JSON Web
Tokens (PyJWT) with a key file; "mtls" takes the principal from the subject CN of the client
certificate the TLS handshake verified; any other name is a plugin's scheme (mqbroker.plugins:
the broker opens it and hands it to `access_of`). A scheme is any object with an async
`authenticate` (the `Authenticator` protocol); the built-in ones never wait.

A credential given in `hello` (token, jwt) can be replaced in the open session by `refresh`:
`Access.refresh` checks it names the same principal (see docs/security.md).

Authorization is per role, `[auth.roles.NAME]`: for each operation a list of MQTT filters, with
`{principal}` and `{session}` substituted from the credential. A topic is allowed when one
filter matches it; a filter (subscribe, forget) when one filter covers every topic it can
match. Decisions are cached per session, bounded, so that the per-publish cost is one lookup.
A role may also override the per-session rate limits (`[auth.roles.NAME.limits]`); a session's
limits are its principal's roles' combined (`Access.rates`).

Nothing here does I/O or logs: the session logs `security.*` events (never the credential).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import jwt
from attrs import field, frozen

from mqbroker.config import AuthConfig, Config, ConfigError
from mqbroker.ratelimit import Rates, most_generous
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
    #: When the credential stops being valid (Unix time, leeway included); None: never.
    #: Not part of equality: sessions of one principal share permissions whatever it is.
    expires: float | None = field(default=None, eq=False)


class Authenticator(Protocol):
    """A scheme checking the `auth` field of `hello` (None when the hello had none).

    `authenticate` is awaited in the task of the session whose hello it checks, so it may do
    I/O (an introspection endpoint, say) without holding up other sessions, as long as it
    waits the async way: a blocking call (a synchronous HTTP client, a slow hash) stalls the
    whole broker; run such work with `trio.to_thread.run_sync`. The broker bounds it with
    `[auth] authenticate_timeout` (cancelling it past that) and answers the hello
    `unavailable`; any exception but AuthFailed is answered `internal`. Both are logged
    without the credential; the broker carries on."""

    async def authenticate(self, credential: str | None) -> Principal:
        """The principal the credential names; raises AuthFailed when it names none."""
        ...


#: The principal of anonymous mode; `Permissions.everything` is what it may do.
ANONYMOUS = Principal(name="anonymous")


@frozen
class AnonymousAuthenticator:
    """Everyone is let in, whatever the credential (today's behaviour)."""

    async def authenticate(self, credential: str | None) -> Principal:
        return ANONYMOUS


def token_hash(token: str) -> str:
    """What the config stores for a static token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@frozen
class TokenAuthenticator:
    """Static tokens, known by their SHA-256 hex digest."""

    principals: Mapping[str, Principal]

    async def authenticate(self, credential: str | None) -> Principal:
        return self.check(credential)

    def check(self, credential: str | None) -> Principal:
        """`authenticate`, which never waits, called without an event loop."""
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
    #: The session registry: "none", "own" or "any" (mqbroker.registry.SessionsRight).
    sessions: str = "own"

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


#: The `sessions` rights, narrowest first.
SESSIONS_ORDER = ("none", "own", "any")


@frozen
class Permissions:
    """What one principal may do: the substituted filters per operation, and a decision cache."""

    filters: Mapping[Operation, tuple[str, ...]]
    #: Anonymous mode: every check is skipped.
    everything: bool = False
    #: Whose registry sessions the principal may see and change: the widest of its roles'
    #: `sessions` (none < own < any); none without a role.
    sessions: str = "none"
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
        granted = [roles[role].sessions for role in principal.roles if role in roles]
        return cls(filters, sessions=max(granted, key=SESSIONS_ORDER.index, default="none"))

    @classmethod
    def all(cls) -> Permissions:
        return cls({}, everything=True, sessions="any")

    def allows_topic(self, operation: Operation, topic: str) -> bool:
        """Whether `operation` (publish) is allowed on the topic."""
        return self.everything or self._decide(operation, topic, matches)

    def allows_filter(self, operation: Operation, filter: str) -> bool:
        """Whether `operation` is allowed on every topic the filter can match."""
        return self.everything or self._decide(operation, filter, covers)

    def _decide(self, operation: Operation, text: str, allowed_by: Callable[[str, str], bool]
                ) -> bool:
        """Whether one of the operation's filters allows `text`, cached. Topics and filters
        share the cache: a topic has no wildcard, and on one the two tests agree."""
        key = (operation, text)
        decision = self._cache.get(key)
        if decision is None:
            decision = any(allowed_by(f, text) for f in self.filters[operation])
            self._remember(key, decision)
        return decision

    def _remember(self, key: tuple[Operation, str], decision: bool) -> None:
        if len(self._cache) >= DECISION_CACHE:
            self._cache.clear()
        self._cache[key] = decision


@frozen
class CertificateAuthenticator:
    """Mode "mtls": the credential is the subject CN of the verified client certificate (the
    session passes it in, not the hello), known when listed in `[[auth.identities]]`."""

    principals: Mapping[str, Principal]

    async def authenticate(self, credential: str | None) -> Principal:
        if credential is None:
            raise AuthFailed("no client certificate with one subject common name")
        principal = self.principals.get(credential)
        if principal is None:
            raise AuthFailed("unknown client certificate")
        return principal


def principals_of(entries: Iterable[tuple[str, str, Sequence[str], Sequence[str]]]
                  ) -> dict[str, Principal]:
    """(sha256, principal, roles, sessions) rows as TokenAuthenticator takes them."""
    return {digest.lower(): Principal(name=name, roles=tuple(roles), sessions=tuple(sessions))
            for digest, name, roles, sessions in entries}


#: Principals whose permissions (and so decision caches) are kept, shared by their sessions.
PRINCIPALS_CACHE = 1024
#: A longer credential is refused before it is looked at: the longest real JWT is a few KiB,
#: and one of a frame's size would cost its decoding for nothing.
MAX_CREDENTIAL_CHARS = 16 * 1024


@frozen
class Access:
    """The instance's authenticator, rules and rate limits: what each session is checked
    against."""

    authenticator: Authenticator
    roles: Mapping[str, Rules]
    anonymous: bool = False
    #: `[limits]`: the rate limits of a session none of whose roles sets its own.
    rates: Rates = field(factory=Rates)
    #: The limits of each role with a `[auth.roles.NAME.limits]` table ([limits] overridden).
    role_rates: Mapping[str, Rates] = field(factory=dict)
    #: `[auth] authenticate_timeout`, for a plugin's authenticator: how long a hello waits for
    #: it. None for the built-in ones, which never wait: they are called without a cancel
    #: scope, and what they return is not checked again (about 10 us less per hello).
    timeout: float | None = None
    #: Mode "mtls": the credential is the client certificate's name, not the hello's `auth`.
    by_certificate: bool = False
    _shared: dict[Principal, Permissions] = field(factory=dict, eq=False, repr=False)

    @classmethod
    def anyone(cls, rates: Rates | None = None) -> Access:
        return cls(AnonymousAuthenticator(), {}, anonymous=True, rates=rates or Rates())

    @property
    def refreshable(self) -> bool:
        """Whether a session's credential can be replaced with `refresh`: only one the client
        sent (token, jwt); anonymous sessions have none, a certificate is the connection's."""
        return not self.anonymous and not self.by_certificate

    async def authenticate(self, credential: str | None) -> Principal:
        """The principal `credential` names; raises AuthFailed (with a reason to log). A
        plugin's answer is the caller's to bound (`timeout`) and check (`checked_principal`)."""
        if (credential is not None and len(credential) > MAX_CREDENTIAL_CHARS
                and not self.anonymous):
            raise AuthFailed(f"credential longer than {MAX_CREDENTIAL_CHARS} characters")
        return await self.authenticator.authenticate(credential)

    @staticmethod
    def refreshed(current: Principal, new: Principal) -> Principal:
        """`new`, the principal a session's new credential names, if it is the session's
        `current` one (its roles, sessions and expiry may differ). Raises AuthFailed."""
        if new.name != current.name:
            raise AuthFailed("credential for another principal")
        return new

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

    def rates_of(self, principal: Principal) -> Rates:
        """The principal's rate limits: the most generous of its roles' for each key (see
        `most_generous`); `[limits]` when none of its roles sets limits of its own."""
        own = [self.role_rates[role] for role in principal.roles if role in self.role_rates]
        return most_generous(own) if own else self.rates


#: What a principal or session id from a token may look like (it becomes part of topics).
_NAME = re.compile(r"[^/+#{}$\s]+")


@frozen(kw_only=True)
class JwtAuthenticator:
    """JSON Web Tokens (PyJWT): signature, `exp` (required), `nbf`, `iss` and `aud` checked
    with `leeway` seconds; `sub` is the principal, `roles_claim` its roles and
    `sessions_claim` the session ids `{session}` stands for."""

    key: Any = field(repr=False)
    algorithms: tuple[str, ...]
    #: A JWKS: the key is picked by the token's `kid` (`key` is then unused).
    jwks: jwt.PyJWKSet | None = field(default=None, repr=False)
    issuer: str = ""
    audience: str = ""
    leeway: float = 30.0
    roles_claim: str = "roles"
    sessions_claim: str = "sessions"

    async def authenticate(self, credential: str | None) -> Principal:
        return self.check(credential)

    def check(self, credential: str | None) -> Principal:
        """`authenticate`, which never waits, called without an event loop."""
        if not credential:
            raise AuthFailed("no credential")
        try:
            claims = jwt.decode(credential, self._key(credential),
                                algorithms=list(self.algorithms),
                                audience=self.audience or None, issuer=self.issuer or None,
                                leeway=self.leeway, options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthFailed("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailed("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthFailed("token for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthFailed("token from another issuer") from None
        except jwt.PyJWTError as e:
            raise AuthFailed(f"invalid token ({type(e).__name__})") from None
        return Principal(name=_name(claims.get("sub"), "sub"),
                         roles=_names(claims.get(self.roles_claim, []), self.roles_claim),
                         sessions=_names(claims.get(self.sessions_claim, []),
                                         self.sessions_claim),
                         expires=float(claims["exp"]) + self.leeway)

    def _key(self, credential: str) -> Any:
        if self.jwks is None:
            return self.key
        try:
            kid = jwt.get_unverified_header(credential).get("kid")
        except jwt.PyJWTError as e:
            raise AuthFailed(f"invalid token ({type(e).__name__})") from None
        keys = self.jwks.keys
        if kid is None and len(keys) == 1:
            return keys[0].key
        for key in keys:
            if key.key_id == kid:
                return key.key
        raise AuthFailed("unknown key id")


def _name(value: Any, claim: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise AuthFailed(f"claim {claim!r} is not a name without / + # {{ }} $ or spaces")
    return value


def _names(value: Any, claim: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise AuthFailed(f"claim {claim!r} is not a list of names")
    return tuple(_name(item, claim) for item in value)


def _read(config: AuthConfig, key: str) -> str:
    path = getattr(config, key)
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"auth.{key}: cannot read {path!r}: {e}") from None


def jwt_authenticator(config: AuthConfig) -> JwtAuthenticator:
    """The JWT scheme of `[auth]`, its key file read now; ConfigError names a bad key."""
    settings: dict[str, Any] = {
        "issuer": config.jwt_issuer, "audience": config.jwt_audience,
        "leeway": config.jwt_leeway, "roles_claim": config.jwt_roles_claim,
        "sessions_claim": config.jwt_sessions_claim}
    if config.jwt_secret_file:
        secret = _read(config, "jwt_secret_file").strip()
        if len(secret) < 32:
            raise ConfigError("auth.jwt_secret_file: the secret must be at least 32 characters")
        return JwtAuthenticator(key=secret, algorithms=("HS256",), **settings)
    # Public keys only: HS256 is never accepted with them (the algorithm confusion attack).
    algorithms = ("RS256", "ES256")
    if config.jwt_public_key_file:
        text = _read(config, "jwt_public_key_file")
        if "PUBLIC KEY" not in text:
            raise ConfigError("auth.jwt_public_key_file: expected a PEM public key")
        return JwtAuthenticator(key=text, algorithms=algorithms, **settings)
    try:
        jwks = jwt.PyJWKSet.from_json(_read(config, "jwt_jwks_file"))
    except jwt.PyJWTError as e:
        raise ConfigError(f"auth.jwt_jwks_file: not a usable JWKS: {e}") from None
    return JwtAuthenticator(key=None, algorithms=algorithms, jwks=jwks, **settings)


def access_of(config: Config, plugin: Authenticator | None = None) -> Access:
    """The Access `config` describes: `[auth]` (JWT key files are read now), its roles'
    limits over `[limits]`. `plugin` is the authenticator of a mode that is not built in,
    opened by the caller (mqbroker.broker.open_broker)."""
    auth = config.auth
    rates = Rates.of(config.limits)
    if auth.mode == "anonymous":
        return Access.anyone(rates)
    roles = {name: Rules(publish=role.publish, subscribe=role.subscribe, replay=role.replay,
                         forget=role.forget, sessions=role.sessions)
             for name, role in auth.roles.items()}
    role_rates = {name: Rates.of(attrs.evolve(config.limits, **role.limits.overrides()))
                  for name, role in auth.roles.items() if role.limits.overrides()}
    return Access(_authenticator(auth, plugin), roles, rates=rates, role_rates=role_rates,
                  timeout=None if plugin is None else auth.authenticate_timeout,
                  by_certificate=auth.mode == "mtls")


def _authenticator(config: AuthConfig, plugin: Authenticator | None) -> Authenticator:
    if config.mode == "jwt":
        return jwt_authenticator(config)
    if config.mode == "mtls":
        return CertificateAuthenticator({
            identity.principal: Principal(name=identity.principal, roles=tuple(identity.roles),
                                          sessions=tuple(identity.sessions))
            for identity in config.identities})
    if config.mode == "token":
        return TokenAuthenticator(principals_of(
            (token.sha256, token.principal, token.roles, token.sessions)
            for token in config.tokens))
    if plugin is None:
        raise ConfigError(f"auth.mode: {config.mode!r} is a plugin's scheme: open it with "
                          "mqbroker.broker.open_broker")
    return plugin


def checked_principal(value: object) -> Principal:
    """What a plugin's authenticate returned, checked as the built-in schemes check theirs:
    a Principal whose name, roles and session ids can become parts of topics. Raises
    TypeError or ValueError (a fault of the plugin, not of the credential)."""
    if not isinstance(value, Principal):
        raise TypeError(f"authenticate returned {type(value).__name__}, not a Principal")
    for what, names in (("name", (value.name,)), ("roles", value.roles),
                        ("sessions", value.sessions)):
        if not isinstance(names, tuple) or not all(
                isinstance(name, str) and _NAME.fullmatch(name) for name in names):
            raise ValueError(f"the principal's {what}: not names without / + # {{ }} $ or "
                             "spaces")
    expires = value.expires
    if expires is not None and (not isinstance(expires, int | float)
                                or isinstance(expires, bool) or not math.isfinite(expires)):
        raise ValueError("the principal's expires: not None nor a finite Unix time")
    return value
