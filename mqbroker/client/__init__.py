"""The mqbroker client for trio: `async with connect(url) as client`.

    async with connect("ws://127.0.0.1:7878/") as client:
        subscription = await client.subscribe("mcp/session/+/message")
        event_id = await client.publish("mcp/session/s1/message", {"text": "hi"})
        async for item in subscription:
            ...  # a Message, or a Gap where messages may be missing

The asyncio client is `mqbroker.client.aio`, with the same API. The trio driver (`Client`,
`Subscription`, `connect`) is imported on first use, so that importing the asyncio client, which
imports this package first, imports neither trio nor trio-websocket.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mqbroker.client.base import Reconnect
from mqbroker.client.core import Gap, Message
from mqbroker.client.errors import *  # noqa: F403  (every error, in both clients)
from mqbroker.client.errors import __all__ as _errors
from mqbroker.client.limits import Limits
from mqbroker.client.operations import CredentialProvider
from mqbroker.sessions import SessionPage, SessionRecord

if TYPE_CHECKING:
    from mqbroker.client._trio import Client, Subscription, connect

#: The trio driver's names, imported from `_trio` on first use.
_TRIO = ("Client", "Subscription", "connect")


def __getattr__(name: str) -> Any:
    if name in _TRIO:
        value = getattr(importlib.import_module("mqbroker.client._trio"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Client", "CredentialProvider", "Gap", "Limits", "Message", "Reconnect", "SessionPage",
    "SessionRecord", "Subscription", "connect", *_errors,
]
