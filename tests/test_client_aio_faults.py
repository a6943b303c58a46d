"""The asyncio client under faults, as tests/test_client_faults.py checks the trio one: a TCP
front on 127.0.0.1 whose new connections fail as the test says (or that holds the broker's
bytes), and a raw WebSocket server that misbehaves as a broker could. The broker is a real one
on a trio thread (tests/test_client_aio.py's BrokerThread).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from mqbroker.client.aio import (
    Gap,
    Message,
    MessageTooLarge,
    Reconnect,
    Subscription,
    connect,
)
from mqbroker.config import Config, ServerConfig
from mqbroker.protocol import Error, ErrorCode, Format, Welcome
from mqbroker.protocol.codec import encode
from tests.test_client_aio import BrokerThread, Peer, run, ws_server
from tests.test_client_faults import lost_silently

QUICK = Reconnect(initial_delay=0.01, max_delay=0.05)
RECORDED = "mcp/session/s1/message"
WAIT = 10


# --- a TCP front whose new connections fail as the test says -----------------------------------


async def _upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> WSConnection:
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        ws.receive_data(await reader.read(65536))
        if any(isinstance(event, Request) for event in ws.events()):
            writer.write(ws.send(AcceptConnection()))
            await writer.drain()
            return ws


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    writer.write(b"\x00\x01 not HTTP at all\r\n\r\n")
    await asyncio.sleep(3600)


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(65536)
    await asyncio.sleep(3600)


async def _upgrade_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _upgrade(reader, writer)
    writer.close()


async def _no_welcome(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _upgrade(reader, writer)
    await asyncio.sleep(3600)  # the hello is never answered


async def _refuse_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    ws = await _upgrade(reader, writer)
    await reader.read(65536)
    refusal = Error(code=ErrorCode.UNSUPPORTED_VERSION, message="not this version")
    writer.write(ws.send(BytesMessage(data=encode(refusal, Format.MSGPACK)))
                 + ws.send(CloseConnection(code=4000)))
    await writer.drain()
    writer.close()


Fault = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
FAULTS: dict[str, Fault] = {
    "close before 101": _close_at_once,
    "reset before 101": _reset,
    "garbage HTTP reply": _garbage,
    "silent after accept": _silent,
    "101 then close": _upgrade_then_close,
    "hello refused": _refuse_hello,
    "welcome never comes": _no_welcome,
}


@attrs.define(eq=False)
class Front:
    """A TCP front for a broker: while `fault` is set each new connection fails that way (and is
    counted in `failed`); `hold` keeps the broker's bytes from clients until `release`."""

    target_port: int
    port: int = 0
    fault: str | None = None
    failed: int = 0
    _flowing: asyncio.Event = attrs.field(factory=asyncio.Event)
    _live: list[asyncio.StreamWriter] = attrs.field(factory=list)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Drop every connection going through now."""
        for writer in self._live:
            writer.transport.abort()
        self._live.clear()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.fault is not None:
            self.failed += 1
            await FAULTS[self.fault](reader, writer)
            return
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target_port)
        self._live += [writer, server_writer]
        pipes = [asyncio.create_task(self._pipe(reader, server_writer, False)),
                 asyncio.create_task(self._pipe(server_reader, writer, True))]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        writer.transport.abort()
        server_writer.transport.abort()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    gated: bool) -> None:
        try:
            while chunk := await source.read(65536):
                if gated:
                    await self._flowing.wait()
                sink.write(chunk)
                await sink.drain()
        except OSError:
            pass


@asynccontextmanager
async def front(target_port: int) -> AsyncIterator[Front]:
    proxy = Front(target_port)
    proxy.release()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            yield proxy
        finally:
            proxy.cut()
            for task in proxy._tasks:
                task.cancel()


async def read_until(subscription: Subscription, last: Any) -> list[Message | Gap]:
    items: list[Message | Gap] = []
    async with asyncio.timeout(WAIT):
        async for item in subscription:
            items.append(item)
            if isinstance(item, Message) and item.payload == last:
                return items
    raise AssertionError("the subscription ended")


@pytest.fixture
def broker_thread() -> Iterator[BrokerThread]:
    running = BrokerThread()
    running.start()
    yield running
    running.stop()


def small_frames() -> BrokerThread:
    return BrokerThread(config=Config(server=ServerConfig(port=0, max_frame_bytes=65536)))


# --- item 5 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(FAULTS))
def test_reconnects_through_any_failure_of_the_handshake(broker_thread: BrokerThread,
                                                        fault: str) -> None:
    """As for the trio client: 1.5 s of failing handshakes, then healed; the exact recorded
    subscription gets everything, the wildcard one everything or a Gap where some is missing."""

    async def scenario() -> None:
        async with front(broker_thread.port) as proxy, \
                connect(proxy.url, reconnect=QUICK, open_timeout=0.5) as subscriber, \
                connect(broker_thread.side_url) as publisher:
            exact = await subscriber.subscribe(RECORDED)
            wildcard = await subscriber.subscribe("mcp/session/+/message")
            published: list[int] = []
            loop = asyncio.get_running_loop()

            async def publish_for(seconds: float) -> None:
                deadline = loop.time() + seconds
                while loop.time() < deadline:
                    published.append(len(published))
                    await publisher.publish(RECORDED, published[-1])
                    await asyncio.sleep(0.01)

            await publish_for(0.2)
            proxy.fault = fault
            proxy.cut()
            await publish_for(1.5)
            proxy.fault = None
            await publish_for(0.2)
            await publisher.publish(RECORDED, "end")
            exact_items = await read_until(exact, "end")
            wildcard_items = await read_until(wildcard, "end")
        assert proxy.failed >= 1, "the fault was never met"
        assert [i.payload for i in exact_items if isinstance(i, Message)] == [*published, "end"]
        assert lost_silently(wildcard_items[:-1], published) == []

    run(scenario)


def test_a_stalled_connection_is_closed_and_replaced() -> None:
    """A broker that welcomes and then goes silent (no pong, no close answer) is given up after
    two ping intervals and a bounded close, and the client connects again."""

    async def scenario() -> None:
        async with ws_server() as server:
            async def silent_after_welcome() -> None:
                while True:
                    peer = await server.peers.get()
                    await peer.receive()  # the hello
                    welcome = Welcome(version=1, instance="fake", session="fake",
                                      limits={"ping_interval": 0.1})
                    await peer.send(BytesMessage(data=encode(welcome, Format.MSGPACK)))

            accepting = asyncio.create_task(silent_after_welcome())
            async with connect(server.url, reconnect=QUICK, close_timeout=0.2):
                async with asyncio.timeout(5):
                    while len(server.accepted) < 3:  # noqa: ASYNC110  (counted by the server)
                        await asyncio.sleep(0.05)
            accepting.cancel()

    run(scenario)


# --- items 6 and 8 ---------------------------------------------------------------------------


def test_a_cancelled_subscribe_is_undone_on_the_broker() -> None:
    """Three subscribes cancelled before their suback arrived are unsubscribed ahead of what
    follows: with max_subscriptions = 3 a fourth succeeds; nothing stays pending."""
    running = BrokerThread(config=Config(server=ServerConfig(port=0, max_subscriptions=3)))
    running.start()

    async def scenario() -> None:
        async with front(running.port) as proxy, connect(proxy.url) as client:
            proxy.hold()
            for n in range(3):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await client.subscribe(f"cancelled/{n}")
            fourth = asyncio.create_task(client.subscribe("kept"))
            await asyncio.sleep(0.1)
            proxy.release()
            async with asyncio.timeout(WAIT):
                kept = await fourth
                while client.core.pending or await running.call_sync(  # noqa: ASYNC110
                        lambda: running.broker.stats()["subscriptions"] != 1):  # type: ignore
                    await asyncio.sleep(0.01)
            assert client._waiters == {} and client.core.subscriptions.keys() == {kept.id}
            await client.publish("kept", "here")
            assert [m.payload for m in await read_until(kept, "here")] == ["here"]

    try:
        run(scenario)
    finally:
        running.stop()


def test_a_publish_cancelled_while_disconnected_is_never_sent(
        broker_thread: BrokerThread) -> None:
    async def scenario() -> None:
        async with connect(broker_thread.side_url, reconnect=QUICK) as subscriber, \
                connect(broker_thread.url, reconnect=QUICK) as publisher:
            subscription = await subscriber.subscribe("t")
            await broker_thread.call(broker_thread.stop_listener)
            await asyncio.sleep(0.1)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await publisher.publish("t", "cancelled")
            await broker_thread.call(broker_thread.start_listener)
            async with asyncio.timeout(WAIT):
                await publisher.publish("t", "after")
            items = await read_until(subscription, "after")
        assert [m.payload for m in items if isinstance(m, Message)] == ["after"]

    run(scenario)


# --- item 7 ------------------------------------------------------------------------------------


def test_a_publish_over_the_limits_fails_before_it_is_sent() -> None:
    """The case seen: a publish over max_frame_bytes used to be resent ~20 times a second
    forever. Now MessageTooLarge, on the same session."""
    running = small_frames()
    running.start()

    async def scenario() -> None:
        async with connect(running.url) as client:
            (session,) = await running.call_sync(running.sessions)
            async with asyncio.timeout(5):
                with pytest.raises(MessageTooLarge):
                    await client.publish("t", b"x" * 100_000)
                with pytest.raises(MessageTooLarge):
                    await client.publish("t", b"x" * 65_000)
                await client.publish("t", b"x" * 100_000, ack=False)
                assert await client.publish("t", b"x" * 60_000)
            assert isinstance(client.unsolicited[-1], MessageTooLarge)
            assert await running.call_sync(running.sessions) == [session]

    try:
        run(scenario)
    finally:
        running.stop()


def test_requests_pending_over_a_reconnect_are_resent_within_the_frame_limit() -> None:
    running = small_frames()
    running.start()

    async def scenario() -> None:
        async with connect(running.side_url, reconnect=QUICK) as subscriber, \
                connect(running.url, reconnect=QUICK) as publisher:
            subscription = await subscriber.subscribe("t")
            await running.call(running.stop_listener)
            await asyncio.sleep(0.1)
            pending = [asyncio.create_task(publisher.publish("t", bytes([n]) * 40_000))
                       for n in range(3)]
            await asyncio.sleep(0.2)
            await running.call(running.start_listener)
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*pending)
            await publisher.publish("t", "end")
            items = await read_until(subscription, "end")
        payloads = [m.payload for m in items[:-1] if isinstance(m, Message)]
        assert sorted(p[:1] for p in payloads) == [b"\x00", b"\x01", b"\x02"]

    try:
        run(scenario)
    finally:
        running.stop()


def test_a_frame_refused_with_1009_is_never_resent() -> None:
    """A broker announcing a larger frame limit than it enforces closes with 1009: the request
    in the refused frame fails with MessageTooLarge, it is not resent, and the client goes on."""

    async def scenario() -> None:
        async with ws_server() as server:
            served: set[asyncio.Task[None]] = set()

            async def lying_broker() -> None:
                while True:
                    peer = await server.peers.get()
                    served.add(asyncio.create_task(serve(peer)))

            async def serve(peer: Peer) -> None:
                await peer.receive()  # the hello
                welcome = Welcome(version=1, instance="fake", session="fake",
                                  limits={"max_frame_bytes": 1 << 20})
                await peer.send(BytesMessage(data=encode(welcome, Format.MSGPACK)))
                parts: list[bytes] = []
                while True:
                    event = await peer.receive()
                    if not isinstance(event, BytesMessage):
                        return
                    parts.append(event.data)
                    if sum(map(len, parts)) > 10_000:
                        await peer.send(CloseConnection(code=1009))
                        return
                    if event.message_finished:
                        frame = msgpack.unpackb(b"".join(parts))
                        parts = []
                        for item in frame if isinstance(frame, list) else [frame]:
                            if item.get("op") == "publish":
                                puback = {"op": "puback", "id": item["id"], "event": "e1"}
                                await peer.send(BytesMessage(data=msgpack.packb(puback)))

            accepting = asyncio.create_task(lying_broker())
            async with connect(server.url, reconnect=QUICK) as client:
                async with asyncio.timeout(5):
                    with pytest.raises(MessageTooLarge):
                        await client.publish("t", b"x" * 20_000)
                    assert await client.publish("t", "small") == "e1"
                await asyncio.sleep(0.3)
            accepting.cancel()
            assert len(server.accepted) == 2  # the first, closed with 1009, and one reconnect

    run(scenario)
