"""An SSE server backed by mqbroker: one resumable event stream per MCP session, on trio and h11.

    python examples/sse_server.py --broker ws://127.0.0.1:7878/ --port 8000
    curl -N http://127.0.0.1:8000/sessions/s1/events
    curl -N -H 'Last-Event-ID: <an id it sent>' http://127.0.0.1:8000/sessions/s1/events

`GET /sessions/{id}/events` streams the messages of `mcp/session/{id}/message`, each as an SSE
event whose `id:` is the broker's event id and whose `data:` is the payload as JSON. A browser
that reconnects sends the last id back as `Last-Event-ID`; the server resumes the session topic
from there (`since`), and the broker replays exactly what was missed. When it cannot (the id is
from another history epoch, or the messages were trimmed), the stream says so with an
`event: resync` whose data is the reason: the browser app should reload its state.

Broadcasts (`mcp/broadcast/notification`) are forwarded on the same stream as `event: broadcast`
with no `id:` field: they are live only, and an event without an id leaves the browser's last
event id alone, so `Last-Event-ID` always names a position in the session topic.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import h11
import trio
from attrs import define, frozen
from structlog.typing import FilteringBoundLogger

from mqbroker.client import (
    BadEventId,
    Client,
    ClientError,
    Gap,
    Message,
    Subscription,
    connect,
)
from mqbroker.config import LogConfig
from mqbroker.logs import configure, logger

LOG = logger("sse_example")

BROADCAST_TOPIC = "mcp/broadcast/notification"
#: A session id is one topic level: no `/`, no wildcard, and nothing that needs escaping.
_EVENTS_PATH = re.compile(r"/sessions/([A-Za-z0-9_.~-]{1,128})/events")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: Seconds between `: ping` comments, which keep proxies from closing an idle stream.
PING_INTERVAL = 15.0
#: The request line and headers may not exceed this; h11 answers 431 beyond it.
MAX_REQUEST_BYTES = 8 * 1024
#: A client must finish sending its request within this many seconds.
REQUEST_TIMEOUT = 10.0
#: Encoded events waiting for one HTTP client's socket. A client that lets this fill up is
#: dropped rather than allowed to stall the shared broker client; it resumes by reconnecting.
STREAM_BUFFER = 1000
#: Bound on unsubscribing and on ending a response once a stream is over.
CLEANUP_TIMEOUT = 1.0
RECEIVE_BYTES = 4096

PING = b": ping\n\n"
#: Put on a stream's queue when a subscription ended: the response is finished cleanly.
_END = b""


def session_topic(session: str) -> str:
    return f"mcp/session/{session}/message"


# --- The event-stream format (no I/O) ------------------------------------------------------------


def sse_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event in the text/event-stream format; each line of `data` gets its own field."""
    lines = [f"event: {event}"] if event is not None else []
    if id is not None:
        lines.append(f"id: {id}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def message_event(message: Message, *, resumable: bool) -> bytes:
    """A message as an event: with its event id when its topic is the one `since` resumes."""
    data = json.dumps(message.payload, separators=(",", ":"), default=_json_default)
    if resumable:
        return sse_event(data, id=message.event_id)
    return sse_event(data, event="broadcast")


def resync_event(reason: str) -> bytes:
    """Tells the browser app that messages may be missing: reload state, then keep listening."""
    return sse_event(reason, event="resync")


def item_event(item: Message | Gap, *, resumable: bool) -> bytes:
    if isinstance(item, Gap):
        return resync_event(item.reason)
    return message_event(item, resumable=resumable)


def _json_default(value: Any) -> Any:
    # msgpack payloads may carry bytes, which JSON cannot: send them as base64 text.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- Requests (no I/O) ---------------------------------------------------------------------------


@frozen(kw_only=True)
class StreamRequest:
    """A valid `GET /sessions/{id}/events`."""

    session: str
    #: The browser's `Last-Event-ID`: where to resume the session topic, if anywhere.
    last_event_id: str | None


@frozen(kw_only=True)
class Refusal:
    """A whole non-streaming answer."""

    status: int
    text: str
    headers: tuple[tuple[str, str], ...] = ()


UNAVAILABLE = Refusal(status=503, text="the broker is unavailable",
                      headers=(("retry-after", "1"),))


def parse_request(request: h11.Request) -> StreamRequest | Refusal:
    target = request.target.decode("ascii", "replace").partition("?")[0]
    match = _EVENTS_PATH.fullmatch(target)
    if match is None:
        return Refusal(status=404, text="not found")
    if request.method != b"GET":
        return Refusal(status=405, text="method not allowed", headers=(("allow", "GET"),))
    return StreamRequest(session=match.group(1), last_event_id=_last_event_id(request))


def _last_event_id(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"last-event-id":
            # An empty id is how the SSE spec says "no id": start from now.
            return value.decode("utf-8", "replace").strip() or None
    return None


# --- One event stream ----------------------------------------------------------------------------


@define(eq=False)
class Outgoing:
    """One HTTP client's queue of encoded events, in the order they are to be written."""

    send: trio.MemorySendChannel[bytes]
    #: The stream's cancel scope: cancelled to drop a client that does not keep up.
    scope: trio.CancelScope
    log: FilteringBoundLogger

    def offer(self, chunk: bytes) -> None:
        """Queue without waiting: waiting here would stall the broker client for every stream."""
        try:
            self.send.send_nowait(chunk)
        except trio.WouldBlock:
            if not self.scope.cancel_called:
                self.log.warning("sse.slow_client", buffered=self.send.statistics().max_buffer_size)
            self.scope.cancel()


@asynccontextmanager
async def subscribed(client: Client, topic: str, since: str | None) -> AsyncIterator[Subscription]:
    """A broker subscription for as long as the block runs; unsubscribing is bounded."""
    subscription = await client.subscribe(topic, since=since)
    try:
        yield subscription
    finally:
        # Not shielded: when the server is shutting down, the broker session closes and takes
        # its subscriptions along; waiting for an answer the cancelled client cannot read would
        # only delay the shutdown.
        with trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await subscription.unsubscribe()
            except ClientError:
                pass  # the broker connection is gone, and the subscription with it


async def open_feeds(stack: AsyncExitStack, client: Client, request: StreamRequest,
                     log: FilteringBoundLogger) -> tuple[Subscription, Subscription, bytes]:
    """Subscribe to the session topic (resuming it) and to broadcasts; returns them and what
    the stream must start with (a resync when the Last-Event-ID is not an id at all)."""
    topic, since, preface = session_topic(request.session), request.last_event_id, b""
    try:
        session = await stack.enter_async_context(subscribed(client, topic, since))
    except BadEventId:
        log.info("sse.bad_last_event_id", last_event_id=since)
        since, preface = None, resync_event("bad_event_id")
        session = await stack.enter_async_context(subscribed(client, topic, None))
    if session.ack is not None and since is not None:
        log.info("sse.resumed", since=since, recovered=session.ack.recovered,
                 reason=session.ack.reason)
    broadcast = await stack.enter_async_context(subscribed(client, BROADCAST_TOPIC, None))
    return session, broadcast, preface


async def forward(subscription: Subscription, outgoing: Outgoing, *, resumable: bool) -> None:
    """Queue every item of `subscription`; when it ends, end the response so the browser
    reconnects (and resumes)."""
    try:
        # A suback with `recovered: false` reaches us as a Gap at the head of the stream,
        # before any replayed message: it becomes the resync event, never a silent gap.
        async for item in subscription:
            if isinstance(item, Gap):
                outgoing.log.info("sse.resync", topic=subscription.filter, reason=item.reason,
                                  count=item.count)
            outgoing.offer(item_event(item, resumable=resumable))
    except ClientError as e:
        outgoing.log.warning("sse.subscription_ended", topic=subscription.filter, error=str(e))
    outgoing.offer(_END)


async def keep_alive(outgoing: Outgoing, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        outgoing.offer(PING)


async def write_events(stream: trio.abc.SendStream, connection: h11.Connection,
                       chunks: trio.MemoryReceiveChannel[bytes]) -> None:
    """Write queued events, as many per write as are waiting, until a subscription ends."""
    async for chunk in chunks:
        batch = [chunk, *_waiting(chunks)]
        ended = _END in batch
        data = b"".join(batch[: batch.index(_END)] if ended else batch)
        try:
            if data:
                await stream.send_all(connection.send(h11.Data(data=data)) or b"")
            if ended:
                await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client left; the reader sees it too


def _waiting(chunks: trio.MemoryReceiveChannel[bytes]) -> list[bytes]:
    waiting = []
    while True:
        try:
            waiting.append(chunks.receive_nowait())
        except trio.WouldBlock:
            return waiting


async def until_closed(stream: trio.abc.ReceiveStream) -> None:
    """Return when the client closes its side: an SSE client sends nothing after its request."""
    try:
        while await stream.receive_some(RECEIVE_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _then_cancel(task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await task()
    scope.cancel()


# --- The server ----------------------------------------------------------------------------------


@define(eq=False)
class SseServer:
    """Serves event streams over one shared broker client; `handle` serves one connection."""

    client: Client
    ping_interval: float = PING_INTERVAL
    #: How many encoded events may wait for one client's socket (see STREAM_BUFFER).
    buffer: int = STREAM_BUFFER

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one HTTP connection (one request); never raises."""
        log = LOG.bind(peer=_peer(stream))
        try:
            await self._exchange(stream, log)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("sse.connection_lost", error=str(e))
        except Exception:
            # serve_tcp would let a handler's exception end the server: log it instead.
            log.exception("sse.failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, log: FilteringBoundLogger) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        request = None
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await read_request(stream, connection)
        except h11.RemoteProtocolError as e:
            await send_refusal(stream, connection, Refusal(status=e.error_status_hint,
                                                           text="bad request"))
            return
        if request is None:
            return  # closed, or too slow to ask
        parsed = parse_request(request)
        if isinstance(parsed, Refusal):
            log.debug("sse.refused", target=request.target[:200].decode("ascii", "replace"),
                      status=parsed.status)
            await send_refusal(stream, connection, parsed)
            return
        await self._stream(stream, connection, parsed, log.bind(session=parsed.session))

    async def _stream(self, stream: trio.SocketStream, connection: h11.Connection,
                      request: StreamRequest, log: FilteringBoundLogger) -> None:
        opened = False
        try:
            async with AsyncExitStack() as stack:
                try:
                    session, broadcast, preface = await open_feeds(stack, self.client, request,
                                                                   log)
                except ClientError as e:
                    log.warning("sse.subscribe_failed", error=str(e))
                    await send_refusal(stream, connection, UNAVAILABLE)
                    return
                # The head goes out only once the subscriptions are live: a client that has it
                # will not miss a message published from then on.
                await send_head(stream, connection)
                log.info("sse.stream_opened", last_event_id=request.last_event_id)
                opened = True
                await self._pump(stream, connection, session, broadcast, preface, log)
        finally:
            if opened:
                log.info("sse.stream_closed")  # the subscriptions are gone by now

    async def _pump(self, stream: trio.SocketStream, connection: h11.Connection,
                    session: Subscription, broadcast: Subscription, preface: bytes,
                    log: FilteringBoundLogger) -> None:
        """Stream until the client leaves, falls too far behind, or a subscription ends."""
        send, receive = trio.open_memory_channel[bytes](self.buffer)
        async with trio.open_nursery() as nursery:
            outgoing = Outgoing(send=send, scope=nursery.cancel_scope, log=log)
            if preface:
                outgoing.offer(preface)
            nursery.start_soon(partial(forward, session, outgoing, resumable=True))
            nursery.start_soon(partial(forward, broadcast, outgoing, resumable=False))
            nursery.start_soon(keep_alive, outgoing, self.ping_interval)
            nursery.start_soon(_then_cancel, partial(write_events, stream, connection, receive),
                               nursery.cancel_scope)
            nursery.start_soon(_then_cancel, partial(until_closed, stream), nursery.cancel_scope)


async def serve_sse(broker_url: str, port: int, *, host: str = "127.0.0.1",
                    ping_interval: float = PING_INTERVAL, buffer: int = STREAM_BUFFER,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Connect to the broker, then serve event streams on host:port; `task_status` gets the
    bound port (pass port 0 for a free one). Raises ConnectError if the broker is unreachable."""
    async with connect(broker_url, name="sse-example") as client:
        server = SseServer(client, ping_interval, buffer)
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, server.handle, port, host=host))
            bound: int = listeners[0].socket.getsockname()[1]
            LOG.info("sse.listening", host=host, port=bound, broker=broker_url)
            task_status.started(bound)


# --- Bytes in, bytes out -------------------------------------------------------------------------


async def read_request(stream: trio.abc.ReceiveStream,
                       connection: h11.Connection) -> h11.Request | None:
    """The request, or None when the client closed first. Raises h11.RemoteProtocolError."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None


async def send_head(stream: trio.abc.SendStream, connection: h11.Connection) -> None:
    headers = [("content-type", "text/event-stream; charset=utf-8"),
               ("cache-control", "no-store"),
               # Proxies such as nginx buffer responses unless told not to: events would lag.
               ("x-accel-buffering", "no"),
               ("connection", "close")]
    await stream.send_all(connection.send(h11.Response(status_code=200, headers=headers)) or b"")


async def send_refusal(stream: trio.abc.SendStream, connection: h11.Connection,
                       refusal: Refusal) -> None:
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # h11 cannot answer from here; closing is the answer
    body = f"{refusal.text}\n".encode()
    headers = [("content-type", "text/plain; charset=utf-8"),
               ("content-length", str(len(body))), ("connection", "close"), *refusal.headers]
    data = connection.send(h11.Response(status_code=refusal.status, headers=headers)) or b""
    data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return f"{host}:{port}"


# --- The command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve MCP session event streams over SSE.")
    parser.add_argument("--broker", default="ws://127.0.0.1:7878/", help="the broker's URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    configure(LogConfig(level=args.log_level))
    return _run(args.broker, args.host, args.port)


def _run(broker_url: str, host: str, port: int) -> int:
    status = 0
    try:
        trio.run(partial(serve_sse, broker_url, port, host=host))
    except* KeyboardInterrupt:
        LOG.info("sse.stopped", signal="SIGINT")
    except* (ClientError, OSError) as group:
        # Nested nurseries wrap what they raise in nested exception groups.
        LOG.error("sse.stopped", error=str(_first_cause(group)))
        status = 1
    return status


def _first_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error

if __name__ == "__main__":
    sys.exit(main())
