"""The asyncio client: `async with connect(url) as client`, the trio client's API on asyncio.

    async with connect("ws://127.0.0.1:7878/") as client:
        subscription = await client.subscribe("mcp/session/+/message")
        event_id = await client.publish("mcp/session/s1/message", {"text": "hi"})
        async for item in subscription:
            ...  # a Message, or a Gap where messages may be missing

Every protocol decision is the sans-IO `ClientCore`'s, shared with the trio client; this module
only drives it. Each connection's reader, writer (which coalesces whatever is queued into one
frame) and keepalive run in an `asyncio.TaskGroup`. When an established connection drops the
client reconnects by itself (exponential backoff with jitter) and resumes every subscription
where it left off. Every network wait is bounded, as in the trio client: `open_timeout` per
connection attempt, `close_timeout` per close, the keepalive while connected.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from attrs import define, field

from mqbroker.client._aio_ws import (
    MESSAGE_TOO_BIG,
    ConnectionClosed,
    HandshakeError,
    WebSocket,
    open_websocket,
)
from mqbroker.client._trio import (
    CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_BYTES,
    OPEN_TIMEOUT,
    Reconnect,
)
from mqbroker.client.core import (
    ClientCore,
    Deliver,
    Failed,
    Gap,
    Message,
    Outcome,
    Resolved,
    Send,
    StreamItem,
    Unsolicited,
)
from mqbroker.client.errors import (
    BrokerError,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    CredentialError,
    Forbidden,
    IllegalTransition,
    MessageTooLarge,
    OutcomeUnknown,
    ReservedTopic,
    SessionExists,
    SessionNotFound,
    SubscriptionEnded,
    Unavailable,
    VersionConflict,
)
from mqbroker.client.operations import (
    CredentialProvider,
    Operations,
    SubscriptionItems,
    split_credential,
)
from mqbroker.protocol import ClientEvent, Format, HandshakeFailed, Ping, Publish, SubAck
from mqbroker.sessions import SessionRecord

#: What makes one connection attempt fail (TimeoutError, past open_timeout, is an OSError); each
#: is retried with backoff after a drop, even a refused hello (a broker restarting behind a
#: proxy may refuse for a while).
_ATTEMPT_FAILED = (OSError, HandshakeError, ConnectionClosed, HandshakeFailed, CredentialError)


@define(eq=False)
class _Stream:
    """A subscription's bounded queue, closable (asyncio.Queue cannot be closed before 3.13)."""

    capacity: int
    _items: deque[StreamItem] = field(factory=deque)
    _closed: bool = False
    #: Set, and replaced, whenever an item comes or goes or the stream closes.
    _changed: asyncio.Event = field(factory=asyncio.Event)

    async def put(self, item: StreamItem) -> None:
        """Wait for room; an item put once the stream is closed is dropped (nobody reads it)."""
        while len(self._items) >= self.capacity and not self._closed:
            await self._changed.wait()
        if not self._closed:
            self._items.append(item)
            self._notify()

    async def get(self) -> StreamItem | None:
        """The next item; None once the stream is closed and drained."""
        while not self._items:
            if self._closed:
                return None
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    def close(self) -> None:
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


@define(eq=False)
class Subscription(SubscriptionItems):
    """An async iterator of `Message` (and `Gap`) items for one filter."""

    id: int
    filter: str
    _client: Client
    _items: _Stream
    #: The suback: `recovered` tells whether a `since` replay was complete.
    ack: SubAck | None = None

    async def _receive(self) -> StreamItem | None:
        return await self._items.get()

    @property
    def last_event_id(self) -> str | None:
        """Where this subscription would resume: the last event id it delivered."""
        sub = self._client.core.subscriptions.get(self.id)
        return sub.since if sub is not None else None

    async def unsubscribe(self) -> None:
        await self._client.unsubscribe(self)


@define(eq=False)
class Client(Operations[Subscription]):
    url: str
    core: ClientCore
    reconnect: Reconnect
    max_frame_bytes: int
    buffer: int
    open_timeout: float = OPEN_TIMEOUT
    close_timeout: float = CLOSE_TIMEOUT
    #: For wss:// URLs: the TLS settings (None: the system's CAs, the URL's host verified).
    ssl_context: ssl.SSLContext | None = None
    #: Gives the credential of each hello and refresh (None: `core.auth`, fixed).
    credentials: CredentialProvider | None = None
    _queued: asyncio.Queue[ClientEvent] = field(init=False)
    _waiters: dict[tuple[str, int], asyncio.Future[Any]] = field(factory=dict)
    _streams: dict[int, _Stream] = field(factory=dict)
    _ws: WebSocket | None = None
    _closed: bool = False
    _last_seen: float = 0.0
    #: Set when the client gave up on the broker; every operation raises it from then on.
    failure: ConnectionLost | None = None
    #: Errors that answer no request (a fire-and-forget publish with a bad topic, say).
    unsolicited: list[BrokerError] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self._queued = asyncio.Queue(self.buffer)

    # --- the primitives the shared operations use -------------------------------------------

    def _open_subscription(self, sub_id: int, filter: str) -> Subscription:
        stream = self._streams[sub_id] = _Stream(self.buffer)
        return Subscription(sub_id, filter, self, stream)

    async def _request(self, key: tuple[str, int], event: ClientEvent) -> Any:
        waiter = self._waiters[key] = asyncio.get_running_loop().create_future()
        try:
            await self._queued.put(event)
            return await waiter
        finally:
            self._waiters.pop(key, None)  # settled, or its caller was cancelled

    async def _enqueue(self, event: ClientEvent) -> None:
        await self._queued.put(event)

    def _enqueue_nowait(self, event: ClientEvent) -> None:
        self._queued.put_nowait(event)

    def _offer(self, event: ClientEvent) -> bool:
        try:
            self._queued.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    # --- applying what the core decided ----------------------------------------------------------

    async def _apply(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Deliver):
                stream = self._streams.get(outcome.sub)
                if stream is not None:
                    # Awaiting a full stream pushes back on the broker, which applies its
                    # slow-consumer policy to this session rather than growing memory here.
                    await stream.put(outcome.item)
                    if isinstance(outcome.item, BrokerError):
                        # The stream's last item: the subscription is gone (refused, ended).
                        self._streams.pop(outcome.sub, None)
                        stream.close()
            elif isinstance(outcome, Resolved):
                self._settle(outcome.key, value=outcome.value)
            elif isinstance(outcome, Failed):
                self._settle(outcome.key, error=outcome.error)
            elif isinstance(outcome, Unsolicited):
                self.unsolicited.append(outcome.error)
                del self.unsolicited[:-100]
            elif isinstance(outcome, Send):
                await self._queued.put(outcome.event)  # the writer drains it meanwhile

    def _settle(self, key: tuple[str, int], *, value: Any = None,
                error: BaseException | None = None) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is None or waiter.done():
            return  # nobody waits (the request was cancelled)
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(value)

    # --- the connection --------------------------------------------------------------------------

    async def open(self) -> WebSocket:
        """A new connection, open and resumed; raises what makes an attempt fail."""
        async with asyncio.timeout(self.open_timeout):
            ws = await open_websocket(self.url, max_message_size=self.max_frame_bytes,
                                      ssl_context=self.ssl_context)
            try:
                await self._handshake(ws)
            except BaseException:
                ws.abort()
                raise
        self._ws = ws  # from here on, aclose closes it
        return ws

    async def run(self, ws: WebSocket) -> None:
        """Serve the open connection `ws`, then reconnect whenever it drops, until closed."""
        try:
            await self._serve(ws)
            await self._reconnect_loop()
        finally:
            self._give_up()

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while self.reconnect.enabled and not self._closed:
            limit = self.reconnect.max_attempts
            if limit is not None and attempt >= limit:
                return
            await asyncio.sleep(self.reconnect.delay(attempt))
            try:
                ws = await self.open()
            except _ATTEMPT_FAILED:
                attempt += 1
                continue
            attempt = 0
            await self._serve(ws)

    async def _handshake(self, ws: WebSocket) -> None:
        await self.current_credential()
        await ws.send_message(self.core.open_connection())
        await self._apply(self.core.receive(await ws.get_message()))
        events, outcomes = self.core.resume()
        await self._apply(outcomes)
        # Requests still queued from before are in `events` already (the core resends every
        # unanswered request); only fire-and-forget publishes are taken from the queue.
        events += [e for e in self._drain_queue() if isinstance(e, Publish) and e.id is None]
        # In as many frames as the broker's frame limit needs: one frame over it would be
        # refused with 1009 on every reconnect.
        frames, refused = self.core.frames(events)
        await self._apply(refused)
        for frame in frames:
            await ws.send_message(frame)

    def _drain_queue(self) -> list[ClientEvent]:
        events = []
        while True:
            try:
                events.append(self._queued.get_nowait())
            except asyncio.QueueEmpty:
                return events

    async def _serve(self, ws: WebSocket) -> None:
        """One open connection's life: read, write and keep alive until it drops."""
        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self._write_loop(ws))
                keepalive = tasks.create_task(self._keepalive(ws))
                refresher = tasks.create_task(self.keep_credential_fresh())
                await self._read_loop(ws)
                writer.cancel()
                keepalive.cancel()
                refresher.cancel()
        finally:
            self._ws = None
            await _close(ws, 1000, "", self.close_timeout)

    async def _read_loop(self, ws: WebSocket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed as e:
                if e.reason.code == MESSAGE_TOO_BIG and e.reason.by_peer:
                    # The broker refused a frame of ours as too large: never resend it.
                    await self._apply(self.core.refused_as_too_large())
                return
            self._last_seen = loop.time()
            await self._apply(self.core.receive(frame))

    async def _write_loop(self, ws: WebSocket) -> None:
        while True:
            first = None if self.core.has_carried else await self._queued.get()
            frame, refused = self.core.encode_queued(first, self._next_queued)
            await self._apply(refused)
            if frame is None:
                continue  # what was taken was withdrawn or refused
            try:
                await ws.send_message(frame)
            except ConnectionClosed:
                return  # unanswered requests are resent on the next connection

    def _next_queued(self) -> ClientEvent | None:
        try:
            return self._queued.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _keepalive(self, ws: WebSocket) -> None:
        interval = self.core.ping_interval
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        while True:
            await asyncio.sleep(interval)
            if loop.time() - self._last_seen > 2 * interval:
                # Bounded: if even our close cannot be sent, the socket is dropped.
                await _close(ws, 1000, "no answer to ping", self.close_timeout)
                return
            await self._queued.put(Ping())

    def _give_up(self) -> None:
        """Fail what waits, end every subscription; the client is closed or lost for good."""
        if self._closed:
            error: BaseException = ClientClosed("the client is closed")
        else:
            self.failure = ConnectionLost(f"lost the connection to {self.url}")
            error = self.failure
        for key in list(self._waiters):
            self._settle(key, error=error)
        for stream in self._streams.values():
            stream.close()
        # Nobody sends any more: free whoever waits for room in the queue.
        self._drain_queue()

    async def aclose(self) -> None:
        self._closed = True
        ws = self._ws
        if ws is not None:
            await _close(ws, 1000, "client closed", self.close_timeout)


async def _close(ws: WebSocket, code: int, reason: str, within: float) -> None:
    """Close `ws`, giving the close handshake `within` seconds before dropping the socket."""
    try:
        async with asyncio.timeout(within):
            await ws.aclose(code, reason)
    except TimeoutError:
        pass  # aclose dropped the socket on its way out


@asynccontextmanager
async def connect(url: str, *, name: str = "", format: str = "msgpack",
                  reconnect: Reconnect | None = None,
                  max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                  buffer: int = 1000, open_timeout: float = OPEN_TIMEOUT,
                  close_timeout: float = CLOSE_TIMEOUT,
                  ssl_context: ssl.SSLContext | None = None,
                  auth: str | CredentialProvider | None = None) -> AsyncIterator[Client]:
    """Connect to a broker at `url` (ws://host:port/ or wss://); closes the session on exit.

    format: "msgpack" (binary frames) or "json" (text frames). buffer: how many items each
    subscription and the send queue hold before pushing back. open_timeout: seconds one
    connection attempt may take (TCP, upgrade, hello, welcome). close_timeout: seconds the close
    handshake may take before the socket is dropped. Raises ConnectError if the first
    connection fails; later drops are reconnected as `reconnect` says. ssl_context: the TLS
    settings of a wss:// URL (a private CA, a client certificate for mutual TLS); by default the
    system's CAs. auth: the credential the broker's [auth] mode asks for: a string, sent in each
    hello, or a credential provider (an async callable returning the current credential),
    awaited before each connection and to refresh the credential ahead of its expiry, as in the
    trio client.
    """
    if ssl_context is not None and not url.lower().startswith("wss://"):
        raise ValueError(f"ssl_context given for a URL that is not wss://: {url!r}")
    fixed, provider = split_credential(auth)
    core = ClientCore(format=Format(format), client_name=name, auth=fixed)
    client = Client(url, core, reconnect or Reconnect(), max_frame_bytes, buffer,
                    open_timeout, close_timeout, ssl_context, provider)
    try:
        ws = await client.open()
    except (*_ATTEMPT_FAILED, HandshakeFailed) as e:
        raise ConnectError(f"cannot connect to {url}: {e}") from e
    # One task owns the connection and its reconnects; it is not in a TaskGroup around the
    # body, since that would wrap the application's own exceptions in an ExceptionGroup.
    runner = asyncio.create_task(client.run(ws), name=f"mqbroker client {url}")
    try:
        yield client
    finally:
        await client.aclose()
        runner.cancel()
        await asyncio.wait([runner])
        # A runner cancelled before it started never ran its own cleanup.
        client._give_up()
        if not runner.cancelled() and (error := runner.exception()) is not None:
            raise error


__all__ = ["Client", "Forbidden", "Gap", "IllegalTransition", "Message", "MessageTooLarge",
           "OutcomeUnknown", "Reconnect", "ReservedTopic", "SessionExists", "SessionNotFound",
           "SessionRecord", "Subscription", "SubscriptionEnded", "Unavailable",
           "VersionConflict", "connect"]
