"""The protocol's events: one frozen value class per operation, in both directions.

A frame carries one event or a batch of them; docs/protocol.md is the normative description.
Field names here are the wire keys. Pure: no I/O.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from attrs import field, frozen

PROTOCOL_VERSION = 1

__all__ = [
    "CLIENT_EVENTS",
    "PROTOCOL_VERSION",
    "SERVER_EVENTS",
    "SESSION_REQUESTS",
    "ClientEvent",
    "CloseCode",
    "Delivery",
    "Dropped",
    "Ended",
    "Error",
    "ErrorCode",
    "Event",
    "Forget",
    "Forgot",
    "GapNotice",
    "Hello",
    "Latest",
    "LatestAck",
    "Payload",
    "Ping",
    "Pong",
    "Presence",
    "Present",
    "PubAck",
    "Publish",
    "Refresh",
    "Refreshed",
    "ServerEvent",
    "SessionCreate",
    "SessionDelete",
    "SessionGet",
    "SessionList",
    "SessionReply",
    "SessionRequest",
    "SessionTouch",
    "SessionUpdate",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "Welcome",
]

Payload = Any


class ErrorCode(enum.StrEnum):
    """Stable error codes carried by `error` events (docs/protocol.md, "Errors")."""

    BAD_FRAME = "bad_frame"  # not valid msgpack / JSON, or not a map or array of maps
    BAD_EVENT = "bad_event"  # a field is missing or has the wrong type
    UNKNOWN_OP = "unknown_op"
    UNSUPPORTED_VERSION = "unsupported_version"
    HELLO_REQUIRED = "hello_required"  # an operation before `hello`
    ALREADY_HELLO = "already_hello"  # a second `hello`
    INVALID_TOPIC = "invalid_topic"
    INVALID_FILTER = "invalid_filter"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    DUPLICATE_SUBSCRIPTION = "duplicate_subscription"
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    MESSAGE_TOO_LARGE = "message_too_large"
    BAD_EVENT_ID = "bad_event_id"  # `since` is not an event id this broker issues
    SINCE_UNSUPPORTED = "since_unsupported"  # `since` on a wildcard filter
    UNAVAILABLE = "unavailable"  # the fan-out or history backend cannot be reached
    # The request may or may not have been carried out (a timeout after Redis got it): a retry
    # must reuse the same msg_id, which dedup then absorbs.
    OUTCOME_UNKNOWN = "outcome_unknown"
    INTERNAL = "internal"
    # Over one of the session's rate limits ([limits]): nothing was done; retry later.
    RATE_LIMITED = "rate_limited"
    # The hello's `auth` credential is missing or not valid ([auth] mode); closed with 4003.
    UNAUTHORIZED = "unauthorized"
    # The session's principal has no right to this operation on this topic or filter ([auth]).
    FORBIDDEN = "forbidden"
    # A `refresh` where the session's credential cannot be refreshed: anonymous mode, or a
    # principal named by the client certificate (mode mtls). The session stays open.
    REFRESH_UNSUPPORTED = "refresh_unsupported"
    # The session registry (docs/sessions.md): the codes of mqbroker.sessions' errors.
    SESSION_NOT_FOUND = "session_not_found"  # no such session for this user
    SESSION_EXISTS = "session_exists"  # `session_create` with an id already taken
    ILLEGAL_TRANSITION = "illegal_transition"  # a state change the states do not allow
    VERSION_CONFLICT = "version_conflict"  # `version` is not the session's current one
    # A publish on a topic only the broker publishes to ({prefix}/{id}/lifecycle, .../presence).
    RESERVED_TOPIC = "reserved_topic"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker uses (docs/protocol.md, "Closing")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the broker is shutting down
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (unmasked, bad opcode, bad length...)
    INVALID_DATA = 1007  # a text frame (or close reason) that is not valid UTF-8
    MESSAGE_TOO_BIG = 1009  # a frame over max_frame_bytes
    INTERNAL_ERROR = 1011  # a broker bug, or the hello's authenticator failed unexpectedly
    TRY_AGAIN_LATER = 1013  # the hello's authenticator did not answer in time
    HANDSHAKE_FAILED = 4000  # no valid `hello` first, in time, with a supported version
    IDLE_TIMEOUT = 4001  # nothing received for idle_timeout seconds
    #: The hello (or a refresh) had no valid credential, or the session's credential expired.
    UNAUTHORIZED = 4003
    SLOW_CONSUMER = 4008  # the outbox overflowed under the `disconnect` policy
    RATE_LIMITED = 4029  # max_violations of the rate limits within violation_window


# --- client to server -------------------------------------------------------------------------


@frozen(kw_only=True)
class Hello:
    OP: ClassVar[str] = "hello"
    version: int
    client: str = ""
    #: The credential ([auth] mode): a static token. Never logged.
    auth: str | None = field(default=None, repr=False)


@frozen(kw_only=True)
class Subscribe:
    OP: ClassVar[str] = "subscribe"
    #: The client-chosen subscription id; deliveries list it in `subs`.
    id: int
    filter: str
    #: Replay every recorded message after this event id, then continue live.
    since: str | None = None


@frozen(kw_only=True)
class Unsubscribe:
    OP: ClassVar[str] = "unsubscribe"
    id: int


@frozen(kw_only=True)
class Publish:
    OP: ClassVar[str] = "publish"
    topic: str
    payload: Payload = None
    #: A request id: when present the broker answers with `puback` (or `error`) carrying it.
    id: int | None = None
    #: An idempotency key: a repeat on the same topic within the dedup window is not delivered
    #: again, and its puback carries the original event id.
    msg_id: str | None = None


@frozen(kw_only=True)
class Forget:
    OP: ClassVar[str] = "forget"
    id: int
    filter: str


@frozen(kw_only=True)
class Refresh:
    """A new credential for the open session, before the current one expires ([auth])."""

    OP: ClassVar[str] = "refresh"
    id: int
    #: The new credential (a JWT, a static token). Never logged, never echoed.
    auth: str = field(repr=False)


@frozen(kw_only=True)
class Ping:
    OP: ClassVar[str] = "ping"
    id: int | None = None


@frozen(kw_only=True)
class Presence:
    """Who holds subscriptions to an application session's topics, on every instance."""

    OP: ClassVar[str] = "presence"
    id: int
    #: The application session's id.
    session: str


# --- the session registry (docs/sessions.md), client to server ---------------------------------
#
# Each is a request with an `id`, answered by `sessions` (or `error`) carrying that id and the
# request's op as `ref`. `user` scopes the request (docs/protocol.md, "Sessions").


@frozen(kw_only=True)
class SessionCreate:
    OP: ClassVar[str] = "session_create"
    id: int
    #: The session id; the broker makes one when absent.
    session: str | None = None
    user: str | None = None
    #: Seconds; `[sessions] default_ttl` when absent.
    ttl: float | None = None
    #: "pending" (the default) or "active".
    state: str | None = None
    metadata: dict[str, Any] | None = None


@frozen(kw_only=True)
class SessionGet:
    OP: ClassVar[str] = "session_get"
    id: int
    sessions: tuple[str, ...]
    user: str | None = None


@frozen(kw_only=True)
class SessionTouch:
    OP: ClassVar[str] = "session_touch"
    id: int
    sessions: tuple[str, ...]
    user: str | None = None
    #: Seconds; each session's own ttl when absent.
    ttl: float | None = None


@frozen(kw_only=True)
class SessionUpdate:
    OP: ClassVar[str] = "session_update"
    id: int
    session: str
    user: str | None = None
    state: str | None = None
    #: Replaces the metadata whole.
    metadata: dict[str, Any] | None = None
    #: Carried out only if the session is at this version.
    version: int | None = None


@frozen(kw_only=True)
class SessionDelete:
    OP: ClassVar[str] = "session_delete"
    id: int
    session: str
    user: str | None = None


@frozen(kw_only=True)
class SessionList:
    OP: ClassVar[str] = "session_list"
    id: int
    user: str | None = None
    state: str | None = None
    #: The `next` of the previous page.
    after: str | None = None
    limit: int | None = None


SessionRequest = (
    SessionCreate | SessionGet | SessionTouch | SessionUpdate | SessionDelete | SessionList
)
SESSION_REQUESTS: tuple[type[SessionRequest], ...] = (
    SessionCreate, SessionGet, SessionTouch, SessionUpdate, SessionDelete, SessionList,
)


@frozen(kw_only=True)
class Latest:
    """Ask for the event id of a topic's newest recorded message."""

    OP: ClassVar[str] = "latest"
    id: int
    topic: str


# --- server to client -------------------------------------------------------------------------


@frozen(kw_only=True)
class Welcome:
    OP: ClassVar[str] = "welcome"
    version: int
    #: This broker process's instance id.
    instance: str
    #: This connection's session id (appears in the broker's logs).
    session: str
    #: The limits in force: max_frame_bytes, max_subscriptions, max_topic_length, ...
    limits: dict[str, Any] = field(factory=dict)
    #: Who the session authenticated as; absent in anonymous mode.
    principal: str | None = None
    #: Seconds until the broker closes the session (4003) unless it sends a `refresh`;
    #: absent when the credential does not expire.
    ttl: float | None = None


@frozen(kw_only=True)
class SubAck:
    OP: ClassVar[str] = "suback"
    id: int
    #: Set when the subscribe asked for `since`: False means a gap, and `reason` says why.
    recovered: bool | None = None
    reason: str | None = None
    #: With `since`: the event id of the last replayed message (the replay follows the suback),
    #: absent when nothing is replayed. Live messages begin after it (the replay boundary).
    last: str | None = None


@frozen(kw_only=True)
class UnsubAck:
    OP: ClassVar[str] = "unsuback"
    id: int


@frozen(kw_only=True)
class PubAck:
    OP: ClassVar[str] = "puback"
    id: int
    event: str


@frozen(kw_only=True)
class Forgot:
    OP: ClassVar[str] = "forgot"
    id: int
    topics: int


@frozen(kw_only=True)
class Present:
    """The answer to `presence`: one map per connection present (docs/protocol.md)."""

    OP: ClassVar[str] = "present"
    id: int
    entries: tuple[dict[str, Any] | None, ...] = ()
    #: More entries exist than fit in half a frame: `entries` are the first of them.
    more: bool = False


@frozen(kw_only=True)
class Refreshed:
    """The answer to `refresh`: the new credential is the session's from now on."""

    OP: ClassVar[str] = "refreshed"
    id: int
    #: As in `welcome`: seconds until the session must refresh again; absent: never.
    ttl: float | None = None


@frozen(kw_only=True)
class LatestAck:
    OP: ClassVar[str] = "latestack"
    id: int
    #: The newest retained message's event id; absent when the history retains none.
    event: str | None = None


@frozen(kw_only=True)
class Pong:
    OP: ClassVar[str] = "pong"
    id: int | None = None


@frozen(kw_only=True)
class Delivery:
    """A message delivered to the subscriptions `subs` of this session."""

    OP: ClassVar[str] = "message"
    subs: tuple[int, ...]
    topic: str
    event: str
    #: Publication time, Unix seconds.
    time: float
    #: Always sent; null when the message was published without one.
    payload: Payload = None


@frozen(kw_only=True)
class Dropped:
    """Under the drop_oldest policy: this many deliveries were dropped before the next one."""

    OP: ClassVar[str] = "dropped"
    count: int


@frozen(kw_only=True)
class GapNotice:
    """Live delivery to the subscriptions `subs` may have been interrupted (the fan-out lost
    its backend, say): messages may be missing at this point of their streams."""

    OP: ClassVar[str] = "gap"
    subs: tuple[int, ...]
    #: Why; "unavailable" when the fan-out was interrupted (docs/protocol.md, `gap`).
    reason: str


@frozen(kw_only=True)
class Error:
    OP: ClassVar[str] = "error"
    code: str
    message: str
    #: The id of the request this answers, when it had one.
    id: int | None = None
    #: The operation of the request this answers, when known.
    ref: str | None = None


@frozen(kw_only=True)
class SessionReply:
    """The answer to a session registry request: the records it concerns."""

    OP: ClassVar[str] = "sessions"
    id: int
    #: The op of the request this answers.
    ref: str
    #: Record maps (docs/protocol.md, "Session records"); null for each id of a `session_get`
    #: or `session_touch` that is not found (or not live, for a touch).
    sessions: tuple[dict[str, Any] | None, ...]
    #: `session_list`: pass as `after` for the next page; absent on the last page.
    next: str | None = None


@frozen(kw_only=True)
class Ended:
    """The subscriptions `subs` ended: the broker removed them (their application session
    ended, say). Sent in order with the deliveries, after the last one of those subscriptions."""

    OP: ClassVar[str] = "ended"
    subs: tuple[int, ...]
    #: Why: "session_ended" (the session was deleted, expired or invalidated).
    reason: str
    #: The application session whose end ended them.
    session: str | None = None


ClientEvent = (
    Hello | Subscribe | Unsubscribe | Publish | Forget | Refresh | Ping | Latest
    | SessionCreate | SessionGet | SessionTouch | SessionUpdate | SessionDelete | SessionList
    | Presence
)
ServerEvent = (
    Welcome | SubAck | UnsubAck | PubAck | Forgot | Refreshed | Pong | Delivery | Dropped
    | GapNotice | Error | SessionReply | Ended | LatestAck | Present
)
Event = ClientEvent | ServerEvent

CLIENT_EVENTS: tuple[type[ClientEvent], ...] = (
    Hello, Subscribe, Unsubscribe, Publish, Forget, Refresh, Ping, Latest, *SESSION_REQUESTS,
    Presence,
)
SERVER_EVENTS: tuple[type[ServerEvent], ...] = (
    Welcome, SubAck, UnsubAck, PubAck, Forgot, Refreshed, Pong, Delivery, Dropped, GapNotice,
    Error, SessionReply, Ended, LatestAck, Present,
)
