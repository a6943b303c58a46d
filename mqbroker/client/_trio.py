"""The trio client: `async with connect(url) as client`, subscriptions as async iterators.

The connection runs in the client's own nursery: a reader, a writer that coalesces whatever is
queued into one frame, and a keepalive. When the connection drops the client reconnects by itself
(exponential backoff with jitter) and resumes every subscription where it left off.

Every network wait is bounded: opening a connection (TCP, the WebSocket upgrade, hello and
welcome) by `open_timeout`, closing one by `close_timeout`, and an open connection by the
keepalive (no frame from the broker for two ping intervals closes it). A failed attempt, whatever
failed, is retried with backoff.
"""

from __future__ import annotations

import contextlib
import math
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import h11
import trio
import wsproto.utilities
from attrs import define, field, frozen
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from mqbroker.client._aio_ws import _Target
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
)
from mqbroker.client.operations import (
    CredentialProvider,
    Operations,
    SubscriptionItems,
    split_credential,
)
from mqbroker.protocol import ClientEvent, Format, HandshakeFailed, Ping, Publish, SubAck

#: Frames from the broker may exceed its max_frame_bytes by a message's envelope.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Default of `open_timeout`: seconds one connection attempt (TCP connect, WebSocket upgrade,
#: hello and welcome, resending what was pending) may take before it counts as failed.
OPEN_TIMEOUT = 10.0
#: Default of `close_timeout`: seconds the close handshake may take before the socket is dropped.
CLOSE_TIMEOUT = 1.0

#: What makes one connection attempt fail; each is retried with backoff after a drop. (The
#: protocol errors: trio-websocket's reader meets them on an HTTP reply it cannot parse.)
_ATTEMPT_FAILED = (OSError, HandshakeError, ConnectionClosed, HandshakeFailed, trio.TooSlowError,
                   trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                   wsproto.utilities.ProtocolError, CredentialError)


@frozen(kw_only=True)
class Reconnect:
    """How the client reconnects after an established connection drops."""

    enabled: bool = True
    initial_delay: float = 0.05
    max_delay: float = 5.0
    #: Give up after this many failed attempts in a row (None: never).
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: attempt 0, 1, 2... waits up to 1, 2, 4... x initial."""
        ceiling = min(self.max_delay, self.initial_delay * math.pow(2, attempt))
        return ceiling * random.uniform(0.5, 1.0)


@define(eq=False)
class _Waiter:
    done: trio.Event = field(factory=trio.Event)
    value: Any = None
    error: BaseException | None = None

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()

    async def wait(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


@define(eq=False)
class Subscription(SubscriptionItems):
    """An async iterator of `Message` (and `Gap`) items for one filter."""

    id: int
    filter: str
    _client: Client
    _items: trio.MemoryReceiveChannel[StreamItem]
    #: The suback: `recovered` tells whether a `since` replay was complete.
    ack: SubAck | None = None

    async def _receive(self) -> StreamItem | None:
        try:
            return await self._items.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

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
    _send: trio.MemorySendChannel[ClientEvent] = field(init=False)
    _queued: trio.MemoryReceiveChannel[ClientEvent] = field(init=False)
    _waiters: dict[tuple[str, int], _Waiter] = field(factory=dict)
    _streams: dict[int, trio.MemorySendChannel[StreamItem]] = field(factory=dict)
    _ws: WebSocketConnection | None = None
    _closed: bool = False
    #: Set when the client gave up on the broker; every operation raises it from then on.
    failure: ConnectionLost | None = None
    #: When the last frame arrived (trio's clock): the keepalive's evidence the broker is there.
    _last_seen: float = 0.0
    #: Errors that answer no request (a fire-and-forget publish with a bad topic, say).
    unsolicited: list[BrokerError] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self._send, self._queued = trio.open_memory_channel(self.buffer)

    # --- the primitives the shared operations use -------------------------------------------

    def _open_subscription(self, sub_id: int, filter: str) -> Subscription:
        send, receive = trio.open_memory_channel[StreamItem](self.buffer)
        self._streams[sub_id] = send
        return Subscription(sub_id, filter, self, receive)

    async def _request(self, key: tuple[str, int], event: ClientEvent) -> Any:
        waiter = self._waiters[key] = _Waiter()
        try:
            await self._send.send(event)
            return await waiter.wait()
        finally:
            self._waiters.pop(key, None)  # settled, or its caller was cancelled

    async def _enqueue(self, event: ClientEvent) -> None:
        await self._send.send(event)

    def _enqueue_nowait(self, event: ClientEvent) -> None:
        self._send.send_nowait(event)

    def _offer(self, event: ClientEvent) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        return True

    async def _sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    # --- applying what the core decided ----------------------------------------------------------

    async def _apply(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Deliver):
                stream = self._streams.get(outcome.sub)
                if stream is not None:
                    # Awaiting a full stream pushes back on the broker, which applies its
                    # slow-consumer policy to this session rather than growing memory here.
                    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                        try:
                            stream.send_nowait(outcome.item)  # no task switch per message
                        except trio.WouldBlock:
                            await stream.send(outcome.item)  # unsubscribed meanwhile: dropped
                    if isinstance(outcome.item, BrokerError):
                        # The stream's last item: the subscription is gone (refused, ended).
                        del self._streams[outcome.sub]
                        stream.close()
            elif isinstance(outcome, Resolved):
                self._settle(outcome.key, value=outcome.value)
            elif isinstance(outcome, Failed):
                self._settle(outcome.key, error=outcome.error)
            elif isinstance(outcome, Unsolicited):
                self.unsolicited.append(outcome.error)
                del self.unsolicited[:-100]
            elif isinstance(outcome, Send):
                await self._send.send(outcome.event)  # the writer drains it meanwhile

    def _settle(self, key: tuple[str, int], *, value: Any = None,
                error: BaseException | None = None) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.settle(value, error)

    # --- the connection --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (raising ConnectError if the first attempt fails), then serve and reconnect."""
        try:
            failure = await self._connection(task_status=task_status)
            if failure is not None:
                raise ConnectError(f"cannot connect to {self.url}: {failure}") from failure
            await self._reconnect()
        finally:
            self._give_up()

    async def _reconnect(self) -> None:
        """Open a new connection each time one drops, with backoff, until told to stop."""
        attempt = 0
        while self.reconnect.enabled and not self._closed:
            limit = self.reconnect.max_attempts
            if limit is not None and attempt >= limit:
                return
            await trio.sleep(self.reconnect.delay(attempt))
            # Whatever failed (even a refused hello: a broker restarting behind a proxy may
            # refuse for a while), the attempt is retried with backoff, within max_attempts.
            failure = await self._connection()
            attempt = 0 if failure is None else attempt + 1

    async def _connection(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> BaseException | None:
        """One connection's life: open (handshake, resume), then serve until it drops.

        Returns why it could not be opened, or None once it was opened and has ended. Errors are
        returned, not raised, so that they do not leave the nursery wrapped in a group.
        """
        opened = False
        try:
            async with trio.open_nursery() as connection:  # owns trio-websocket's reader task
                try:
                    with trio.fail_after(self.open_timeout):
                        ws = await self._open(connection)
                except _ATTEMPT_FAILED as e:
                    connection.cancel_scope.cancel()
                    return e
                opened = True
                self._ws = ws
                task_status.started()
                try:
                    await self._serve(ws)
                finally:
                    self._ws = None
                    await _close_politely(ws, self.close_timeout)
                    # The reader finishes the close handshake by itself; give it a bounded time.
                    connection.cancel_scope.deadline = trio.current_time() + self.close_timeout
        except ExceptionGroup as group:
            # trio-websocket's reader task failed the opening (it raises a refused upgrade,
            # ConnectionRejected, there): one more failed attempt. Anything else is a bug.
            if opened or group.split(_ATTEMPT_FAILED)[1] is not None:
                raise
            return group
        return None

    async def _open(self, connection: trio.Nursery) -> WebSocketConnection:
        """Connect, upgrade, say hello and resume; the reader task runs in `connection`."""
        target = _Target.parse(self.url)
        stream = await _WatchedStream.connect(target, self.ssl_context)
        try:
            with trio.CancelScope() as upgrading:
                # trio-websocket waits for the upgrade forever if the connection ends first
                # (closed or reset before the 101, or closed by trio-websocket itself after an
                # HTTP reply it cannot parse): stop waiting when it ends.
                connection.start_soon(_cancel_when_ended, stream, upgrading)
                ws = await wrap_client_stream(
                    connection, cast(trio.SocketStream, stream), target.authority,
                    target.resource, max_message_size=self.max_frame_bytes)
            if upgrading.cancelled_caught:
                raise HandshakeError("the connection ended before the WebSocket upgrade")
            await self._handshake(ws)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return ws

    async def _handshake(self, ws: WebSocketConnection) -> None:
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

    async def _serve(self, ws: WebSocketConnection) -> None:
        async with trio.open_nursery() as tasks:
            tasks.start_soon(self._write_loop, ws)
            tasks.start_soon(self._keepalive, tasks.cancel_scope)
            tasks.start_soon(self.keep_credential_fresh)
            await self._read_loop(ws)
            tasks.cancel_scope.cancel()

    def _drain_queue(self) -> list[ClientEvent]:
        events = []
        while True:
            try:
                events.append(self._queued.receive_nowait())
            except trio.WouldBlock:
                return events

    async def _read_loop(self, ws: WebSocketConnection) -> None:
        while True:
            try:
                frame = await ws.get_message()
            except ConnectionClosed as e:
                if _refused_by_broker(e, self.max_frame_bytes):
                    await self._apply(self.core.refused_as_too_large())
                return
            self._last_seen = trio.current_time()
            await self._apply(self.core.receive(frame))

    async def _write_loop(self, ws: WebSocketConnection) -> None:
        while True:
            first = None if self.core.has_carried else await self._queued.receive()
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
            return self._queued.receive_nowait()
        except trio.WouldBlock:
            return None

    async def _keepalive(self, serving: trio.CancelScope) -> None:
        """Ping; a broker silent for two intervals (dead, or a stalled link where even our sends
        cannot progress) ends the connection, which is then closed within close_timeout."""
        interval = self.core.ping_interval
        self._last_seen = trio.current_time()
        while True:
            await trio.sleep(interval)
            if trio.current_time() - self._last_seen > 2 * interval:
                serving.cancel()
                return
            await self._send.send(Ping())

    def _give_up(self) -> None:
        if self._closed:
            error: BaseException = ClientClosed("the client is closed")
        else:
            self.failure = ConnectionLost(f"lost the connection to {self.url}")
            error = self.failure
        for waiter in self._waiters.values():
            waiter.settle(error=error)
        self._waiters.clear()
        for stream in self._streams.values():
            stream.close()

    async def aclose(self) -> None:
        self._closed = True
        ws = self._ws
        if ws is not None:
            await _close_politely(ws, self.close_timeout, "client closed")


async def _close_politely(ws: WebSocketConnection, within: float,
                          reason: str | None = None) -> None:
    """Close with the handshake, within `within` seconds; when we are being cancelled from outside,
    the task that would read the broker's answer is going too, so the connection just drops."""
    if trio.current_effective_deadline() == -math.inf:
        return
    with trio.move_on_after(within, shield=True):
        await ws.aclose(1000, reason)


def _refused_by_broker(closed: ConnectionClosed, max_frame_bytes: int) -> bool:
    """A 1009 close from the broker (a frame of ours over its limit), not trio-websocket's own
    1009 for a broker frame over ours, which carries exactly this reason."""
    reason = closed.reason
    return (reason is not None and reason.code == 1009
            and reason.reason != f"Exceeded maximum message size: {max_frame_bytes} bytes")


class _WatchedStream(trio.abc.Stream):
    """The connection's byte stream, telling when it has ended: closed or reset by the peer (seen
    by a receive or a send), or closed on our side (trio-websocket closes it after an HTTP reply
    it cannot parse)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()

    @classmethod
    async def connect(cls, target: _Target, context: ssl.SSLContext | None) -> _WatchedStream:
        if target.tls:
            return cls(await trio.open_ssl_over_tcp_stream(
                target.host, target.port, ssl_context=context or ssl.create_default_context(),
                https_compatible=True))
        return cls(await trio.open_tcp_stream(target.host, target.port))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()  # a reset seen first by the upgrade request
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        self.ended.set()
        await self.inner.aclose()


async def _cancel_when_ended(stream: _WatchedStream, scope: trio.CancelScope) -> None:
    await stream.ended.wait()
    scope.cancel()  # does nothing once the upgrade is over


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
    handshake may take before the socket is dropped. ssl_context: the TLS settings of a wss://
    URL (a private CA, a client certificate for mutual TLS); by default the system's CAs.
    auth: the credential the broker's [auth] mode asks for: a string (a static token, a JWT),
    sent in each hello, or a credential provider, an async callable returning the current one,
    awaited before each connection and ahead of the credential's expiry to refresh it in the
    open session (see `Operations.keep_credential_fresh`).
    """
    _check_ssl_context(url, ssl_context)
    fixed, provider = split_credential(auth)
    core = ClientCore(format=Format(format), client_name=name, auth=fixed)
    client = Client(url, core, reconnect or Reconnect(), max_frame_bytes, buffer,
                    open_timeout, close_timeout, ssl_context, provider)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One error (the application's own, or ConnectError) comes out as itself, so that
        # `except InvalidTopic:` around the block works as it reads.
        if len(group.exceptions) == 1:
            error = group.exceptions[0]
            raise error from error.__cause__  # (ConnectError's cause says why)
        raise


def _check_ssl_context(url: str, context: ssl.SSLContext | None) -> None:
    # A context given for a ws:// URL would silently not be used: the connection would be
    # plaintext while its owner believes it is protected.
    if context is not None and not _Target.parse(url).tls:
        raise ValueError(f"ssl_context given for a URL that is not wss://: {url!r}")


__all__ = ["Client", "Gap", "Message", "Reconnect", "Subscription", "connect"]
