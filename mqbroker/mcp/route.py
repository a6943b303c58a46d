"""The resume route: a GET with `Last-Event-ID` served from the broker, on any instance.

The SDK answers such a GET only for a session of its own process (another instance's session
is a 404), and even there it replays, then registers the stream for live messages after an
await: what the tool sends in between is stored but not sent. This ASGI middleware serves every
resume whose `Last-Event-ID` is one of mqbroker.mcp's ids itself, on whichever instance it
lands: the replay from the broker, then the live messages of the stream from the same
subscription (no window between them), until the request's response. A gap answers the
request with the gap error, and so does the owner's end (mqbroker.mcp.registry: the instance
that opened the session gone, or the session ended) while the stream is followed live. A session
the registry does not know is a 404. Everything else goes to the SDK's app, unchanged but for
one thing: a session the SDK opens is registered before its id reaches the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from attrs import define
from mcp.server.streamable_http import EventMessage
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request

from mqbroker.client.aio import Subscription, SubscriptionEnded
from mqbroker.client.errors import ClientError
from mqbroker.mcp import _sdk_hooks
from mqbroker.mcp.ids import EventRef
from mqbroker.mcp.registry import Lookup, Owner
from mqbroker.mcp.replay import Item, Lost, SessionReader, unsubscribe
from mqbroker.mcp.store import BrokerEventStore

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
            await self.app(scope, receive, self._registering(scope, send))
            return
        refusal = await self._refusal(scope, ref)
        if refusal is not None:
            await _json_error(send, *refusal)
            return
        lookup = await self._lookup(ref.session)
        if lookup.known is False:  # unknown or ended: as the SDK answers an unknown session
            await _json_error(send, 404, "Session not found")
            return
        await self._serve(ref, lookup.owner, scope, receive, send)

    def _registering(self, scope: Scope, send: Send) -> Send:
        """`send`, registering the session a request opens before its id reaches the client
        (so that no resume on another instance can find it unknown)."""
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path
                or _header(scope["headers"], b"mcp-session-id") is not None):
            return send

        async def sent(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message.get("status", 500) < 400:
                session = _header(message.get("headers", ()), b"mcp-session-id")
                if session is not None:
                    await self.store.register(session)
            await send(message)

        return sent

    async def _lookup(self, session: str) -> Lookup:
        """What the registry says of the session; a session of this instance is known here
        (its owner is this very process: no need to watch it)."""
        if self.store.is_bound(session):
            return Lookup(True)
        if not self.store.settings.registry:
            return Lookup(None)
        return await self.store.registry.lookup(session)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.store.connected()
        except ClientError as e:
            # Raising here would make servers (uvicorn's lifespan "auto") take the app for one
            # without lifespan support and serve it broken: every request a 500, for ever.
            # Failing the startup stops the server with this message instead.
            await receive()  # lifespan.startup
            settings = self.store.settings
            await send({"type": "lifespan.startup.failed",
                        "message": f"mqbroker.mcp: cannot reach the broker at {self.store.url} "
                                   f"within connect_timeout ({settings.connect_timeout} s): {e}"})
            return

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

    async def _serve(self, ref: EventRef, owner: Owner | None, scope: Scope, receive: Receive,
                     send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            *_SSE_HEADERS, (b"mcp-session-id", ref.session.encode())]})
        streaming = asyncio.ensure_future(self._stream(ref, owner, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, gone):
                task.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
        if streaming.done() and not streaming.cancelled():
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, ref: EventRef, owner: Owner | None, send: Send) -> None:
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
            reason = await self._follow(ref, owner, subscription, event)
        except SubscriptionEnded:
            reason = "the session ended"
        except ClientError as e:
            reason = f"the broker connection failed: {e!r}"
        finally:
            await unsubscribe(subscription)
        if reason is not None:
            await store.report_gap(ref, reason, send_event)

    async def _follow(self, ref: EventRef, owner: Owner | None, subscription: Subscription,
                      event: Callable[[str, str], Awaitable[None]]) -> str | None:
        """Send the replay, then the live events until the stream's response; why not, if
        something is missing or the owner is gone before it (None: the stream is complete)."""
        reader = SessionReader(ref)
        watch = await self.store.registry.watch(ref.session) if owner is not None else None
        try:
            replayed = await _send_items(reader.replay(subscription), event)
            if not isinstance(replayed, _Open):
                return replayed
            live = _send_live(reader.live(subscription), event)
            if owner is None or watch is None:
                return await live
            return await _first(live, self._owner_gone(ref.session, owner, watch))
        finally:
            if watch is not None:
                await unsubscribe(watch)

    async def _owner_gone(self, session: str, owner: Owner, watch: Subscription) -> str:
        reason = await self.store.registry.owner_gone(session, owner, watch)
        self.store.stats["owner_gone"] += 1
        return reason


class _Open:
    """The items ended before the stream's response (or a gap): it goes on."""


async def _send_items(items: AsyncIterator[Item], event: Callable[[str, str], Awaitable[None]]
                      ) -> str | _Open | None:
    """Send the stream's events; the reason of a `Lost`, None after the response, `_Open`
    when the items end before either."""
    async for item in items:
        if isinstance(item, Lost):
            return item.reason
        await event(item.json, item.event_id)
        if item.final:
            return None
    return _Open()


async def _send_live(items: AsyncIterator[Item], event: Callable[[str, str], Awaitable[None]]
                     ) -> str | None:
    """As `_send_items`, for the live events: their end (the subscription's) ends the stream."""
    outcome = await _send_items(items, event)
    return None if isinstance(outcome, _Open) else outcome


async def _first(streaming: Awaitable[str | None], gone: Awaitable[str]) -> str | None:
    """The outcome of whichever ends first: the stream, or its owner's end."""
    tasks = [asyncio.ensure_future(streaming), asyncio.ensure_future(gone)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The stream's own outcome wins a tie: its response may have come with the leave.
        return tasks[0].result() if tasks[0] in done else tasks[1].result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None,
                       "error": {"code": -32600, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
