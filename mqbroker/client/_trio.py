"""The trio driver: the runtime and the trio-websocket transport under the shared client logic.

`connect` runs the client's task (`BaseClient.run`: connect, serve, reconnect) in a nursery of
its own for the block's life; everything the client does is `mqbroker.client.base`'s.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import h11
import trio
import wsproto.utilities
from attrs import define, frozen
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from mqbroker.client.base import BaseClient, BaseSubscription, configure, connector
from mqbroker.client.core import StreamItem
from mqbroker.client.runtime import Channel, Target, WebSocketTransport


@frozen
class _Deadline:
    scope: trio.CancelScope

    def lift(self) -> None:
        self.scope.deadline = math.inf


class TrioRuntime:
    """trio, as `mqbroker.client.runtime.Runtime` describes it."""

    would_block: type[Exception] = trio.WouldBlock
    #: (The protocol errors: trio-websocket's reader meets them on an HTTP reply it cannot parse.)
    attempt_failed: tuple[type[BaseException], ...] = (
        HandshakeError, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError,
        trio.ClosedResourceError, h11.ProtocolError, wsproto.utilities.ProtocolError)

    def now(self) -> float:
        return trio.current_time()

    def event(self) -> trio.Event:
        return trio.Event()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def deadline(self, seconds: float) -> AsyncIterator[_Deadline]:
        with trio.fail_after(seconds) as scope:
            yield _Deadline(scope)

    async def race(self, *tasks: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(_then_cancel, task, nursery.cancel_scope)

    @asynccontextmanager
    async def open_transport(self, target: Target, *, max_frame_bytes: int,
                             ssl_context: ssl.SSLContext | None, close_timeout: float
                             ) -> AsyncIterator[WebSocketTransport]:
        try:
            async with trio.open_nursery() as connection:  # owns trio-websocket's reader task
                ws = await _open(connection, target, ssl_context, max_frame_bytes)
                try:
                    yield WebSocketTransport(
                        ws, ConnectionClosed,
                        functools.partial(_refused_by_broker, max_frame_bytes=max_frame_bytes),
                        functools.partial(_close, ws, close_timeout))
                finally:
                    # The reader finishes the close handshake by itself; give it a bounded time.
                    connection.cancel_scope.deadline = trio.current_time() + close_timeout
        except BaseExceptionGroup as group:
            # One error (the handshake's, or a refused upgrade that trio-websocket's reader task
            # raises) comes out as itself, so that it counts as a failed attempt.
            if len(group.exceptions) == 1 and not isinstance(group.exceptions[0],
                                                             BaseExceptionGroup):
                error = group.exceptions[0]
                raise error from error.__cause__
            raise


async def _then_cancel(task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await task()
    scope.cancel()


async def _close(ws: WebSocketConnection, within: float, reason: str) -> None:
    """Close with the handshake, within `within` seconds; when we are being cancelled from
    outside, the task that would read the broker's answer is going too, so it just drops."""
    if trio.current_effective_deadline() == -math.inf:
        return
    with trio.move_on_after(within, shield=True):
        await ws.aclose(1000, reason or None)


async def _open(connection: trio.Nursery, target: Target, context: ssl.SSLContext | None,
                max_frame_bytes: int) -> WebSocketConnection:
    """Connect and upgrade; trio-websocket's reader task runs in `connection`."""
    stream = await _WatchedStream.connect(target, context)
    try:
        with trio.CancelScope() as upgrading:
            # trio-websocket waits for the upgrade forever if the connection ends first (closed
            # or reset before the 101, or closed by trio-websocket itself after an HTTP reply it
            # cannot parse): stop waiting when it ends.
            connection.start_soon(_cancel_when_ended, stream, upgrading)
            ws = await wrap_client_stream(
                connection, cast(trio.SocketStream, stream), target.authority, target.resource,
                max_message_size=max_frame_bytes)
        if upgrading.cancelled_caught:
            raise HandshakeError("the connection ended before the WebSocket upgrade")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return ws


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
    async def connect(cls, target: Target, context: ssl.SSLContext | None) -> _WatchedStream:
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


@define(eq=False)
class Subscription(BaseSubscription):
    """An async iterator of `Message` (and `Gap`) items for one filter."""


@define(eq=False)
class Client(BaseClient[Subscription]):
    """A client's session with a broker, what `connect` yields: its operations below, its
    settings (`connect`'s arguments), `failure` (set once the client gave up on the broker)
    and `unsolicited` (the last 100 errors that answered no request)."""

    runtime = TrioRuntime()

    def _subscription(self, sub_id: int, filter: str, items: Channel[StreamItem]
                      ) -> Subscription:
        return Subscription(sub_id, filter, self, items)


@asynccontextmanager
async def _hosted(client: Client) -> AsyncIterator[Client]:
    """Run `client` in a nursery of its own for the block's life."""
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


connect = connector(configure, Client, _hosted)

__all__ = ["Client", "Subscription", "connect"]
