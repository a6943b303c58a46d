"""The client's typed errors: one class per broker error code, plus connection failures."""

from __future__ import annotations

from typing import ClassVar

from mqbroker.protocol import Error, ErrorCode


class ClientError(Exception):
    """Base of every error the client raises."""


class ConnectError(ClientError):
    """The broker could not be reached, or refused the session (see `__cause__`)."""


class ConnectionLost(ClientError):
    """The connection dropped and the client does not reconnect (or was closed meanwhile)."""


class ClientClosed(ClientError):
    """The client was closed; the operation cannot complete."""


class CredentialError(ClientError):
    """The credential provider (`connect(..., auth=provider)`) failed or returned no string:
    a connection attempt without a credential to send fails (see `__cause__`)."""


class BrokerError(ClientError):
    """The broker answered a request with an `error` event."""

    #: The code this class stands for; an instance's `code` is the one the broker sent.
    default_code: ClassVar[str] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        #: The operation of the request this answers (`publish`, `subscribe`, ...), if known.
        self.ref = ref
        #: For a publish: the msg_id it carried. Retrying with this msg_id (and the same topic)
        #: can never deliver the message twice within the broker's `dedup_window`.
        self.msg_id: str | None = None


class InvalidTopic(BrokerError):
    """A `publish` topic breaks a topic rule (a wildcard in it, too long, too deep, ...)."""

    default_code = ErrorCode.INVALID_TOPIC


class InvalidFilter(BrokerError):
    """A `subscribe` or `forget` filter breaks a filter rule (`#` not last, ...)."""

    default_code = ErrorCode.INVALID_FILTER


class TooManySubscriptions(BrokerError):
    """One subscription over `max_subscriptions`, or a wildcard one over the session's or the
    instance's wildcard limit (the message names the limit)."""

    default_code = ErrorCode.TOO_MANY_SUBSCRIPTIONS


class DuplicateSubscription(BrokerError):
    """A subscription id already in use in this session (a client bug)."""

    default_code = ErrorCode.DUPLICATE_SUBSCRIPTION


class UnknownSubscription(BrokerError):
    """An unsubscribe of a subscription id the session does not hold."""

    default_code = ErrorCode.UNKNOWN_SUBSCRIPTION


class MessageTooLarge(BrokerError):
    """Topic plus payload over `max_message_bytes` (the client refuses it before sending), or
    a frame the broker refused with 1009: not sent, and not resent."""

    default_code = ErrorCode.MESSAGE_TOO_LARGE


class BadEventId(BrokerError):
    """`since` is not an event id the broker could have issued."""

    default_code = ErrorCode.BAD_EVENT_ID


class SinceUnsupported(BrokerError):
    """`since` with a wildcard filter: only exact topics resume from a position."""

    default_code = ErrorCode.SINCE_UNSUPPORTED


class Unavailable(BrokerError):
    """The broker's fan-out or history backend is down; the request may be retried."""

    default_code = ErrorCode.UNAVAILABLE


class OutcomeUnknown(BrokerError):
    """The publish may or may not have happened (the backend failed midway). Retry it with the
    same `msg_id` (this error's `msg_id`) so that it is delivered at most once."""

    #: Matched by the string, which is the wire protocol's, whatever ErrorCode holds.
    default_code = "outcome_unknown"


class Unauthorized(BrokerError):
    """The broker refused the session's credential (it closes the session: 4003)."""

    default_code = ErrorCode.UNAUTHORIZED


class Forbidden(BrokerError):
    """The principal has no right to this operation on this topic or filter; a subscription's
    stream raises it when the broker ended the subscription after a refresh narrowed the
    principal's rights."""

    default_code = ErrorCode.FORBIDDEN


class RateLimited(BrokerError):
    """Over one of the session's rate limits: nothing was done; retry later."""

    default_code = ErrorCode.RATE_LIMITED


class RefreshUnsupported(BrokerError):
    """The broker cannot refresh this session's credential (anonymous or mtls mode)."""

    default_code = ErrorCode.REFRESH_UNSUPPORTED
class ReservedTopic(BrokerError):
    """A publish on a topic only the broker publishes to (a session's lifecycle or presence)."""

    default_code = ErrorCode.RESERVED_TOPIC


class SessionNotFound(BrokerError):
    """No such registry session for this user (another user's is not found either)."""

    default_code = ErrorCode.SESSION_NOT_FOUND


class SessionExists(BrokerError):
    """`create_session` with a session id already taken."""

    default_code = ErrorCode.SESSION_EXISTS


class IllegalTransition(BrokerError):
    """A state change the session's current state does not allow."""

    default_code = ErrorCode.ILLEGAL_TRANSITION


class VersionConflict(BrokerError):
    """`update_session(..., version=)` found the session at another version."""

    default_code = ErrorCode.VERSION_CONFLICT


class SubscriptionEnded(BrokerError):
    """Raised by a subscription's iterator when the broker ended it (its `ended` event): the
    application session its filter lies inside was deleted, expired or invalidated. The
    subscription is gone (not resumed after a reconnect)."""

    default_code = "ended"

    def __init__(self, message: str, *, reason: str, session: str | None = None) -> None:
        super().__init__(message, ref="subscribe")
        #: The broker's reason: "session_ended".
        self.reason = reason
        #: The application session whose end ended it.
        self.session = session


class ProtocolViolation(BrokerError):
    """The broker could not understand what the client sent (a client bug)."""

    default_code = ErrorCode.BAD_EVENT


_BY_CODE: dict[str, type[BrokerError]] = {
    cls.default_code: cls
    for cls in (InvalidTopic, InvalidFilter, TooManySubscriptions, DuplicateSubscription,
                UnknownSubscription, MessageTooLarge, BadEventId, SinceUnsupported, Unavailable,
                OutcomeUnknown, Unauthorized, Forbidden, RateLimited, RefreshUnsupported,
                ReservedTopic, SessionNotFound, SessionExists, IllegalTransition, VersionConflict)
}


def error_from_event(event: Error) -> BrokerError:
    """The typed exception for an `error` event; unknown codes give a plain BrokerError."""
    cls = _BY_CODE.get(event.code)
    if cls is not None:
        return cls(event.message, ref=event.ref)
    if event.code in (ErrorCode.BAD_EVENT, ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_OP):
        return ProtocolViolation(event.message, code=event.code, ref=event.ref)
    return BrokerError(event.message, code=event.code, ref=event.ref)


__all__ = [
    "BadEventId", "BrokerError", "ClientClosed", "ClientError", "ConnectError", "ConnectionLost",
    "CredentialError", "DuplicateSubscription", "Forbidden", "IllegalTransition", "InvalidFilter",
    "InvalidTopic", "MessageTooLarge", "OutcomeUnknown", "ProtocolViolation", "RateLimited",
    "RefreshUnsupported", "ReservedTopic", "SessionExists", "SessionNotFound", "SinceUnsupported",
    "SubscriptionEnded", "TooManySubscriptions", "Unauthorized", "Unavailable",
    "UnknownSubscription", "VersionConflict",
]
