"""What the client's shared logic needs from an event loop and a WebSocket library, and no more.

A driver (trio, asyncio) provides a `Runtime` (a clock, sleep, events, a deadline, tasks run side
by side, opening a `Transport`) and a `Transport` (one open WebSocket: send a frame, receive one,
close). `Channel` and `Waiter` are built on a runtime's events alone, so both clients queue, push
back, settle requests and end their streams in the same code. Nothing here imports trio or asyncio.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from attrs import define, field, frozen

from mqbroker.protocol import Frame

T = TypeVar("T")


class Event(Protocol):
    """trio.Event or asyncio.Event."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Deadline(Protocol):
    def lift(self) -> None:
        """No deadline any more (the connection opened in time)."""


class TransportClosed(Exception):
    """The transport is closed: nothing more can be sent on it."""


class Transport(Protocol):
    """One open WebSocket to the broker."""

    #: The broker closed the connection with 1009: a frame of ours was over its limit.
    refused_as_too_large: bool

    async def send(self, frame: Frame) -> None:
        """Send one frame; raises TransportClosed once the connection is closed."""

    async def receive(self) -> Frame | None:
        """The next frame; None once the connection is closed (by either side)."""

    async def aclose(self, reason: str = "") -> None:
        """Close with 1000 and the close handshake, within the client's `close_timeout`; the
        socket is dropped past it, or at once when the caller is being cancelled."""


class Runtime(Protocol):
    """An event loop as the shared client logic uses it."""

    #: What a full queue raises from `put_nowait` (trio.WouldBlock, asyncio.QueueFull).
    would_block: type[Exception]
    #: Besides OSError, TransportClosed and the handshake's errors: the driver's own errors that
    #: make one connection attempt fail (its deadline's, its WebSocket library's).
    attempt_failed: tuple[type[BaseException], ...]

    def now(self) -> float: ...

    def event(self) -> Event: ...

    async def sleep(self, seconds: float) -> None: ...

    async def checkpoint(self) -> None:
        """What an operation that did not have to wait does: trio yields to the scheduler (every
        trio operation is a checkpoint, so a consumer of a full stream cannot starve the tasks
        it feeds); asyncio, whose queues do not yield when they need not wait, does nothing."""

    def deadline(self, seconds: float) -> AbstractAsyncContextManager[Deadline]:
        """Fail what runs inside with one of `attempt_failed` past `seconds`, until lifted."""
        ...

    async def race(self, *tasks: Callable[[], Awaitable[None]]) -> None:
        """Run `tasks` side by side until the first returns, then cancel the others. An
        exception from any of them propagates (in an exception group)."""

    def open_transport(self, target: Target, *, max_frame_bytes: int,
                       ssl_context: ssl.SSLContext | None, close_timeout: float
                       ) -> AbstractAsyncContextManager[Transport]:
        """TCP (TLS for wss://) and the WebSocket upgrade to `target`, for the block's life.
        Raises OSError, or one of `attempt_failed`, when that fails."""
        ...


class _WebSocket(Protocol):
    async def send_message(self, message: bytes | str) -> None: ...

    async def get_message(self) -> bytes | str: ...


@define(eq=False)
class WebSocketTransport:
    """A WebSocket library's connection as a `Transport`: its `send_message` and `get_message`,
    which raise `closed` once it is closed (`refused(error)`: by a 1009 from the broker)."""

    ws: _WebSocket
    closed: type[Exception]
    refused: Callable[[Any], bool]
    #: Closes the connection with 1000 and a reason, within the close timeout.
    close: Callable[[str], Awaitable[None]]
    refused_as_too_large: bool = False

    async def send(self, frame: Frame) -> None:
        try:
            await self.ws.send_message(frame)
        except self.closed as e:
            raise TransportClosed(str(e)) from e

    async def receive(self) -> Frame | None:
        try:
            return await self.ws.get_message()
        except self.closed as e:
            self.refused_as_too_large = self.refused(e)
            return None

    async def aclose(self, reason: str = "") -> None:
        await self.close(reason)


@frozen
class Target:
    """Where a ws:// or wss:// URL points."""

    host: str
    port: int
    tls: bool
    #: The Host header: the URL's authority.
    authority: str
    #: The request target: path and query.
    resource: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        tls = parts.scheme == "wss"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(host=parts.hostname, port=parts.port or (443 if tls else 80), tls=tls,
                   authority=parts.netloc.rpartition("@")[2], resource=resource)


@define(eq=False)
class Channel(Generic[T]):
    """A bounded queue that can be closed: a subscription's stream, or the send queue.

    `put` waits for room (pushing back on whoever produces); once closed, what is put is
    dropped (nobody will read it) and `get` gives None after the items still held.
    """

    capacity: int
    _runtime: Runtime
    _items: deque[T] = field(factory=deque)
    _closed: bool = False
    #: Set, and replaced, whenever an item comes or goes or the channel closes.
    _changed: Event = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._changed = self._runtime.event()

    async def put(self, item: T) -> None:
        if self.offer(item):
            await self._runtime.checkpoint()
            return
        while len(self._items) >= self.capacity and not self._closed:
            await self._changed.wait()
        self.offer(item)

    def put_nowait(self, item: T) -> None:
        """Queue `item`, or raise the runtime's would-block error when full."""
        if not self.offer(item):
            raise self._runtime.would_block

    def offer(self, item: T) -> bool:
        """Queue `item` unless the channel is full (False); dropped if it is closed."""
        if self._closed:
            return True
        if len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        self._notify()
        return True

    async def get(self) -> T | None:
        """The next item; None once the channel is closed and drained."""
        if self._items:
            await self._runtime.checkpoint()
        while not self._items:
            if self._closed:
                return None
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    def get_nowait(self) -> T | None:
        """The next item, or None when there is none now."""
        if not self._items:
            return None
        item = self._items.popleft()
        self._notify()
        return item

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        self._notify()
        return items

    def close(self) -> None:
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = self._runtime.event()


@define(eq=False)
class Waiter:
    """One request's caller, waiting for the broker's answer."""

    done: Event
    value: Any = None
    error: BaseException | None = None

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.value, self.error = value, error
        self.done.set()

    async def wait(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value
