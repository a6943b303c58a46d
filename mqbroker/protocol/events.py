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
    "ClientEvent",
    "CloseCode",
    "Delivery",
    "Dropped",
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
    "PubAck",
    "Publish",
    "ServerEvent",
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


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker uses (docs/protocol.md, "Closing")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the broker is shutting down
    PROTOCOL_ERROR = 1002  # a frame that breaks RFC 6455 (unmasked, bad opcode, bad length...)
    INVALID_DATA = 1007  # a text frame (or close reason) that is not valid UTF-8
    MESSAGE_TOO_BIG = 1009  # a frame over max_frame_bytes
    INTERNAL_ERROR = 1011
    HANDSHAKE_FAILED = 4000  # no valid `hello` first, in time, with a supported version
    IDLE_TIMEOUT = 4001  # nothing received for idle_timeout seconds
    UNAUTHORIZED = 4003  # the hello had no valid `auth` credential ([auth] mode token)
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
class Ping:
    OP: ClassVar[str] = "ping"
    id: int | None = None


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


ClientEvent = Hello | Subscribe | Unsubscribe | Publish | Forget | Ping | Latest
ServerEvent = (
    Welcome | SubAck | UnsubAck | PubAck | Forgot | Pong | Delivery | Dropped | GapNotice | Error
    | LatestAck
)
Event = ClientEvent | ServerEvent

CLIENT_EVENTS: tuple[type[ClientEvent], ...] = (
    Hello, Subscribe, Unsubscribe, Publish, Forget, Ping, Latest,
)
SERVER_EVENTS: tuple[type[ServerEvent], ...] = (
    Welcome, SubAck, UnsubAck, PubAck, Forgot, Pong, Delivery, Dropped, GapNotice, Error,
    LatestAck,
)
