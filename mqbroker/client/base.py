"""The client's connection logic, written once for both drivers against `Runtime` and `Transport`.

One connection's life: open (TCP, upgrade, hello and welcome, resending what was pending) within
`open_timeout`; then a reader, a writer that coalesces whatever is queued into one frame, a
keepalive and the credential's refresh run side by side until the connection drops; it is closed
within `close_timeout`. The client then reconnects by itself (exponential backoff with jitter) and
resumes every subscription where it left off. What each frame means is the sans-IO `ClientCore`'s
to decide; what the application may ask is `Operations`'. The trio and asyncio drivers only supply
a runtime, a transport, and the way `connect` hosts the client's task.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import ssl
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

from attrs import define, field, frozen

from mqbroker.client.core import (
    ClientCore,
    Deliver,
    Failed,
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
from mqbroker.client.runtime import Channel, Runtime, Target, Transport, TransportClosed, Waiter
from mqbroker.protocol import ClientEvent, Format, HandshakeFailed, Ping, Publish, SubAck

#: Frames from the broker may exceed its max_frame_bytes by a message's envelope.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Default of `open_timeout`: seconds one connection attempt (TCP connect, WebSocket upgrade,
#: hello and welcome, resending what was pending) may take before it counts as failed.
OPEN_TIMEOUT = 10.0
#: Default of `close_timeout`: seconds the close handshake may take before the socket is dropped.
CLOSE_TIMEOUT = 1.0

#: What makes one connection attempt fail, whatever the driver (each adds its own errors): it is
#: retried with backoff after a drop, even a refused hello (a broker restarting behind a proxy
#: may refuse for a while).
_ATTEMPT_FAILED: tuple[type[BaseException], ...] = (OSError, TransportClosed, HandshakeFailed,
                                                    CredentialError)


@frozen(kw_only=True)
class Reconnect:
    """How the client reconnects after an established connection drops (and, with
    `wait_for_broker`, how it retries its first connection)."""

    enabled: bool = True
    initial_delay: float = 0.05
    max_delay: float = 5.0
    #: Give up after this many failed attempts in a row (None: never).
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: attempt 0, 1, 2... waits up to 1, 2, 4... x initial."""
        ceiling = min(self.max_delay, self.initial_delay * math.pow(2, attempt))
        return ceiling * random.uniform(0.5, 1.0)


class Started(Protocol):
    """Told once the first connection is open (trio's `task_status`, say)."""

    def started(self) -> None: ...


class _NotWatched:
    def started(self) -> None:
        pass

    def __repr__(self) -> str:
        return "(nobody)"


_NOT_WATCHED = _NotWatched()


@define(eq=False)
class BaseSubscription(SubscriptionItems):
    """An async iterator of `Message` (and `Gap`) items for one filter; `replay()` yields a
    `since` replay's items and stops where it ends."""

    id: int
    filter: str
    _client: BaseClient[Any]
    _items: Channel[StreamItem]
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
        """End the subscription: the broker stops routing to it, and iterating it ends (after
        the items it still holds)."""
        await self._client.unsubscribe(self)


SubscriptionT = TypeVar("SubscriptionT", bound=BaseSubscription)


@define(eq=False)
class BaseClient(Operations[SubscriptionT]):
    """A client's connection to a broker, its reconnects and its queues (see `connect`)."""

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
    #: Seconds the first connection is retried for, with the reconnect backoff (0: fail at once).
    wait_for_broker: float = 0.0
    _queued: Channel[ClientEvent] = field(init=False)
    _waiters: dict[tuple[str, int], Waiter] = field(factory=dict)
    _streams: dict[int, Channel[StreamItem]] = field(factory=dict)
    _transport: Transport | None = None
    _closed: bool = False
    #: Set when the client gave up on the broker; every operation raises it from then on.
    failure: ConnectionLost | None = None
    #: When the last frame arrived (the runtime's clock): the keepalive's evidence the broker
    #: is there.
    _last_seen: float = 0.0
    #: Errors that answer no request (a fire-and-forget publish with a bad topic, say).
    unsolicited: list[BrokerError] = field(factory=list)

    #: The driver's event loop.
    runtime: ClassVar[Runtime]

    def __attrs_post_init__(self) -> None:
        self._queued = self._channel()

    def _subscription(self, sub_id: int, filter: str, items: Channel[StreamItem]
                      ) -> SubscriptionT:
        """The driver's subscription class, made."""
        raise NotImplementedError

    def _channel(self) -> Channel[Any]:
        return Channel(self.buffer, self.runtime)

    # --- the primitives the shared operations use -------------------------------------------

    def _open_subscription(self, sub_id: int, filter: str) -> SubscriptionT:
        stream = self._streams[sub_id] = self._channel()
        return self._subscription(sub_id, filter, stream)

    async def _request(self, key: tuple[str, int], event: ClientEvent) -> Any:
        waiter = self._waiters[key] = Waiter(self.runtime.event())
        try:
            await self._queued.put(event)
            return await waiter.wait()
        finally:
            self._waiters.pop(key, None)  # settled, or its caller was cancelled

    async def _enqueue(self, event: ClientEvent) -> None:
        await self._queued.put(event)

    def _enqueue_nowait(self, event: ClientEvent) -> None:
        self._queued.put_nowait(event)

    def _offer(self, event: ClientEvent) -> bool:
        return self._queued.offer(event)

    async def _sleep(self, seconds: float) -> None:
        await self.runtime.sleep(seconds)

    # --- applying what the core decided ----------------------------------------------------------

    async def _apply(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, Deliver):
                stream = self._streams.get(outcome.sub)
                if stream is not None:
                    # Awaiting a full stream pushes back on the broker, which applies its
                    # slow-consumer policy to this session rather than growing memory here.
                    if not stream.offer(outcome.item):  # (no task switch per message)
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
        if waiter is not None:  # else nobody waits (the request was cancelled)
            waiter.settle(value, error)

    # --- the connection --------------------------------------------------------------------------

    async def run(self, *, task_status: Started = _NOT_WATCHED) -> None:
        """Connect (raising ConnectError if the first connection cannot be opened within
        `wait_for_broker`), tell `task_status`, then serve and reconnect until closed or lost."""
        try:
            failure = await self._first_connection(task_status)
            if failure is not None:
                raise ConnectError(f"cannot connect to {self.url}: {failure}") from failure
            await self._reconnect()
        finally:
            self._give_up()

    async def _first_connection(self, task_status: Started) -> BaseException | None:
        """The first connection, retried with backoff for `wait_for_broker` seconds (within
        `max_attempts`): None once it was opened and has ended, or why it could not be."""
        give_up_at = self.runtime.now() + self.wait_for_broker
        limit = self.reconnect.max_attempts
        attempt = 0
        while True:
            failure = await self._connection(task_status)
            if failure is None or self._closed:
                return failure
            delay = self.reconnect.delay(attempt)
            attempt += 1
            if self.runtime.now() + delay > give_up_at or (limit is not None and attempt >= limit):
                return failure
            await self.runtime.sleep(delay)

    async def _reconnect(self) -> None:
        """Open a new connection each time one drops, with backoff, until told to stop."""
        attempt = 0
        while self.reconnect.enabled and not self._closed:
            limit = self.reconnect.max_attempts
            if limit is not None and attempt >= limit:
                return
            await self.runtime.sleep(self.reconnect.delay(attempt))
            # Whatever failed (even a refused hello: a broker restarting behind a proxy may
            # refuse for a while), the attempt is retried with backoff, within max_attempts.
            failure = await self._connection(_NOT_WATCHED)
            attempt = 0 if failure is None else attempt + 1

    async def _connection(self, task_status: Started) -> BaseException | None:
        """One connection's life: open (upgrade, handshake, resume), then serve until it drops.

        Returns why it could not be opened, or None once it was opened and has ended.
        """
        opened = False
        runtime = self.runtime
        try:
            async with runtime.deadline(self.open_timeout) as opening, runtime.open_transport(
                    Target.parse(self.url), max_frame_bytes=self.max_frame_bytes,
                    ssl_context=self.ssl_context, close_timeout=self.close_timeout) as transport:
                await self._handshake(transport)
                opening.lift()
                opened = True
                self._transport = transport
                task_status.started()
                try:
                    await self._serve(transport)
                finally:
                    self._transport = None
                    await transport.aclose()
        except (*_ATTEMPT_FAILED, *runtime.attempt_failed) as e:
            if opened:
                raise
            return e
        return None

    async def _handshake(self, transport: Transport) -> None:
        await self.current_credential()
        await transport.send(self.core.open_connection())
        welcome = await transport.receive()
        if welcome is None:
            raise TransportClosed("the connection closed before the broker's welcome")
        await self._apply(self.core.receive(welcome))
        events, outcomes = self.core.resume()
        await self._apply(outcomes)
        # Requests still queued from before are in `events` already (the core resends every
        # unanswered request); only fire-and-forget publishes are taken from the queue.
        events += [e for e in self._queued.drain() if isinstance(e, Publish) and e.id is None]
        # In as many frames as the broker's frame limit needs: one frame over it would be
        # refused with 1009 on every reconnect.
        frames, refused = self.core.frames(events)
        await self._apply(refused)
        for frame in frames:
            await transport.send(frame)

    async def _serve(self, transport: Transport) -> None:
        """Read, write, keep alive and refresh the credential until the reader sees the
        connection end, or the keepalive finds the broker silent."""
        self._last_seen = self.runtime.now()
        await self.runtime.race(functools.partial(self._read_loop, transport),
                                functools.partial(self._write_loop, transport),
                                self._keepalive, self._refresh)

    async def _read_loop(self, transport: Transport) -> None:
        while (frame := await transport.receive()) is not None:
            self._last_seen = self.runtime.now()
            await self._apply(self.core.receive(frame))
        if transport.refused_as_too_large:
            # The broker refused a frame of ours as too large: never resend its requests.
            await self._apply(self.core.refused_as_too_large())

    async def _write_loop(self, transport: Transport) -> None:
        """Never returns: once a send fails, the reader is about to see the close (and why)."""
        while True:
            first = None if self.core.has_carried else await self._queued.get()
            frame, refused = self.core.encode_queued(first, self._queued.get_nowait)
            await self._apply(refused)
            if frame is None:
                continue  # what was taken was withdrawn or refused
            try:
                await transport.send(frame)
            except TransportClosed:
                break  # unanswered requests are resent on the next connection
        await self._forever()

    async def _keepalive(self) -> None:
        """Ping; returns (ending the connection) when the broker was silent for two intervals:
        dead, or a stalled link where even our sends cannot progress."""
        interval = self.core.ping_interval
        while True:
            await self.runtime.sleep(interval)
            if self.runtime.now() - self._last_seen > 2 * interval:
                return
            await self._queued.put(Ping())

    async def _refresh(self) -> None:
        await self.keep_credential_fresh()
        await self._forever()

    async def _forever(self) -> None:
        await self.runtime.event().wait()  # until the connection's end cancels it

    def _give_up(self) -> None:
        """Fail what waits, end every subscription; the client is closed or lost for good."""
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
        self._queued.close()  # nobody sends any more: free whoever waits for room

    async def aclose(self) -> None:
        """Close the session (with 1000, "client closed"); `connect`'s block does it on exit."""
        self._closed = True
        transport = self._transport
        if transport is not None:
            await transport.aclose("client closed")


ClientT = TypeVar("ClientT", bound=BaseClient[Any])


def configure(client_type: type[ClientT], url: str, *, name: str = "", format: str = "msgpack",
              reconnect: Reconnect | None = None,
              max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, buffer: int = 1000,
              open_timeout: float = OPEN_TIMEOUT, close_timeout: float = CLOSE_TIMEOUT,
              ssl_context: ssl.SSLContext | None = None,
              auth: str | CredentialProvider | None = None,
              wait_for_broker: float = 0.0) -> ClientT:
    """Connect to a broker at `url` (ws://host:port/ or wss://); closes the session on exit.

    name: the client's name in its hello (the broker's logs show it). format: "msgpack" (binary
    frames) or "json" (text frames). reconnect: how to reconnect after a drop (`Reconnect()`:
    forever, with exponential backoff). max_frame_bytes: the largest frame accepted from the
    broker. buffer: how many items each subscription and the send queue hold before pushing
    back. open_timeout: seconds one connection attempt may take (TCP, upgrade, hello, welcome).
    close_timeout: seconds the close handshake may take before the socket is dropped.
    ssl_context: the TLS settings of a wss:// URL (a private CA, a client certificate for
    mutual TLS); by default the system's CAs. auth: the credential the broker's [auth] mode
    asks for: a string (a static token, a JWT), sent in each hello, or a credential provider,
    an async callable returning the current one, awaited before each connection and ahead of
    the credential's expiry to refresh it in the open session. wait_for_broker: seconds to keep
    retrying the first connection, with the `reconnect` backoff (and within its
    `max_attempts`), for a client started before its broker; 0 (the default) fails at once.

    Raises ConnectError (its `__cause__` says why) if the first connection cannot be opened;
    later drops are reconnected as `reconnect` says. ValueError: `ssl_context` with a ws:// URL,
    a URL that is not ws:// or wss://, or an unknown format; TypeError: an `auth` that is
    neither a string nor a callable.
    """
    target = Target.parse(url)
    if ssl_context is not None and not target.tls:
        # It would silently not be used: plaintext while its owner believes it protected.
        raise ValueError(f"ssl_context given for a URL that is not wss://: {url!r}")
    fixed, provider = split_credential(auth)
    core = ClientCore(format=Format(format), client_name=name, auth=fixed)
    return client_type(url, core, reconnect or Reconnect(), max_frame_bytes, buffer,
                       open_timeout, close_timeout, ssl_context, provider, wait_for_broker)


P = ParamSpec("P")


def connector(options: Callable[Concatenate[type[ClientT], P], ClientT], client_type: type[ClientT],
              host: Callable[[ClientT], AbstractAsyncContextManager[ClientT]]
              ) -> Callable[P, AbstractAsyncContextManager[ClientT]]:
    """A driver's `connect`: `options` (`configure`) makes the client, `host` runs it for the
    block's life. Both drivers take the same arguments by construction, documented once."""

    def connect(*args: P.args, **kwargs: P.kwargs) -> AbstractAsyncContextManager[ClientT]:
        return host(options(client_type, *args, **kwargs))

    signature = inspect.signature(options)
    connect.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:],
        return_annotation=f"AbstractAsyncContextManager[{client_type.__name__}]")
    connect.__doc__ = options.__doc__
    connect.__module__ = client_type.__module__
    connect.__qualname__ = "connect"
    return connect
