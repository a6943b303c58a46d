"""Test harness: a real broker on 127.0.0.1 with an ephemeral port, and raw protocol sessions.

`RawSession` speaks the wire protocol directly (trio-websocket + the sans-IO ClientConnection),
for tests that must see exact frames, errors and close codes; the others use mqbroker.client.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, ServerConfig
from mqbroker.protocol import ClientConnection, ClientEvent, Format, ServerEvent
from mqbroker.server.listener import Listener, serve
from mqbroker.server.presence import open_presence
from mqbroker.server.registry import open_registry


@attrs.define
class RunningBroker:
    broker: Broker
    listener: Listener

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.listener.port}/"

    async def wait_sessions(self, count: int) -> None:
        """Wait until exactly `count` sessions are attached (a closed one detaches just after
        its peer sees the close, so tests that count closes wait for this)."""
        # The broker has no event for this, and tests need none elsewhere: poll, bounded.
        for _ in range(500):
            if len(self.broker.sessions) == count:
                return
            await trio.sleep(0.01)
        raise AssertionError(f"{len(self.broker.sessions)} sessions attached, not {count}")


def broker_config(**server: Any) -> Config:
    """The default configuration on an ephemeral port, with `server` overrides."""
    return Config(server=ServerConfig(port=0, **server))


@asynccontextmanager
async def running_broker(config: Config | None = None, instance_id: str = "test", *,
                         presence: bool = False) -> AsyncIterator[RunningBroker]:
    """A broker with its registry, listening on an ephemeral port; with `presence`, serving
    presence too, as the daemon does (join/leave events, the `presence` query)."""
    config = config or broker_config()
    async with AsyncExitStack() as stack:
        broker = await stack.enter_async_context(open_broker(config, instance_id))
        await stack.enter_async_context(open_registry(broker, config))
        if presence:
            await stack.enter_async_context(open_presence(broker, config))
        nursery = await stack.enter_async_context(trio.open_nursery())
        listener: Listener = await nursery.start(serve, broker, config.server)
        yield RunningBroker(broker, listener)
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class RawSession:
    ws: WebSocketConnection
    connection: ClientConnection

    async def send(self, *events: ClientEvent) -> None:
        await self.ws.send_message(self.connection.encode_batch(list(events)))

    async def send_frame(self, frame: bytes | str) -> None:
        await self.ws.send_message(frame)

    async def receive(self) -> list[ServerEvent]:
        """The events of the next frame."""
        with trio.fail_after(5):
            return self.connection.receive(await self.ws.get_message())  # type: ignore[return-value]

    async def next_event(self) -> ServerEvent:
        """The next event, wherever frame boundaries fall."""
        if not self._pending:
            self._pending.extend(await self.receive())
        return self._pending.pop(0)

    _pending: list[ServerEvent] = attrs.field(factory=list)

    async def closed_with(self) -> int:
        """Wait for the broker to close the connection; its close code."""
        with trio.fail_after(5):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as e:
                assert e.reason is not None
                return int(e.reason.code)


@asynccontextmanager
async def raw_session(url: str, *, fmt: Format = Format.MSGPACK, hello: bool = True,
                      max_message_size: int = 64 * 1024 * 1024) -> AsyncIterator[RawSession]:
    async with trio.open_nursery() as nursery:
        ws = await connect_websocket_url(nursery, url, max_message_size=max_message_size)
        session = RawSession(ws, ClientConnection(format=fmt))
        if hello:
            await session.send_frame(session.connection.hello("raw"))
            await session.receive()
        yield session
        with trio.move_on_after(1, shield=True):
            await ws.aclose()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def session_of(url: str, auth: str | None, *, ssl_context: ssl.SSLContext | None = None
                     ) -> AsyncIterator[tuple[RawSession, Any]]:
    """A raw session whose hello carries `auth`; yields it and the broker's first answer."""
    async with trio.open_nursery() as nursery:
        ws = await connect_websocket_url(nursery, url, ssl_context=ssl_context)
        session = RawSession(ws, ClientConnection())
        await session.send_frame(session.connection.hello("raw", auth))
        try:
            answer: Any = (await session.receive())[0]
        except Exception as e:  # HandshakeFailed carries the error event
            answer = getattr(e, "error", e)
        yield session, answer
        with trio.move_on_after(1, shield=True):
            await ws.aclose()
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class TcpProxy:
    """A TCP proxy in front of a port, whose live connections a test can cut at will."""

    target_port: int
    port: int = 0
    _connections: trio.Nursery | None = None
    cuts: int = 0

    async def cut(self) -> None:
        """Drop every connection going through now (abruptly); new ones still get through."""
        assert self._connections is not None
        self._connections.cancel_scope.cancel()
        self.cuts += 1

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as accepting:
            await accepting.start(self._rotate)
            task_status.started()
            while True:
                client = await listeners[0].accept()
                assert self._connections is not None
                self._connections.start_soon(self._pipe_both, client)

    async def _rotate(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                      ) -> None:
        """Keep a live nursery for connections; `cut` cancels it and a new one takes over."""
        while True:
            async with trio.open_nursery() as connections:
                self._connections = connections
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep_forever()

    async def _pipe_both(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as pipes:
            pipes.start_soon(_pipe, client, server, pipes.cancel_scope)
            pipes.start_soon(_pipe, server, client, pipes.cancel_scope)


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream,
                done: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy._serve)
        yield proxy
        nursery.cancel_scope.cancel()


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for a broker restarted on the same port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
