"""The trio client under faults: nothing it waits for on the network can stall it, whatever fails
during a handshake is retried, and cancelled or too-large requests are never sent by surprise.

The faults are real: a TCP front on 127.0.0.1 (an L4 proxy, as deployed) whose new connections
fail in one way or another while the test says so, a front that holds the broker's bytes, and
small raw WebSocket servers that misbehave as a broker could.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from mqbroker.broker import open_broker
from mqbroker.client import (
    Client,
    ConnectError,
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
from mqbroker.server.listener import Listener, serve
from tests.harness import TcpProxy, broker_config, running_broker

FAST = Reconnect(initial_delay=0.01, max_delay=0.05)
RECORDED = "mcp/session/s1/message"  # matches the default [history] record filters
WAIT = 10


# --- a TCP front whose new connections fail as the test says -----------------------------------


async def _close_at_once(client: trio.SocketStream) -> None:
    await client.aclose()  # a FIN before the 101, as an L4 proxy with no backend does


async def _reset(client: trio.SocketStream) -> None:
    # SO_LINGER 0: close sends an RST rather than a FIN.
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()


async def _garbage(client: trio.SocketStream) -> None:
    await client.receive_some()
    await client.send_all(b"\x00\x01 not HTTP at all\r\n\r\n")
    await trio.sleep_forever()  # the client must give up by itself


async def _silent(client: trio.SocketStream) -> None:
    await client.receive_some()
    await trio.sleep_forever()  # accepts, reads, never answers: only open_timeout ends it


async def _upgrade(client: trio.SocketStream) -> WSConnection:
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        ws.receive_data(await client.receive_some())
        if any(isinstance(event, Request) for event in ws.events()):
            await client.send_all(ws.send(AcceptConnection()))
            return ws


async def _upgrade_then_close(client: trio.SocketStream) -> None:
    await _upgrade(client)
    await client.aclose()


async def _no_welcome(client: trio.SocketStream) -> None:
    await _upgrade(client)
    await trio.sleep_forever()  # the hello is never answered


async def _refuse_hello(client: trio.SocketStream) -> None:
    ws = await _upgrade(client)
    await client.receive_some()  # the hello
    refusal = Error(code=ErrorCode.UNSUPPORTED_VERSION, message="not this version")
    await client.send_all(ws.send(BytesMessage(data=encode(refusal, Format.MSGPACK)))
                          + ws.send(CloseConnection(code=4000)))
    await client.aclose()


FAULTS: dict[str, Callable[[trio.SocketStream], Awaitable[None]]] = {
    "close before 101": _close_at_once,
    "reset before 101": _reset,
    "garbage HTTP reply": _garbage,
    "silent after accept": _silent,
    "101 then close": _upgrade_then_close,
    "hello refused": _refuse_hello,
    "welcome never comes": _no_welcome,
}
#: The faults only open_timeout ends (kept short in these tests).
SILENT = ("silent after accept", "welcome never comes")


@attrs.define(eq=False)
class Front(TcpProxy):
    """A TCP front for a broker: while `fault` is set, each new connection fails that way (and
    is counted in `failed`); `hold` keeps the broker's bytes from reaching clients until
    `release`."""

    fault: str | None = None
    failed: int = 0
    _flowing: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def hold(self) -> None:
        self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    async def _pipe_both(self, client: trio.SocketStream) -> None:
        if self.fault is not None:
            self.failed += 1
            async with client:
                await FAULTS[self.fault](client)
            return
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as pipes:
            pipes.start_soon(self._pipe, client, server, pipes.cancel_scope, False)
            pipes.start_soon(self._pipe, server, client, pipes.cancel_scope, True)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream,
                    done: trio.CancelScope, gated: bool) -> None:
        try:
            async for chunk in source:
                if gated:
                    await self._flowing.wait()
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


@asynccontextmanager
async def front(target_port: int) -> AsyncIterator[Front]:
    proxy = Front(target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy._serve)
        yield proxy
        nursery.cancel_scope.cancel()


# --- reading subscriptions -------------------------------------------------------------------


async def read_until(subscription: Subscription, last: Any) -> list[Message | Gap]:
    """Every item up to and including the message whose payload is `last`."""
    items: list[Message | Gap] = []
    with trio.fail_after(WAIT):
        async for item in subscription:
            items.append(item)
            if isinstance(item, Message) and item.payload == last:
                return items
    raise AssertionError("the subscription ended")


def lost_silently(items: Sequence[Message | Gap], published: Sequence[int]) -> list[int]:
    """Published payloads (in publishing order) missing from `items` with no Gap before the
    next message that did arrive. Also fails on a duplicate or a reordering."""
    silent: list[int] = []
    position = 0
    gap = False
    for item in items:
        if isinstance(item, Gap):
            gap = True
            continue
        index = published.index(item.payload)
        assert index >= position, f"{item.payload} delivered twice or out of order"
        if index > position and not gap:
            silent.extend(published[position:index])
        position, gap = index + 1, False
    return silent


# --- item 5: every network wait bounded, any handshake failure retried -------------------------


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_reconnects_through_any_failure_of_the_handshake(fault: str) -> None:
    """The subscriber's connection is cut, and for 1.5 s every new connection through the front
    fails (`fault`), then it heals. The client keeps retrying and recovers: the exact recorded
    subscription gets every acknowledged message, the wildcard one every message or a Gap
    where some may be missing; nothing is lost silently."""
    timeouts = {"open_timeout": 0.5} if fault in SILENT else {}
    async with running_broker() as broker, front(broker.listener.port) as proxy, \
            connect(proxy.url, reconnect=FAST, **timeouts) as subscriber, \
            connect(broker.url) as publisher:
        exact = await subscriber.subscribe(RECORDED)
        wildcard = await subscriber.subscribe("mcp/session/+/message")
        published: list[int] = []
        count = 0

        async def publish_for(seconds: float) -> None:
            nonlocal count
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:  # (a publish cancelled midway may be
                await publisher.publish(RECORDED, count)  # published: never cancel one here)
                published.append(count)
                count += 1
                await trio.sleep(0.01)

        await publish_for(0.2)
        proxy.fault = fault
        await proxy.cut()
        await publish_for(1.5)
        proxy.fault = None
        await publish_for(0.2)
        await publisher.publish(RECORDED, "end")
        exact_items = await read_until(exact, "end")
        wildcard_items = await read_until(wildcard, "end")
    assert proxy.failed >= 1, "the fault was never met"
    assert [i.payload for i in exact_items if isinstance(i, Message)] == [*published, "end"]
    assert lost_silently(wildcard_items[:-1], published) == []


async def test_first_connect_to_a_silent_server_fails_within_open_timeout() -> None:
    """A server that accepts and then says nothing cannot hang `connect`."""
    async with running_broker() as broker, front(broker.listener.port) as proxy:
        proxy.fault = "silent after accept"
        with trio.fail_after(3), pytest.raises(ConnectError):
            async with connect(proxy.url, open_timeout=0.5):
                raise AssertionError("connected to a silent server")


async def _welcome(request: WebSocketRequest, **limits: Any) -> Any:
    """Accept a raw WebSocket, take the hello, answer with a welcome announcing `limits`."""
    ws = await request.accept()
    await ws.get_message()
    welcome = Welcome(version=1, instance="fake", session="fake", limits=limits)
    await ws.send_message(encode(welcome, Format.MSGPACK))
    return ws


@asynccontextmanager
async def fake_broker(handler: Callable[[WebSocketRequest], Awaitable[None]],
                      max_message_size: int = 1 << 20) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: serve_websocket(
            handler, "127.0.0.1", 0, None, max_message_size=max_message_size,
            task_status=task_status))
        yield f"ws://127.0.0.1:{server.port}/"
        nursery.cancel_scope.cancel()


async def test_a_stalled_connection_is_closed_and_replaced() -> None:
    """A broker that welcomes and then goes silent (not answering pings, nor the close) is given
    up after two ping intervals and a bounded close, and the client connects again."""
    connections = 0

    async def silent_after_welcome(request: WebSocketRequest) -> None:
        nonlocal connections
        connections += 1
        await _welcome(request, ping_interval=0.1)
        await trio.sleep_forever()

    async with fake_broker(silent_after_welcome) as url, \
            connect(url, reconnect=FAST, close_timeout=0.2):
        with trio.fail_after(5):
            while connections < 3:  # noqa: ASYNC110  (counted by the fake broker's handler)
                await trio.sleep(0.05)


# --- items 6 and 8: cancellation -----------------------------------------------------------


async def test_a_cancelled_subscribe_is_undone_on_the_broker() -> None:
    """Three subscribes cancelled before their suback arrived are unsubscribed on the broker,
    ahead of anything sent later: with max_subscriptions = 3 a fourth succeeds, the broker holds
    only that one, and no request stays pending in the client."""
    config = Config(server=ServerConfig(port=0, max_subscriptions=3))
    async with running_broker(config) as broker, front(broker.listener.port) as proxy, \
            connect(proxy.url) as client:
        proxy.hold()  # the subscribes reach the broker; its subacks wait in the front
        for n in range(3):
            with trio.move_on_after(0.1):
                await client.subscribe(f"cancelled/{n}")
                raise AssertionError("subscribed through a held front")
        kept: list[Subscription] = []
        async with trio.open_nursery() as nursery:
            async def fourth() -> None:
                kept.append(await client.subscribe("kept"))

            nursery.start_soon(fourth)
            await trio.sleep(0.1)  # sent meanwhile, behind the three cancelled ones
            proxy.release()
        with trio.fail_after(5):
            # The broker has no event for this: poll, bounded.
            while broker.broker.stats()["subscriptions"] != 1 or client.core.pending:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert client._waiters == {} and client.core.subscriptions.keys() == {kept[0].id}
        await client.publish("cancelled/0", "nobody")
        await client.publish("kept", "here")
        assert [m.payload for m in await read_until(kept[0], "here")] == ["here"]


Listeners = tuple[Listener, Listener, Callable[[], Awaitable[None]]]


@asynccontextmanager
async def two_listeners(config: Config) -> AsyncIterator[Listeners]:
    """One broker on a main and a side listener; `restart()` starts the main one again on its
    port after the test shut it down (its sessions then closed with 1001)."""
    async with open_broker(config, "test") as broker, trio.open_nursery() as nursery:
        main: Listener = await nursery.start(serve, broker, config.server)
        side: Listener = await nursery.start(serve, broker, config.server)

        async def restart() -> None:
            server = attrs.evolve(config.server, port=main.port)
            await nursery.start(serve, broker, server)

        yield main, side, restart
        nursery.cancel_scope.cancel()


def url_of(listener: Listener) -> str:
    return f"ws://127.0.0.1:{listener.port}/"


async def test_a_publish_cancelled_while_disconnected_is_never_sent() -> None:
    """A publish whose caller gave up while the broker was unreachable is withdrawn: it is not
    published once the client reconnects."""
    async with two_listeners(broker_config()) as (main, side, restart), \
            connect(url_of(side), reconnect=FAST) as subscriber, \
            connect(url_of(main), reconnect=FAST) as publisher:
        subscription = await subscriber.subscribe("t")
        await main.shutdown()
        await trio.sleep(0.1)  # the publisher has seen its session close: it is reconnecting
        with trio.move_on_after(0.3):
            await publisher.publish("t", "cancelled")
            raise AssertionError("published while the broker was down")
        await restart()
        with trio.fail_after(WAIT):
            await publisher.publish("t", "after")
        items = await read_until(subscription, "after")
    # (The broker closed every session, so the subscriber's stream also has a Gap.)
    assert [m.payload for m in items if isinstance(m, Message)] == ["after"]


# --- item 7: too-large frames never sent, never resent ------------------------------------------


SMALL_FRAMES = Config(server=ServerConfig(port=0, max_frame_bytes=65536))


async def test_a_publish_over_the_limits_fails_before_it_is_sent() -> None:
    """Over max_frame_bytes, or over max_message_bytes: MessageTooLarge, on the same session
    (no 1009, no reconnect, nothing resent); a fire-and-forget one is reported as unsolicited."""
    async with running_broker(SMALL_FRAMES) as broker, connect(broker.url) as client:
        (session,) = broker.broker.sessions
        with trio.fail_after(5):
            with pytest.raises(MessageTooLarge) as refused:
                await client.publish("t", b"x" * 100_000)
            assert refused.value.msg_id is not None
            with pytest.raises(MessageTooLarge):
                await client.publish("t", b"x" * 65_000)  # under the frame, over the message
            await client.publish("t", b"x" * 100_000, ack=False)
            assert await client.publish("t", b"x" * 60_000)
        assert isinstance(client.unsolicited[-1], MessageTooLarge)
        assert list(broker.broker.sessions) == [session]


async def test_requests_pending_over_a_reconnect_are_resent_within_the_frame_limit() -> None:
    """Three 40 kB publishes pending while the broker is down are resent after the reconnect in
    frames under its 64 kB limit (one batch of all three would be refused with 1009, again on
    every reconnect)."""
    async with two_listeners(SMALL_FRAMES) as (main, side, restart), \
            connect(url_of(side), reconnect=FAST) as subscriber, \
            connect(url_of(main), reconnect=FAST) as publisher:
        subscription = await subscriber.subscribe("t")
        await main.shutdown()
        await trio.sleep(0.1)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(publisher.publish, "t", bytes([n]) * 40_000)
                await trio.sleep(0.2)
                await restart()
            await publisher.publish("t", "end")
        items = await read_until(subscription, "end")
    payloads = [m.payload for m in items[:-1] if isinstance(m, Message)]
    assert sorted(p[:1] for p in payloads) == [b"\x00", b"\x01", b"\x02"]


async def test_a_frame_refused_with_1009_is_never_resent() -> None:
    """A broker announcing a larger frame limit than it enforces closes with 1009: the request
    in the refused frame fails with MessageTooLarge instead of being resent on every reconnect,
    and the client goes on."""
    connections = 0

    async def lying_broker(request: WebSocketRequest) -> None:
        nonlocal connections
        connections += 1
        ws = await _welcome(request, max_frame_bytes=1 << 20)
        try:
            while True:
                frame = msgpack.unpackb(await ws.get_message())
                for event in frame if isinstance(frame, list) else [frame]:
                    if event.get("op") == "publish":
                        puback = {"op": "puback", "id": event["id"], "event": "e1"}
                        await ws.send_message(msgpack.packb(puback))
        except ConnectionClosed:
            pass

    async with fake_broker(lying_broker, max_message_size=10_000) as url, \
            connect(url, reconnect=FAST) as client:
        with trio.fail_after(5):
            with pytest.raises(MessageTooLarge):
                await client.publish("t", b"x" * 20_000)
            assert await client.publish("t", "small") == "e1"
        await trio.sleep(0.3)
    assert connections == 2  # the first, closed with 1009, and one reconnect


# --- helpers' own checks ---------------------------------------------------------------------


def test_lost_silently_needs_a_gap_before_what_is_missing() -> None:
    def m(n: int) -> Message:
        return Message(topic="t", payload=n, event_id=str(n), published_at=0.0)

    assert lost_silently([m(0), m(1), m(2)], [0, 1, 2]) == []
    assert lost_silently([m(0), Gap(reason="x"), m(2)], [0, 1, 2]) == []
    assert lost_silently([m(0), m(2)], [0, 1, 2]) == [1]
    assert lost_silently([Gap(reason="x"), m(2)], [0, 1, 2]) == []
    with pytest.raises(AssertionError):
        lost_silently([m(0), m(0)], [0, 1])


def test_client_type_is_exported() -> None:
    assert Client.__name__ == "Client"
