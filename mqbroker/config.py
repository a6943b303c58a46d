"""The broker's configuration: config.toml validated into attrs values.

Every field has a default, so an empty file (or none) is the embedded single-instance setup.
Validation (types, ranges, unknown keys) is done by `load_config`, and for `[plugins.NAME]` by
`plugin_settings`; both raise ConfigError naming the file, the key path and what was expected.
See config.toml for the meaning of every key.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from attrs import field, frozen
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mapping,
    is_sequence,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import (
    BaseValidationError,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn
from cattrs.literals import is_literal

from mqbroker.redact import redact
from mqbroker.topics import InvalidTopic, validate_filter

if TYPE_CHECKING:
    from mqbroker.plugins import Plugin

DEFAULT_PORT = 7878
MiB = 1024 * 1024

SlowConsumerPolicy = Literal["disconnect", "drop_oldest"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]


# Validators come before the schema because its fields name them. Each one states what it
# expects in words, so that an error names the expectation rather than the check.


class _Invalid(ValueError):
    """A value its key does not accept; `load_config` adds the file and the key path."""

    def __init__(self, message: str, key: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        #: Where the value sits below the object being structured (set by attrs validators).
        self.key = key


class _Mismatch(_Invalid):
    """A value that is not what its key expects, said as "expected X, got Y"."""

    def __init__(self, expected: str, value: Any, key: tuple[str | int, ...] = ()) -> None:
        super().__init__(f"expected {expected}, got {value!r} ({type(value).__name__})", key)
        self.expected = expected
        self.value = value


#: For plugins: raise `SettingMismatch(expected, value, (attribute.name,))` from a settings
#: class's attrs validator, and the error names the key (`plugins.NAME.KEY: expected ...`).
SettingMismatch = _Mismatch


class _WrongType(_Mismatch):
    """Raised by structure hooks; the key's validator may phrase the expectation more precisely."""


@frozen
class _Number:
    """An attrs validator: a finite number within bounds, optionally below a sibling field."""

    expected: str
    minimum: float
    maximum: float = math.inf
    #: The minimum itself is not allowed.
    exclusive: bool = False
    #: The name of a field of the same object that this value must stay below.
    below: str | None = None

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        above_minimum = value > self.minimum if self.exclusive else value >= self.minimum
        if not (math.isfinite(value) and above_minimum and value <= self.maximum):
            raise _Mismatch(self.expected, value, (attribute.name,))
        if self.below is not None and value >= (limit := getattr(instance, self.below)):
            expected = f"{self.expected}, less than {self.below} ({limit})"
            raise _Mismatch(expected, value, (attribute.name,))


@frozen
class _NonEmpty:
    """An attrs validator: a non-empty string."""

    expected: str

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if not value:
            raise _Mismatch(self.expected, value, (attribute.name,))


_PORT = _Number("an integer from 0 to 65535", 0, 65535)
_POSITIVE = _Number("a positive integer", 1)
# A delivery's envelope (subs, event id, time) takes up to 1 KiB of a frame beside its payload.
_FRAME_BYTES = _Number("an integer of at least 4096 (bytes)", 4096)
_SECONDS = _Number("a finite number of seconds, 0 or more", 0)
_POSITIVE_SECONDS = _Number("a finite number of seconds greater than 0", 0, exclusive=True)
_RATE = _Number("a finite number, 0 or more (0: no limit)", 0)
_BURST = _Number("a finite number, 0 or more (0: one second's worth)", 0)
_HOST = _NonEmpty("a host name or IP address")
_PLUGIN = _NonEmpty("a plugin name")


def _plugin_tables(
    instance: Any, attribute: attrs.Attribute[Any], value: Mapping[str, Any]
) -> None:
    """`[plugins]` holds one table per plugin; a bare value there is a mistake."""
    for name, table in value.items():
        if not isinstance(table, dict):
            raise _Mismatch("a table of plugin settings", table, (attribute.name, name))


def _filters(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    """Every recorded filter is one a session could subscribe with."""
    for index, text in enumerate(value):
        try:
            validate_filter(text)
        except InvalidTopic as error:
            raise _Invalid(str(error), (attribute.name, index)) from error


#: An origin as browsers send it: scheme "://" host, an optional port, nothing after.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


def _origins(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    """Every allowed origin is "*" or one exact origin: a path or a trailing slash would never
    equal what a browser sends, and the operator would not learn why the page is refused."""
    for index, origin in enumerate(value):
        if origin != "*" and not _ORIGIN.fullmatch(origin.lower()):
            raise _Mismatch('an origin such as "https://app.example.com" (or "*")', origin,
                            (attribute.name, index))


@frozen(kw_only=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", validator=_HOST)
    #: 0 asks the OS for a free port (tests use it).
    port: int = field(default=DEFAULT_PORT, validator=_PORT)
    #: Empty: a random id per process run.
    instance_id: str = ""
    max_frame_bytes: int = field(default=1 * MiB, validator=_FRAME_BYTES)
    #: Connections served at once (handshaking ones included); past it, HTTP 503.
    max_connections: int = field(default=50_000, validator=_POSITIVE)
    max_subscriptions: int = field(default=1000, validator=_POSITIVE)
    #: Every overlapping wildcard filter adds to the cost of each publish it matches: these two
    #: bound that cost, per session and over all the sessions of the instance.
    max_wildcard_subscriptions: int = field(default=100, validator=_POSITIVE)
    max_wildcard_filters: int = field(default=10_000, validator=_POSITIVE)
    max_topic_length: int = field(default=1024, validator=_POSITIVE)
    max_topic_levels: int = field(default=32, validator=_POSITIVE)
    outbox_messages: int = field(default=10_000, validator=_POSITIVE)
    outbox_bytes: int = field(default=16 * MiB, validator=_POSITIVE)
    slow_consumer: SlowConsumerPolicy = "disconnect"
    ping_interval: float = field(
        default=20.0,
        validator=_Number(
            "a finite number of seconds greater than 0", 0, exclusive=True, below="idle_timeout"
        ),
    )
    idle_timeout: float = field(default=60.0, validator=_POSITIVE_SECONDS)
    hello_timeout: float = field(default=10.0, validator=_POSITIVE_SECONDS)
    shutdown_grace: float = field(default=5.0, validator=_SECONDS)
    #: A repeated (topic, msg_id) publish within this many seconds is not delivered again.
    dedup_window: float = field(default=120.0, validator=_SECONDS)
    #: Bounds of what an instance remembers for that (the pairs and their positions, no payload).
    dedup_max_entries: int = field(default=100_000, validator=_POSITIVE)
    dedup_max_bytes: int = field(default=64 * MiB, validator=_POSITIVE)
    #: Origins whose pages may connect; a handshake with any other `Origin` gets HTTP 403
    #: (browsers apply no CORS to WebSockets: this is the only thing that stops a web page).
    allowed_origins: tuple[str, ...] = field(default=(), validator=_origins)
    #: PEM files of the listener's certificate (chain) and private key; empty: plain ws://.
    #: Read and checked by mqbroker.tls.server_context (files are not config values).
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM file of the CAs whose client certificates are required (mutual TLS); empty: none.
    tls_client_ca: str = ""


@frozen(kw_only=True)
class LimitsConfig:
    """Rate limits, per session (and per peer address for new connections); 0 turns one off.

    Every limit is a token bucket: `rate` per second on average, up to `burst` at once (0: one
    second's worth). See config.toml for what each covers."""

    publish_messages_per_second: float = field(default=0.0, validator=_RATE)
    publish_messages_burst: float = field(default=0.0, validator=_BURST)
    publish_bytes_per_second: float = field(default=0.0, validator=_RATE)
    publish_bytes_burst: float = field(default=0.0, validator=_BURST)
    #: subscribe, unsubscribe, forget and latest.
    requests_per_second: float = field(default=0.0, validator=_RATE)
    requests_burst: float = field(default=0.0, validator=_BURST)
    #: A session refused this many times within violation_window is closed with 4029.
    max_violations: int = field(default=10, validator=_POSITIVE)
    violation_window: float = field(default=10.0, validator=_POSITIVE_SECONDS)
    connections_per_second_per_peer: float = field(default=0.0, validator=_RATE)
    connections_burst_per_peer: float = field(default=0.0, validator=_BURST)

    @property
    def session_limited(self) -> bool:
        """Whether any per-session limit is on (when none is, sessions skip the checks)."""
        return bool(self.publish_messages_per_second or self.publish_bytes_per_second
                    or self.requests_per_second)


@frozen(kw_only=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"


@frozen(kw_only=True)
class HistoryConfig:
    plugin: str = field(default="memory", validator=_PLUGIN)
    #: Filters of the topics whose messages are kept for replay.
    record: tuple[str, ...] = field(
        default=("mcp/session/+/message", "mcp/broadcast/#"), validator=_filters
    )
    max_messages: int = field(default=1000, validator=_POSITIVE)
    max_age: float = field(default=300.0, validator=_POSITIVE_SECONDS)
    max_topics: int = field(default=100_000, validator=_POSITIVE)
    max_bytes: int = field(default=256 * MiB, validator=_POSITIVE)


@frozen(kw_only=True)
class FanoutConfig:
    plugin: str = field(default="memory", validator=_PLUGIN)


def _topic_prefix(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Topic levels without wildcards, not starting with `$`: session topics are
    `{prefix}/{id}/...`, so the prefix followed by `/+/#` must be a valid filter."""
    expected = "topic levels without + or #, not starting with $"
    if not value or "+" in value or "#" in value or value.startswith("$"):
        raise _Mismatch(expected, value, (attribute.name,))
    try:
        validate_filter(f"{value}/+/#")
    except InvalidTopic as error:
        raise _Mismatch(f"{expected} ({error})", value, (attribute.name,)) from None


@frozen(kw_only=True)
class SessionsConfig:
    """The session registry (docs/sessions.md): application sessions and their presence."""

    #: The plugin whose session and presence stores hold the registry.
    plugin: str = field(default="memory", validator=_PLUGIN)
    #: A session's topics are `{topic_prefix}/{id}/...`; its lifecycle events go to
    #: `{topic_prefix}/{id}/lifecycle` and its presence events to `.../presence`.
    topic_prefix: str = field(default="mcp/session", validator=_topic_prefix)
    #: Seconds a session lives after its creation or last touch, unless the request says.
    default_ttl: float = field(default=1800.0, validator=_POSITIVE_SECONDS)
    #: The longest TTL a request may ask for.
    max_ttl: float = field(default=7 * 86400.0, validator=_POSITIVE_SECONDS)
    #: Seconds an expired or invalidated session is kept (so `get` says why it ended).
    retain_ended: float = field(default=300.0, validator=_SECONDS)
    #: Seconds between two rounds of the reaper, and the most it does in one round.
    reap_interval: float = field(default=1.0, validator=_POSITIVE_SECONDS)
    reap_batch: int = field(default=1000, validator=_POSITIVE)
    #: Bytes of a session's metadata, packed (msgpack).
    max_metadata_bytes: int = field(default=4096, validator=_POSITIVE)
    #: The most records one `session_list` page holds.
    max_page: int = field(default=1000, validator=_POSITIVE)
    #: Seconds a registry request may wait on the store before it is answered `unavailable`
    #: (or `outcome_unknown` for a change).
    request_timeout: float = field(default=5.0, validator=_POSITIVE_SECONDS)
    #: Seconds a presence entry lasts unless its instance announces it again (every third of
    #: it): a dead instance's clients leave every presence view within this time.
    presence_ttl: float = field(default=15.0, validator=_POSITIVE_SECONDS)


#: Characters a bearer token may hold (RFC 6750 section 2.1's b64token), so that it fits an
#: `Authorization` header as written.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_CHARS = 16


def _bearer_token(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Empty, or a token long enough not to be guessed. The message never repeats the value:
    it is a secret, and errors are printed and logged."""
    if value and (len(value) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(value)):
        raise _Invalid(f"expected empty or a token of at least {MIN_TOKEN_CHARS} characters "
                       "from A-Z a-z 0-9 - . _ ~ + / (then any '='); the value is not shown",
                       (attribute.name,))


@frozen(kw_only=True)
class MetricsConfig:
    #: Serve /health and /metrics over HTTP on this port; 0 turns it off.
    port: int = field(default=0, validator=_PORT)
    host: str = field(default="127.0.0.1", validator=_HOST)
    #: Non-empty: /health and /metrics answer 401 unless sent `Authorization: Bearer <token>`.
    #: Kept out of repr, so that no log of the config shows it.
    token: str = field(default="", validator=_bearer_token, repr=False)


#: The modes built in; any other `[auth] mode` names an installed plugin (mqbroker.plugins).
BUILT_IN_AUTH_MODES = ("anonymous", "token", "jwt", "mtls")
#: A role's `sessions` key: whose registry sessions its principals may see and change.
SessionsAccess = Literal["none", "own", "any"]
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
#: A principal becomes part of topics ({principal}): no separator, wildcard or placeholder.
_PRINCIPAL = re.compile(r"[^/+#{}$\s]+")


def _sha256(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _SHA256.fullmatch(value):
        raise _Mismatch("the SHA-256 of the token in hex (64 characters)", value,
                        (attribute.name,))


def _principal(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _PRINCIPAL.fullmatch(value):
        raise _Mismatch("a principal name without / + # { } $ or spaces", value,
                        (attribute.name,))


def _sessions(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for index, session in enumerate(value):
        if not _PRINCIPAL.fullmatch(session):
            raise _Mismatch("a session id without / + # { } $ or spaces", session,
                            (attribute.name, index))


def _rule_filters(instance: Any, attribute: attrs.Attribute[Any],
                  value: tuple[str, ...]) -> None:
    """Every rule is a filter once `{principal}` and `{session}` are filled in."""
    for index, text in enumerate(value):
        try:
            validate_filter(text.replace("{principal}", "p").replace("{session}", "s"))
        except InvalidTopic as error:
            raise _Invalid(str(error), (attribute.name, index)) from error


@frozen(kw_only=True)
class TokenConfig:
    """One static token of `[[auth.tokens]]`: its SHA-256 (never the token itself)."""

    sha256: str = field(validator=_sha256, repr=False)
    principal: str = field(validator=_principal)
    roles: tuple[str, ...] = ()
    #: The session ids `{session}` stands for in this principal's rules.
    sessions: tuple[str, ...] = field(default=(), validator=_sessions)


@frozen
class _Unset:
    """An attrs validator: None (the key is not set), or what `inner` accepts."""

    inner: _Number

    @property
    def expected(self) -> str:
        return self.inner.expected

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            self.inner(instance, attribute, value)


@frozen(kw_only=True)
class RoleLimitsConfig:
    """`[auth.roles.NAME.limits]`: the per-session keys of `[limits]` this role overrides
    (None: not set, the role leaves that key to `[limits]`). How several roles combine is
    mqbroker.ratelimit.most_generous."""

    publish_messages_per_second: float | None = field(default=None, validator=_Unset(_RATE))
    publish_messages_burst: float | None = field(default=None, validator=_Unset(_BURST))
    publish_bytes_per_second: float | None = field(default=None, validator=_Unset(_RATE))
    publish_bytes_burst: float | None = field(default=None, validator=_Unset(_BURST))
    requests_per_second: float | None = field(default=None, validator=_Unset(_RATE))
    requests_burst: float | None = field(default=None, validator=_Unset(_BURST))
    max_violations: int | None = field(default=None, validator=_Unset(_POSITIVE))
    violation_window: float | None = field(default=None,
                                           validator=_Unset(_POSITIVE_SECONDS))

    def overrides(self) -> dict[str, Any]:
        """The keys this role sets, with their values."""
        return {key: value for key, value in attrs.asdict(self).items() if value is not None}


@frozen(kw_only=True)
class IdentityConfig:
    """One client certificate of `[[auth.identities]]` (mode "mtls"): the subject common name
    (CN) it must carry, which is the principal, with its roles and session ids."""

    principal: str = field(validator=_principal)
    roles: tuple[str, ...] = ()
    sessions: tuple[str, ...] = field(default=(), validator=_sessions)


@frozen(kw_only=True)
class RoleConfig:
    """`[auth.roles.NAME]`: the filters each right covers, and the role's own rate limits."""

    publish: tuple[str, ...] = field(default=(), validator=_rule_filters)
    subscribe: tuple[str, ...] = field(default=(), validator=_rule_filters)
    replay: tuple[str, ...] = field(default=(), validator=_rule_filters)
    forget: tuple[str, ...] = field(default=(), validator=_rule_filters)
    limits: RoleLimitsConfig = field(factory=RoleLimitsConfig)
    #: The session registry: "own" (the principal's sessions), "any" (every user's) or "none".
    sessions: SessionsAccess = "own"


def _known_roles(instance: Any, attribute: attrs.Attribute[Any],
                 value: tuple[TokenConfig | IdentityConfig, ...]) -> None:
    """A token (or identity) naming a role that no [auth.roles.NAME] defines is a typo, not
    "no rights"."""
    for index, token in enumerate(value):
        for position, role in enumerate(token.roles):
            if role not in instance.roles:
                raise _Invalid(f"unknown role {role!r} (not an [auth.roles.{role}] table)",
                               (attribute.name, index, "roles", position))


def _one_jwt_key(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    """Mode "jwt" verifies with exactly one key: a shared secret (HS256), a PEM public key or
    a JWKS (RS256, ES256)."""
    if instance.mode != "jwt":
        return
    given = [name for name in ("jwt_secret_file", "jwt_public_key_file", "jwt_jwks_file")
             if getattr(instance, name)]
    if len(given) != 1:
        raise _Invalid("mode \"jwt\" needs exactly one of jwt_secret_file, jwt_public_key_file "
                       f"and jwt_jwks_file (given: {', '.join(given) or 'none'})",
                       (attribute.name,))


_CLAIM = _NonEmpty("a claim name")
_MODE = _NonEmpty(f"{', '.join(repr(m) for m in BUILT_IN_AUTH_MODES)} or an installed "
                  "plugin's name")


def _unique_identities(instance: Any, attribute: attrs.Attribute[Any],
                       value: tuple[IdentityConfig, ...]) -> None:
    """One entry per certificate name: two would leave which rights apply to chance."""
    seen: set[str] = set()
    for index, identity in enumerate(value):
        if identity.principal in seen:
            raise _Invalid(f"principal {identity.principal!r} is listed twice",
                           (attribute.name, index, "principal"))
        seen.add(identity.principal)


def _mtls_needs_client_certificates(instance: Any, attribute: attrs.Attribute[Any],
                                    value: AuthConfig) -> None:
    """Mode "mtls" names principals by verified client certificates: without a client CA the
    listener asks for none, and every session would be refused."""
    if value.mode == "mtls" and not instance.server.tls_client_ca:
        raise _Invalid('mode "mtls" needs server.tls_client_ca (the CA that signs the client '
                       "certificates), and with it server.tls_cert and server.tls_key",
                       (attribute.name, "mode"))


@frozen(kw_only=True)
class AuthConfig:
    """Authentication in `hello` and authorization per request (docs/security.md)."""

    #: A built-in mode, or the name of an installed plugin providing an authenticator
    #: (checked at start by mqbroker.cli.check_plugins and mqbroker.broker.open_broker).
    mode: str = field(default="anonymous", validator=_MODE)
    roles: Mapping[str, RoleConfig] = field(factory=dict)
    tokens: tuple[TokenConfig, ...] = field(default=(), validator=_known_roles)
    #: mode "mtls": the client certificates (by subject CN) that name principals.
    identities: tuple[IdentityConfig, ...] = field(default=(), validator=[
        _known_roles, _unique_identities])
    #: mode "jwt": exactly one of these key files (read at start by mqbroker.auth.access_of).
    jwt_secret_file: str = field(default="", validator=_one_jwt_key)
    jwt_public_key_file: str = ""
    jwt_jwks_file: str = ""
    #: Checked when not empty.
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway: float = field(default=30.0, validator=_SECONDS)
    jwt_roles_claim: str = field(default="roles", validator=_CLAIM)
    jwt_sessions_claim: str = field(default="sessions", validator=_CLAIM)
    #: Seconds an authenticator may take to answer a hello (a plugin's may do I/O); past
    #: it the hello is answered `unavailable` and closed with 1013.
    authenticate_timeout: float = field(default=5.0, validator=_POSITIVE_SECONDS)


def _auth_within_hello(instance: Any, attribute: attrs.Attribute[Any],
                       value: AuthConfig) -> None:
    """A hello waits for a plugin's authenticator within hello_timeout: a longer
    authenticate_timeout would never apply, and the client would be told `no hello in time`
    instead. (The built-in modes never wait: the key does not apply to them.)"""
    limit = instance.server.hello_timeout
    if value.mode not in BUILT_IN_AUTH_MODES and value.authenticate_timeout >= limit:
        raise _Mismatch(f"a finite number of seconds greater than 0, less than "
                        f"server.hello_timeout ({limit})", value.authenticate_timeout,
                        (attribute.name, "authenticate_timeout"))


@frozen(kw_only=True)
class Config:
    server: ServerConfig = field(factory=ServerConfig)
    limits: LimitsConfig = field(factory=LimitsConfig)
    log: LogConfig = field(factory=LogConfig)
    history: HistoryConfig = field(factory=HistoryConfig)
    fanout: FanoutConfig = field(factory=FanoutConfig)
    metrics: MetricsConfig = field(factory=MetricsConfig)
    auth: AuthConfig = field(factory=AuthConfig,
                             validator=[_auth_within_hello, _mtls_needs_client_certificates])
    sessions: SessionsConfig = field(factory=SessionsConfig)
    #: `[plugins.NAME]` tables, validated into each plugin's settings_type when it is loaded.
    plugins: Mapping[str, Any] = field(factory=dict, validator=_plugin_tables)


class ConfigError(Exception):
    """A configuration that cannot be used: names the file, the key path and what was expected.

    The message is printed and may be logged: a URL it echoes has its credentials masked.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


# --- Loading ---------------------------------------------------------------------------------

#: Where a value sits in the document: table keys, and indices into arrays.
KeyPath = tuple[str | int, ...]
_StructureHook = Callable[[Any, Any], Any]
_T = TypeVar("_T")


def load_config(path: str | Path | None) -> Config:
    """The configuration in the TOML file at `path`, or the defaults when `path` is None.

    Raises ConfigError naming the file, each offending key and what it expects.
    """
    if path is None:
        return Config()
    source = str(path)
    return _structure(_read_toml(Path(path), source), Config, source, ())


def plugin_settings(config: Config, plugin: Plugin, *, source: str = "config.toml") -> Any:
    """`[plugins.NAME]` validated into the plugin's settings_type; None when it has none.

    Raises ConfigError (naming `source` and keys such as `plugins.redis.url`) when the table
    does not fit, or when it is not empty and the plugin takes no settings.
    """
    table = config.plugins.get(plugin.name, {})
    key: KeyPath = ("plugins", plugin.name)
    if plugin.settings_type is None:
        if table:
            names = ", ".join(sorted(table))
            raise ConfigError(f"{source}: {_dotted(key)}: the plugin takes no settings ({names})")
        return None
    return _structure(table, plugin.settings_type, source, key)


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read the file: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text ({error.reason})") from error
    except tomllib.TOMLDecodeError as error:
        # tomllib's message carries the position: "... (at line 3, column 8)".
        raise ConfigError(f"{source}: invalid TOML: {error}") from error


def _structure(document: Any, cls: type[_T], source: str, key: KeyPath) -> _T:
    try:
        return _converter.structure(document, cls)
    except (BaseValidationError, _Invalid) as error:
        lines = [_line(source, where, text) for where, text in _problems(error, key)]
        raise ConfigError("\n".join(lines)) from error


def _line(source: str, key: KeyPath, text: str) -> str:
    return f"{source}: {_dotted(key)}: {text}" if key else f"{source}: {text}"


# --- Turning cattrs' structured exceptions into key paths and sentences ----------------------


def _problems(
    error: BaseException, key: KeyPath, hint: str | None = None
) -> Iterator[tuple[KeyPath, str]]:
    """(key path, what is wrong) for every failure in a cattrs exception tree.

    `hint` is the expectation of the attribute being structured, from its validator: it turns
    "expected an integer" into "expected an integer from 0 to 65535".
    """
    if isinstance(error, ClassValidationError):
        with_notes, others = error.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, (*key, note.name), _expectation(error.cl, note.name))
        for sub in others:
            yield from _problems(sub, key)
    elif isinstance(error, IterableValidationError):
        indexed, others = error.group_exceptions()
        for sub, index_note in indexed:
            yield from _problems(sub, (*key, index_note.index))
        for sub in others:
            yield from _problems(sub, key)
    elif isinstance(error, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(error.cl)]
        for name in sorted(error.extra_fields):
            yield (*key, name), _unknown_key(name, known)
    else:
        yield _leaf(error, key, hint)


def _leaf(error: BaseException, key: KeyPath, hint: str | None) -> tuple[KeyPath, str]:
    if isinstance(error, _WrongType) and hint is not None:
        return key, str(_Mismatch(hint, error.value))
    if isinstance(error, _Invalid):
        return (*key, *error.key), str(error)
    if isinstance(error, KeyError):
        return key, "missing: this key is required"
    # A plugin's own attrs validators or converters: their message is all we have.
    return key, str(error) or type(error).__name__


def _expectation(cls: type, name: str) -> str | None:
    if not attrs.has(cls):
        return None
    validator = attrs.fields_dict(cls)[name].validator
    expected = getattr(validator, "expected", None)
    return expected if isinstance(expected, str) else None


def _unknown_key(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({guess}known: {', '.join(known) or 'none'})"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(key: KeyPath) -> str:
    """A key path as TOML spells it: `server.port`, `history.record[2]`, `plugins."a.b"`."""
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            text += f".{name}" if text else name
    return text


# --- The converter: cattrs, strict about TOML's types ----------------------------------------
# cattrs' default hooks coerce (int("8") == 8, str(5) == "5", tuple("ab") == ("a", "b")), which
# would hide mistakes in a config file; these hooks accept only the TOML type each field names.


def _primitive(
    expected: str, accepts: Callable[[Any], bool], convert: Callable[[Any], Any]
) -> _StructureHook:
    def structure(value: Any, _: Any) -> Any:
        if not accepts(value):
            raise _WrongType(expected, value)
        return convert(value)

    return structure


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # TOML writes 20 and 20.0 differently; a duration of 20 seconds is fine either way.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _structure_literal(value: Any, literal: Any) -> Any:
    options = get_args(literal)
    if any(type(value) is type(option) and value == option for option in options):
        return value
    raise _WrongType(f"one of {', '.join(repr(option) for option in options)}", value)


def _requiring(kind: type, expected: str, inner: _StructureHook) -> _StructureHook:
    """`inner`, once the value is of TOML type `kind` (cattrs would iterate a string)."""

    def structure(value: Any, cls: Any) -> Any:
        if not isinstance(value, kind):
            raise _WrongType(expected, value)
        return inner(value, cls)

    return structure


def _table_hook(cls: type, converter: cattrs.Converter) -> _StructureHook:
    return _requiring(dict, "a table", make_dict_structure_fn(cls, converter))


def _mapping_hook(cls: Any, converter: cattrs.Converter) -> _StructureHook:
    return _requiring(dict, "a table", mapping_structure_factory(cls, converter, dict))


def _is_array(cls: Any) -> bool:
    return is_sequence(cls) and get_origin(cls) in (tuple, list)


def _array_hook(cls: Any, converter: cattrs.Converter) -> _StructureHook:
    factory = (
        homogenous_tuple_structure_factory if get_origin(cls) is tuple else (list_structure_factory)
    )
    return _requiring(list, "an array", factory(cls, converter))


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _primitive("an integer", _is_int, int))
    converter.register_structure_hook(float, _primitive("a number", _is_number, float))
    converter.register_structure_hook(str, _primitive("a string", _is_str, str))
    converter.register_structure_hook(bool, _primitive("true or false", _is_bool, bool))
    converter.register_structure_hook_func(is_literal, _structure_literal)
    converter.register_structure_hook_factory(attrs.has, _table_hook)
    converter.register_structure_hook_factory(is_mapping, _mapping_hook)
    converter.register_structure_hook_factory(_is_array, _array_hook)
    return converter


_converter = _make_converter()
