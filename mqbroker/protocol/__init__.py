"""The wire protocol, sans-IO: events, the frame codec and per-connection state."""

from mqbroker.protocol.codec import EncodedMessage, Format, Frame, Rejected, join
from mqbroker.protocol.connection import (
    ClientConnection,
    HandshakeFailed,
    ServerConnection,
    State,
)
from mqbroker.protocol.events import *  # noqa: F403  (the events are the protocol's vocabulary)
from mqbroker.protocol.events import __all__ as _events_all

__all__ = [
    "ClientConnection",
    "EncodedMessage",
    "Format",
    "Frame",
    "HandshakeFailed",
    "Rejected",
    "ServerConnection",
    "State",
    "join",
    *_events_all,
]
