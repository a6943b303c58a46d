"""MCP servers resumable across instances: the MCP Python SDK's event store and subscription
bus in mqbroker (`pip install 'mqbroker[mcp]'`). docs/mcp.md is the guide.

    from mqbroker.mcp import resumable

    app = resumable(mcp, "ws://127.0.0.1:7878/")   # mcp: an MCPServer; serve `app` (uvicorn)
"""

from __future__ import annotations

from typing import Any

from mqbroker.mcp.bus import BrokerSubscriptionBus
from mqbroker.mcp.ids import EventRef
from mqbroker.mcp.registry import Owner
from mqbroker.mcp.route import ASGIApp, ResumeRoute
from mqbroker.mcp.settings import DEFAULT_TOPIC, StoreSettings
from mqbroker.mcp.store import GAP_ERROR_CODE, BrokerEventStore, SessionEventStore

__all__ = [
    "DEFAULT_TOPIC",
    "GAP_ERROR_CODE",
    "BrokerEventStore",
    "BrokerSubscriptionBus",
    "EventRef",
    "Owner",
    "ResumeRoute",
    "SessionEventStore",
    "StoreSettings",
    "resumable",
]

#: The SSE `retry` (milliseconds) the SDK tells clients: how soon a cut stream is resumed.
DEFAULT_RETRY_MS = 100


def resumable(server: Any, broker: str, *, store: BrokerEventStore | None = None,
              bus: BrokerSubscriptionBus | None = None, path: str = "/mcp",
              retry_interval: int = DEFAULT_RETRY_MS, **app_options: Any) -> ASGIApp:
    """The server's streamable HTTP app, resumable on any instance sharing the broker.

    `server` is an `MCPServer` (or a lowlevel `Server`); `broker` the mqbroker URL. Its events
    are stored in the broker, one topic per session; a client cut mid-stream resumes with
    `Last-Event-ID` on whichever instance it reaches; a session's events are forgotten when the
    SDK ends it. `bus`, if given (the server's `subscriptions=`), is opened with the app.
    Other keyword arguments go to `server.streamable_http_app`.
    """
    from mqbroker.mcp import _sdk_hooks

    store = store if store is not None else BrokerEventStore(broker)
    app = server.streamable_http_app(event_store=store, streamable_http_path=path,
                                     retry_interval=retry_interval, **app_options)
    manager = server.session_manager
    _sdk_hooks.bind_sessions(manager, store)
    return ResumeRoute(app, store, manager, path, services=(bus,) if bus is not None else ())
