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
    InvalidFilter,
    InvalidTopic,
    MessageTooLarge,
    OutcomeUnknown,
    ProtocolViolation,
    RateLimited,
    RefreshUnsupported,
    SinceUnsupported,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
    UnknownSubscription,
)
from mqbroker.client.operations import CredentialProvider

__all__ = [
    "BadEventId", "BrokerError", "Client", "ClientClosed", "ClientError", "ConnectError",
    "ConnectionLost", "CredentialError", "CredentialProvider", "DuplicateSubscription",
    "Forbidden", "Gap", "InvalidFilter", "InvalidTopic", "Message", "MessageTooLarge",
    "OutcomeUnknown", "ProtocolViolation", "RateLimited", "Reconnect", "RefreshUnsupported",
    "SinceUnsupported", "Subscription", "TooManySubscriptions", "Unauthorized", "Unavailable",
    "UnknownSubscription", "connect",
]
