"""The asyncio client: `async with connect(url) as client`, the trio client's API on asyncio.

    async with connect("ws://127.0.0.1:7878/") as client:
        subscription = await client.subscribe("mcp/session/+/message")
        event_id = await client.publish("mcp/session/s1/message", {"text": "hi"})
        async for item in subscription:
            ...  # a Message, or a Gap where messages may be missing

Everything the client does (reconnecting, the handshake, reading, writing, the keepalive) is the
shared logic of `mqbroker.client.base`, over the sans-IO `ClientCore`, as in the trio client; this
module supplies asyncio as its runtime and a wsproto WebSocket (`_aio_ws`) as its transport. It
imports neither trio nor trio-websocket.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from attrs import define, frozen

from mqbroker.client._aio_ws import (
    MESSAGE_TOO_BIG,
    ConnectionClosed,
    HandshakeError,
    WebSocket,
    open_websocket,
)
from mqbroker.client.base import (
    BaseClient,
    BaseSubscription,
    Reconnect,
    configure,
    connector,
)
from mqbroker.client.core import Gap, Message, StreamItem
from mqbroker.client.errors import *  # noqa: F403  (every error, in both clients)
from mqbroker.client.errors import __all__ as _errors
from mqbroker.client.limits import Limits
from mqbroker.client.operations import CredentialProvider
from mqbroker.client.runtime import Channel, Target, WebSocketTransport
from mqbroker.sessions import SessionPage, SessionRecord


@frozen
class _Deadline:
    timeout: asyncio.Timeout

    def lift(self) -> None:
        self.timeout.reschedule(None)


class AsyncioRuntime:
    """asyncio, as `mqbroker.client.runtime.Runtime` describes it."""

    would_block: type[Exception] = asyncio.QueueFull
    #: (TimeoutError, past the deadline, is an OSError.)
    attempt_failed: tuple[type[BaseException], ...] = (HandshakeError, ConnectionClosed)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def event(self) -> asyncio.Event:
        return asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def checkpoint(self) -> None:
        pass

    @asynccontextmanager
    async def deadline(self, seconds: float) -> AsyncIterator[_Deadline]:
        async with asyncio.timeout(seconds) as timeout:
            yield _Deadline(timeout)

    async def race(self, *tasks: Callable[[], Awaitable[None]]) -> None:
        running: list[asyncio.Task[None]] = []

        async def then_cancel(task: Callable[[], Awaitable[None]]) -> None:
            await task()
            for other in running:
                if other is not asyncio.current_task():
                    other.cancel()

        async with asyncio.TaskGroup() as group:
            running.extend(group.create_task(then_cancel(task)) for task in tasks)

    @asynccontextmanager
    async def open_transport(self, target: Target, *, max_frame_bytes: int,
                             ssl_context: ssl.SSLContext | None, close_timeout: float
                             ) -> AsyncIterator[WebSocketTransport]:
        ws = await open_websocket(target, max_message_size=max_frame_bytes,
                                  ssl_context=ssl_context)
        try:
            yield WebSocketTransport(ws, ConnectionClosed, _refused,
                                     functools.partial(_close, ws, close_timeout))
        except BaseException:
            ws.abort()
            raise


def _refused(closed: ConnectionClosed) -> bool:
    """A 1009 close from the broker: a frame of ours over its limit."""
    return closed.reason.code == MESSAGE_TOO_BIG and closed.reason.by_peer


async def _close(ws: WebSocket, within: float, reason: str) -> None:
    """Close with the handshake, within `within` seconds; the socket is dropped past it."""
    try:
        async with asyncio.timeout(within):
            await ws.aclose(1000, reason)
    except TimeoutError:
        pass  # aclose dropped the socket on its way out


@define(eq=False)
class Subscription(BaseSubscription):
    """An async iterator of `Message` (and `Gap`) items for one filter."""


@define(eq=False)
class Client(BaseClient[Subscription]):
    """A client's session with a broker, what `connect` yields: its operations below, its
    settings (`connect`'s arguments), `failure` (set once the client gave up on the broker)
    and `unsolicited` (the last 100 errors that answered no request)."""

    runtime = AsyncioRuntime()

    def _subscription(self, sub_id: int, filter: str, items: Channel[StreamItem]
                      ) -> Subscription:
        return Subscription(sub_id, filter, self, items)


class _Started:
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def started(self) -> None:
        self.event.set()


@asynccontextmanager
async def _hosted(client: Client) -> AsyncIterator[Client]:
    """Run `client` in a task of its own for the block's life. (Not in a TaskGroup around the
    block: that would wrap the application's own exceptions in an ExceptionGroup.)"""
    started = _Started()
    runner = asyncio.create_task(client.run(task_status=started), name=f"mqbroker {client.url}")
    opened = asyncio.ensure_future(started.event.wait())
    try:
        await asyncio.wait([runner, opened], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        runner.cancel()
        await asyncio.wait([runner])
        raise
    finally:
        opened.cancel()
    if not started.event.is_set():
        await runner  # it ended before the first connection opened: ConnectError
    try:
        yield client
    finally:
        await client.aclose()
        runner.cancel()
        await asyncio.wait([runner])
        client._give_up()  # a runner cancelled before it started never ran its own cleanup
        if not runner.cancelled() and (error := runner.exception()) is not None:
            raise error


connect = connector(configure, Client, _hosted)

__all__ = [
    "Client", "CredentialProvider", "Gap", "Limits", "Message", "Reconnect", "SessionPage",
    "SessionRecord", "Subscription", "connect", *_errors,
]
