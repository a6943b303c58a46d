"""The resume route: a GET with `Last-Event-ID` served from the broker, on any instance.

The SDK answers such a GET only for a session of its own process (another instance's session
is a 404), and even there it replays, then registers the stream for live messages after an
await: what the tool sends in between is stored but not sent. This ASGI middleware serves every
resume whose `Last-Event-ID` is one of mqbroker.mcp's ids itself, on whichever instance it
lands: the replay from the broker, then the live messages of the stream from the same
subscription (no window between them), until the request's response. A gap answers the
request with the gap error. Everything else goes to the SDK's app unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import define
from mcp.server.streamable_http import EventMessage
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request

from mqbroker.client.errors import ClientError
from mqbroker.mcp import _sdk_hooks
from mqbroker.mcp.ids import EventRef
from mqbroker.mcp.replay import Lost, SessionReader
from mqbroker.mcp.store import BrokerEventStore, unsubscribe

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache, no-transform"), (b"connection", b"keep-alive")]


@define(eq=False)
class ResumeRoute:
    """Wraps the SDK's ASGI app: serves resumes from the broker, opens and closes the store
    with the app's lifespan, and tells the store when the server shuts down."""

    app: ASGIApp
    store: BrokerEventStore
    manager: StreamableHTTPSessionManager | None = None
    #: The MCP endpoint's path (the SDK's `streamable_http_path`).
    path: str = "/mcp"
    #: Opened and closed with the lifespan too (a `BrokerSubscriptionBus`, say).
    services: tuple[Any, ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        ref = self._resume_of(scope)
        if ref is None:
            await self.app(scope, receive, send)
            return
        refusal = await self._refusal(scope, ref)
        if refusal is not None:
            await _json_error(send, *refusal)
            return
        await self._serve(ref, scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def received() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                self.store.shutting_down = True
            return message

        async with self.store:
            for service in self.services:
                await service.__aenter__()
            try:
                await self.app(scope, received, send)
            finally:
                for service in reversed(self.services):
                    await service.__aexit__(None, None, None)

    def _resume_of(self, scope: Scope) -> EventRef | None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != self.path:
            return None
        for name, value in scope["headers"]:
            if name == b"last-event-id":
                return EventRef.parse(value.decode("latin-1"))
        return None

    async def _refusal(self, scope: Scope, ref: EventRef) -> tuple[int, str] | None:
        """Why the SDK would refuse this request (status, message), or None."""
        manager = self.manager
        if manager is not None:
            security = TransportSecurityMiddleware(manager.security_settings)
            rejected = await security.validate_request(Request(scope))
            if rejected is not None:
                return rejected.status_code, bytes(rejected.body).decode()
        session = dict(scope["headers"]).get(b"mcp-session-id", b"").decode("latin-1")
        # Another session's event id is refused as the SDK refuses an unknown session.
        if session != ref.session:
            return 404, "Session not found"
        if manager is not None and _sdk_hooks.foreign_credential(manager, session, scope):
            return 404, "Session not found"
        return None

    async def _serve(self, ref: EventRef, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            *_SSE_HEADERS, (b"mcp-session-id", ref.session.encode())]})
        streaming = asyncio.ensure_future(self._stream(ref, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, gone):
                task.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
        if streaming.done() and not streaming.cancelled():
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, ref: EventRef, send: Send) -> None:
        store = self.store
        store.stats["replays"] += 1

        async def event(data: str, event_id: str | None) -> None:
            head = f"event: message\nid: {event_id}\n" if event_id else "event: message\n"
            await send({"type": "http.response.body", "body": f"{head}data: {data}\n\n".encode(),
                        "more_body": True})

        async def send_event(message: EventMessage) -> None:
            await event(message.message.model_dump_json(by_alias=True, exclude_unset=True),
                        message.event_id)

        try:
            client = await store.connected()
            subscription = await client.subscribe(store.settings.topic_of(ref.session),
                                                  since=ref.since)
        except ClientError as e:
            await store.report_gap(ref, f"the replay failed: {e!r}", send_event)
            return
        try:
            async for item in SessionReader(ref).follow(subscription):
                if isinstance(item, Lost):
                    await store.report_gap(ref, item.reason, send_event)
                    return
                await event(item.json, item.event_id)
        except ClientError as e:
            await store.report_gap(ref, f"the broker connection failed: {e!r}", send_event)
        finally:
            await unsubscribe(subscription)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None,
                       "error": {"code": -32600, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
