"""The mqbroker client for trio: `async with connect(url) as client`.

    async with connect("ws://127.0.0.1:7878/") as client:
        subscription = await client.subscribe("mcp/session/+/message")
        event_id = await client.publish("mcp/session/s1/message", {"text": "hi"})
        async for item in subscription:
            ...  # a Message, or a Gap where messages may be missing
"""

from mqbroker.client._trio import Client, Reconnect, Subscription, connect
from mqbroker.client.core import Gap, Message
from mqbroker.client.errors import (
    BadEventId,
    BrokerError,
    ClientClosed,
    ClientError,
    ConnectError,
    ConnectionLost,
    CredentialError,
    DuplicateSubscription,
    Forbidden,
    IllegalTransition,
    InvalidFilter,
    InvalidTopic,
    MessageTooLarge,
    OutcomeUnknown,
    ProtocolViolation,
    RateLimited,
    RefreshUnsupported,
    ReservedTopic,
    SessionExists,
    SessionNotFound,
    SinceUnsupported,
    SubscriptionEnded,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    UnknownSubscription,
    VersionConflict,
)
from mqbroker.client.operations import CredentialProvider
from mqbroker.sessions import SessionPage, SessionRecord

__all__ = [
    "BadEventId", "BrokerError", "Client", "ClientClosed", "ClientError", "ConnectError",
    "ConnectionLost", "CredentialError", "CredentialProvider", "DuplicateSubscription",
    "Forbidden", "Gap", "IllegalTransition", "InvalidFilter", "InvalidTopic", "Message",
    "MessageTooLarge", "OutcomeUnknown", "ProtocolViolation", "RateLimited", "Reconnect",
    "RefreshUnsupported", "ReservedTopic", "SessionExists", "SessionNotFound", "SessionPage",
    "SessionRecord", "SinceUnsupported", "Subscription", "SubscriptionEnded",
    "TooManySubscriptions", "Unauthorized", "Unavailable", "UnknownSubscription",
    "VersionConflict", "connect",
]
