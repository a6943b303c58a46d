"""The asyncio client against a real broker, and its wsproto transport against a real socket.

pyproject's `trio_mode` runs async test functions under trio, so these tests are sync functions
that `asyncio.run` a scenario. The broker runs under `trio.run` in a background thread
(`BrokerThread`); scenarios reach it through `asyncio.to_thread`, so the asyncio loop keeps
serving the client (answering close handshakes, say) while the broker acts.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from mqbroker.broker import Broker, open_broker
from mqbroker.client import (
    BadEventId,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    InvalidFilter,
    InvalidTopic,
    SinceUnsupported,
)
from mqbroker.client._aio_ws import ConnectionClosed, HandshakeError, WebSocket, open_websocket
from mqbroker.client.aio import Client, Gap, Message, Reconnect, Subscription, connect
from mqbroker.config import Config
from mqbroker.protocol import CloseCode, Format
from mqbroker.server.listener import Listener, serve
from mqbroker.server.session import Session
from tests.harness import broker_config

T = TypeVar("T")

#: Bounds every scenario as a whole; single waits have tighter bounds of their own.
SCENARIO_TIMEOUT = 30
WAIT = 5
#: Reconnect quickly, so scenarios that drop connections stay short.
QUICK = Reconnect(initial_delay=0.01, max_delay=0.1)
RECORDED = "mcp/session/s1/message"  # matches the default [history] record filters


# --- a broker in a trio thread ---------------------------------------------------------------


@attrs.define(eq=False)
class BrokerThread:
    """A real broker served by trio in a background thread.

    The main listener keeps its port across `stop_listener`/`start_listener` and across
    `restart_broker` (a new broker, so a new history epoch). The side listener, on another
    port of the same broker, is for publishers that must stay reachable meanwhile.
    """

    config: Config = attrs.field(factory=broker_config)
    port: int = 0
    broker: Broker | None = None
    listener: Listener | None = None
    side: Listener | None = None
    _token: trio.lowlevel.TrioToken | None = None
    _nursery: trio.Nursery | None = None
    _restart: trio.Event | None = None
    _stopping: bool = False
    _ready: queue.Queue[BaseException | None] = attrs.field(factory=queue.Queue)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def side_url(self) -> str:
        assert self.side is not None
        return f"ws://127.0.0.1:{self.side.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._wait_ready()

    def stop(self) -> None:
        self._stopping = True
        self._trigger_restart()
        assert self._thread is not None
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the broker thread did not stop"

    def restart_broker(self) -> None:
        """Stop the broker (dropping its sessions) and start a new one on the same port."""
        self._trigger_restart()
        self._wait_ready()

    def _trigger_restart(self) -> None:
        restart = self._restart
        assert restart is not None
        trio.from_thread.run_sync(restart.set, trio_token=self._token)

    def _wait_ready(self) -> None:
        error = self._ready.get(timeout=WAIT)
        if error is not None:
            raise error

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            while not self._stopping:
                await self._generation()
        except BaseException as e:
            self._ready.put(e)
            raise

    async def _generation(self) -> None:
        """One broker's life, until a restart or stop."""
        self._restart = trio.Event()
        server = attrs.evolve(self.config.server, port=self.port)
        config = attrs.evolve(self.config, server=server)
        async with open_broker(config, "test") as broker, trio.open_nursery() as nursery:
            self.broker, self._nursery = broker, nursery
            self.side = await nursery.start(serve, broker, attrs.evolve(server, port=0))
            await self.start_listener()
            self._ready.put(None)
            await self._restart.wait()
            nursery.cancel_scope.cancel()

    # --- run on the trio thread (see `call`) ----------------------------------------------

    async def start_listener(self) -> None:
        assert self._nursery is not None and self.broker is not None
        server = attrs.evolve(self.config.server, port=self.port)
        self.listener = await self._nursery.start(serve, self.broker, server)
        self.port = self.listener.port

    async def stop_listener(self) -> None:
        """Stop accepting on the main port; every session is closed with 1001."""
        assert self.listener is not None
        await self.listener.shutdown()

    def sessions(self) -> list[Session]:
        assert self.broker is not None
        return list(self.broker.sessions)

    # --- from asyncio ----------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the trio function `fn` on the broker's thread; the asyncio loop keeps running."""
        return await asyncio.to_thread(lambda: trio.from_thread.run(fn, trio_token=self._token))

    async def call_sync(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(
            lambda: trio.from_thread.run_sync(fn, trio_token=self._token))

    async def session_of(self, name: str) -> Session:
        """The one session whose client said `name` in its hello."""
        sessions = await self.call_sync(self.sessions)
        (session,) = [s for s in sessions if s.protocol.client == name]
        return session

    async def close_session(self, name: str, code: CloseCode) -> None:
        """Close the session of client `name` from the broker's side."""
        session = await self.session_of(name)
        await self.call(lambda: session.close(code, "closed by the test"))


@pytest.fixture
def broker_thread() -> Iterator[BrokerThread]:
    """A broker with the default configuration, on a trio thread."""
    running = BrokerThread()
    running.start()
    yield running
    running.stop()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(SCENARIO_TIMEOUT):
            await scenario()

    asyncio.run(bounded())


async def next_item(subscription: Subscription) -> Message | Gap:
    async with asyncio.timeout(WAIT):
        return await anext(subscription)


async def next_message(subscription: Subscription) -> Message:
    item = await next_item(subscription)
    assert isinstance(item, Message), item
    return item


# --- publish and subscribe -------------------------------------------------------------------


def test_wildcards_get_one_copy_per_subscription(broker_thread: BrokerThread) -> None:
    """Exact, `+` and `#` subscriptions each get every matching message once, in order."""

    async def scenario() -> None:
        async with connect(broker_thread.url) as client:
            subs = [await client.subscribe(f) for f in ("a/b/c", "a/+/c", "a/#")]
            first = await client.publish("a/b/c", {"n": 1, "blob": b"\x00\xff"})
            await client.publish("a/b/c", [2])
            await client.publish("a/x", "only #")
            for sub in subs:
                one, two = await next_message(sub), await next_message(sub)
                assert (one.topic, one.payload, one.event_id) == \
                    ("a/b/c", {"n": 1, "blob": b"\x00\xff"}, first)
                assert two.payload == [2]  # not a second copy of the first
            assert (await next_message(subs[2])).payload == "only #"

    run(scenario)


def test_fire_and_forget_publish(broker_thread: BrokerThread) -> None:
    """ack=False returns None at once; the message still arrives, and its refusal is kept."""

    async def scenario() -> None:
        async with connect(broker_thread.url) as client:
            sub = await client.subscribe("t")
            assert await client.publish("t", b"quick", ack=False) is None
            await client.publish("bad/+", None, ack=False)
            await client.publish("t", b"acked")  # answered after the refusal before it
            assert [(await next_message(sub)).payload for _ in range(2)] == [b"quick", b"acked"]
            assert [type(e) for e in client.unsolicited] == [InvalidTopic]

    run(scenario)


def test_publish_nowait_queues_in_order_and_pushes_back_when_full(
        broker_thread: BrokerThread) -> None:
    """publish_nowait queues without waiting, in order; a full send queue raises QueueFull."""

    async def scenario() -> None:
        async with connect(broker_thread.url) as subscriber, \
                connect(broker_thread.url, buffer=10) as publisher:
            sub = await subscriber.subscribe("burst")
            accepted = 0
            with pytest.raises(asyncio.QueueFull):
                while accepted < 100:  # no await in between: the writer cannot drain meanwhile
                    publisher.publish_nowait("burst", accepted)
                    accepted += 1
            assert accepted == 10
            assert [(await next_message(sub)).payload for _ in range(10)] == list(range(10))

    run(scenario)


def test_typed_errors(broker_thread: BrokerThread) -> None:
    """Refusals raise their own error class, and the client stays usable after each."""

    async def scenario() -> None:
        async with connect(broker_thread.url) as client:
            with pytest.raises(InvalidTopic):
                await client.publish("a/+/b", 1)
            with pytest.raises(InvalidFilter):
                await client.subscribe("a/#/b")
            with pytest.raises(SinceUnsupported):
                await client.subscribe("a/+", since="x")
            with pytest.raises(BadEventId):
                await client.subscribe("a/b", since="not an event id")
            sub = await client.subscribe("a/b")
            await client.publish("a/b", "fine")
            assert (await next_message(sub)).payload == "fine"

    run(scenario)


def test_json_format(broker_thread: BrokerThread) -> None:
    """format="json" opens a JSON session (text frames) and round-trips JSON payloads."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="j", format="json") as client:
            assert (await broker_thread.session_of("j")).protocol.format is Format.JSON
            sub = await client.subscribe("j/+")
            payload = {"text": "héllo", "list": [1, 2.5, None, True]}
            event_id = await client.publish("j/1", payload)
            message = await next_message(sub)
            assert (message.payload, message.event_id) == (payload, event_id)

    run(scenario)


def test_unsubscribe_ends_the_subscription(broker_thread: BrokerThread) -> None:
    """After unsubscribe the iterator ends and the broker no longer routes to that filter."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="u") as client:
            gone = await client.subscribe("u/+")
            kept = await client.subscribe("u/1")
            await gone.unsubscribe()
            session = await broker_thread.session_of("u")
            filters = await broker_thread.call_sync(
                lambda: broker_thread.broker.index.filters_of(session))  # type: ignore[union-attr]
            assert dict(filters) == {kept.id: "u/1"}
            await client.publish("u/1", 1)
            assert (await next_message(kept)).payload == 1
            async with asyncio.timeout(WAIT):
                assert [item async for item in gone] == []

    run(scenario)


def test_forget_counts_topics(broker_thread: BrokerThread) -> None:
    """forget drops the recorded topics its filter matches and says how many."""

    async def scenario() -> None:
        async with connect(broker_thread.url) as client:
            await client.publish("mcp/session/s1/message", 1)
            await client.publish("mcp/session/s2/message", 2)
            assert await client.forget("mcp/session/+/message") == 2
            assert await client.forget("mcp/session/+/message") == 0

    run(scenario)


# --- reconnecting ---------------------------------------------------------------------------


def test_reconnect_resumes_from_history(broker_thread: BrokerThread) -> None:
    """A dropped client resumes where it left off: what it missed is replayed, no gap, and a
    publish made while it was away is sent once it is back."""

    async def scenario() -> None:
        async with connect(broker_thread.url, reconnect=QUICK) as client, \
                connect(broker_thread.side_url, reconnect=QUICK) as publisher:
            sub = await client.subscribe(RECORDED)
            await publisher.publish(RECORDED, 1)
            assert (await next_message(sub)).payload == 1
            await broker_thread.call(broker_thread.stop_listener)
            await publisher.publish(RECORDED, 2)  # the client is away
            away = asyncio.create_task(client.publish(RECORDED, 3))
            await broker_thread.call(broker_thread.start_listener)
            replayed, own = await next_message(sub), await next_message(sub)
            assert (replayed.payload, own.payload) == (2, 3)
            async with asyncio.timeout(WAIT):
                assert await away == own.event_id
            await publisher.publish(RECORDED, 4)
            assert (await next_message(sub)).payload == 4

    run(scenario)


def test_session_closed_by_broker_is_reestablished(broker_thread: BrokerThread) -> None:
    """When the broker closes the session, the client reconnects and an exact subscription
    goes on without a gap: each message arrives once, by replay or live."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="c", reconnect=QUICK) as client, \
                connect(broker_thread.side_url) as publisher:
            exact = await client.subscribe(RECORDED)
            await publisher.publish(RECORDED, 1)
            assert (await next_message(exact)).payload == 1
            await broker_thread.close_session("c", CloseCode.SLOW_CONSUMER)
            # Whichever side of the reconnect these fall, each is delivered exactly once.
            await publisher.publish(RECORDED, 2)
            await publisher.publish(RECORDED, 3)
            assert [(await next_message(exact)).payload for _ in range(2)] == [2, 3]

    run(scenario)


def test_wildcard_subscription_after_reconnect_says_not_resumable(
        broker_thread: BrokerThread) -> None:
    """A wildcard subscription cannot resume: after a reconnect it yields
    Gap("not_resumable") once, then what follows."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="w", reconnect=QUICK) as client, \
                connect(broker_thread.side_url) as publisher:
            wildcard = await client.subscribe("mcp/session/+/message")
            await publisher.publish(RECORDED, 1)
            assert (await next_message(wildcard)).payload == 1
            await broker_thread.close_session("w", CloseCode.GOING_AWAY)
            assert await next_item(wildcard) == Gap(reason="not_resumable")
            await publisher.publish(RECORDED, 2)
            assert (await next_message(wildcard)).payload == 2

    run(scenario)


def test_unused_wildcard_subscription_survives_reconnect(broker_thread: BrokerThread) -> None:
    """A wildcard subscription that delivered nothing yet is re-established after a
    reconnect, with the Gap("not_resumable") that any re-established wildcard gets."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="w", reconnect=QUICK) as client, \
                connect(broker_thread.side_url) as publisher:
            wildcard = await client.subscribe("w/+")
            await broker_thread.close_session("w", CloseCode.GOING_AWAY)
            assert await next_item(wildcard) == Gap(reason="not_resumable")
            await publisher.publish("w/1", 1)
            assert (await next_message(wildcard)).payload == 1

    run(scenario)


def test_restarted_broker_means_a_gap(broker_thread: BrokerThread) -> None:
    """A broker restarted on the same port has a new history epoch: the resumed subscription
    yields Gap("unknown_epoch"), then live messages again."""

    async def scenario() -> None:
        async with connect(broker_thread.url, reconnect=QUICK) as client:
            sub = await client.subscribe(RECORDED)
            first = await client.publish(RECORDED, 1)
            assert (await next_message(sub)).event_id == first == sub.last_event_id
            await asyncio.to_thread(broker_thread.restart_broker)
            assert await next_item(sub) == Gap(reason="unknown_epoch")
            await client.publish(RECORDED, 2)
            assert (await next_message(sub)).payload == 2

    run(scenario)


def test_gives_up_when_reconnect_is_disabled(broker_thread: BrokerThread) -> None:
    """Without reconnect a dropped connection ends subscriptions and operations with
    ConnectionLost."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="g",
                           reconnect=Reconnect(enabled=False)) as client:
            sub = await client.subscribe("g")
            await broker_thread.close_session("g", CloseCode.GOING_AWAY)
            with pytest.raises(ConnectionLost):
                await next_item(sub)
            with pytest.raises(ConnectionLost):
                await client.publish("g", 1)
            assert client.failure is not None

    run(scenario)


def test_gives_up_after_max_attempts(broker_thread: BrokerThread) -> None:
    """With max_attempts, a broker that stays unreachable ends the client with ConnectionLost
    once that many attempts in a row failed; a waiting request fails with it."""

    async def scenario() -> None:
        policy = Reconnect(initial_delay=0.01, max_delay=0.02, max_attempts=3)
        async with connect(broker_thread.url, reconnect=policy) as client:
            await broker_thread.call(broker_thread.stop_listener)
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(WAIT):
                    await client.publish("t", 1)

    run(scenario)


def test_keepalive_keeps_an_idle_session(broker_thread: BrokerThread) -> None:
    """The client pings within the broker's ping_interval, so a session with nothing to say
    outlives the broker's idle_timeout."""
    server = attrs.evolve(broker_thread.config.server, ping_interval=0.05, idle_timeout=0.3)
    broker_thread.config = attrs.evolve(broker_thread.config, server=server)
    broker_thread.restart_broker()

    async def scenario() -> None:
        async with connect(broker_thread.url, name="k") as client:
            session = await broker_thread.session_of("k")
            await asyncio.sleep(1.0)  # the passing time is the test, not a synchronisation
            assert await broker_thread.session_of("k") is session
            assert session.closing is None
            assert await client.publish("k", 1)

    run(scenario)


# --- opening and closing --------------------------------------------------------------------


def test_clean_close(broker_thread: BrokerThread) -> None:
    """Leaving `connect` closes the session with 1000, ends its subscriptions, and later
    operations raise ClientClosed."""

    async def scenario() -> None:
        async with connect(broker_thread.url, name="q") as client:
            sub = await client.subscribe("q")
            session = await broker_thread.session_of("q")
            reading = asyncio.create_task(anext(sub))
        async with asyncio.timeout(WAIT):
            with pytest.raises(StopAsyncIteration):
                await reading
        # The broker noted our close before answering it, and we waited for the answer.
        closed = await broker_thread.call_sync(lambda: (session.peer_code, session.peer_reason))
        assert closed == (1000, "client closed")
        with pytest.raises(ClientClosed):
            await client.publish("q", 1)

    run(scenario)


def test_connect_error_when_nothing_listens(broker_thread: BrokerThread) -> None:
    """An unreachable broker raises ConnectError (not an ExceptionGroup) from `connect`."""

    async def scenario() -> None:
        await broker_thread.call(broker_thread.stop_listener)
        with pytest.raises(ConnectError) as caught:
            async with connect(broker_thread.url):
                pass
        assert isinstance(caught.value.__cause__, OSError)

    run(scenario)


def test_application_errors_are_not_wrapped(broker_thread: BrokerThread) -> None:
    """An exception raised in the `connect` block comes out as itself, and the session is
    still closed properly (even though the client's task never got to run)."""

    async def scenario() -> None:
        with pytest.raises(KeyError):
            async with connect(broker_thread.url, name="e"):
                session = await broker_thread.session_of("e")
                raise KeyError("mine")
        closed = await broker_thread.call_sync(lambda: session.peer_code)
        assert closed == 1000

    run(scenario)


def test_cancelled_block_closes_the_session(broker_thread: BrokerThread) -> None:
    """Cancelling the task inside `connect` closes the session with 1000 and ends its
    subscriptions; the cancellation propagates."""

    async def scenario() -> None:
        subscribed = asyncio.Event()
        subs: list[Subscription] = []

        async def user() -> None:
            async with connect(broker_thread.url, name="x") as client:
                subs.append(await client.subscribe("x"))
                subscribed.set()
                await asyncio.Future()  # until cancelled

        task = asyncio.create_task(user())
        async with asyncio.timeout(WAIT):
            await subscribed.wait()
        session = await broker_thread.session_of("x")
        task.cancel()
        async with asyncio.timeout(WAIT):
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [item async for item in subs[0]] == []
        closed = await broker_thread.call_sync(lambda: session.peer_code)
        assert closed == 1000

    run(scenario)


def test_unsubscribe_while_the_stream_is_full(broker_thread: BrokerThread) -> None:
    """Unsubscribing frees a reader that waits for room in that subscription's full stream;
    the client goes on working (the trio client raises ClosedResourceError here)."""

    async def scenario() -> None:
        async with connect(broker_thread.url, buffer=2) as client, \
                connect(broker_thread.url) as publisher:
            full = await client.subscribe("f")
            other = await client.subscribe("h")
            for n in range(5):
                await publisher.publish("f", n)
            await publisher.publish("h", "after")
            stream = full._items
            async with asyncio.timeout(WAIT):
                while len(stream._items) < 2:  # then the reader waits for room
                    await stream._changed.wait()
            async with asyncio.timeout(WAIT):
                await full.unsubscribe()
            assert (await next_message(other)).payload == "after"
            assert await client.publish("h", 1)

    run(scenario)


# --- the WebSocket transport, against a wsproto server on a real socket ---------------------


@attrs.define(eq=False)
class Peer:
    """The server's end of one test WebSocket, speaking wsproto directly."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.SERVER))
    events: deque[Event] = attrs.field(factory=deque)

    async def send(self, *events: Event) -> None:
        for event in events:
            self.writer.write(self.protocol.send(event))
        await self.writer.drain()

    async def receive(self) -> Event:
        """The next event from the client; a CloseConnection(1006) at end of file."""
        async with asyncio.timeout(WAIT):
            while not self.events:
                data = await self.reader.read(65536)
                self.protocol.receive_data(data or None)
                self.events.extend(self.protocol.events())
        return self.events.popleft()


@attrs.define(eq=False)
class WsServer:
    """A WebSocket server on 127.0.0.1 whose accepted peers the test drives."""

    url: str
    peers: asyncio.Queue[Peer] = attrs.field(factory=asyncio.Queue)
    clients: list[WebSocket] = attrs.field(factory=list)
    accepted: list[Peer] = attrs.field(factory=list)

    async def open(self, max_message_size: int = 1 << 20) -> tuple[WebSocket, Peer]:
        """A client WebSocket and the server's end of it."""
        async with asyncio.timeout(WAIT):
            ws = await open_websocket(self.url, max_message_size=max_message_size)
            self.clients.append(ws)
            return ws, await self.peers.get()

    def drop_all(self) -> None:
        for ws in self.clients:
            ws.abort()
        for peer in self.accepted:
            peer.writer.close()


@asynccontextmanager
async def ws_server(*, refuse: bool = False) -> AsyncIterator[WsServer]:
    """Serve WebSocket upgrades (or refuse them with 404); each accepted peer is queued."""
    running: WsServer | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert running is not None
        peer = Peer(reader, writer)
        running.accepted.append(peer)
        assert isinstance(await peer.receive(), Request)
        if refuse:
            await peer.send(RejectConnection(status_code=404))
            writer.close()
            return
        await peer.send(AcceptConnection())
        await running.peers.put(peer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    running = WsServer(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/path?q=1")
    async with server:
        try:
            yield running
        finally:
            running.drop_all()


def test_transport_assembles_fragments_and_answers_pings() -> None:
    """Fragmented binary and text messages arrive whole, and a ping interleaved in a
    fragmented message is answered with a pong carrying its payload."""

    async def scenario() -> None:
        async with ws_server() as server:
            ws, peer = await server.open()
            await peer.send(BytesMessage(data=b"ab", message_finished=False),
                            Ping(payload=b"p"),
                            BytesMessage(data=b"cd"),
                            TextMessage(data="hé", message_finished=False),
                            TextMessage(data="llo"))
            assert await ws.get_message() == b"abcd"
            assert await ws.get_message() == "héllo"
            assert await peer.receive() == Pong(payload=b"p")
            await ws.send_message("text")
            await ws.send_message(b"bytes")
            assert await peer.receive() == TextMessage(data="text")
            assert await peer.receive() == BytesMessage(data=bytearray(b"bytes"))

    run(scenario)


def test_transport_refuses_oversized_messages() -> None:
    """A message over max_message_size, even in small fragments, closes with 1009."""

    async def scenario() -> None:
        async with ws_server() as server:
            ws, peer = await server.open(max_message_size=10)
            await peer.send(BytesMessage(data=b"x" * 10))  # exactly the limit is fine
            assert await ws.get_message() == b"x" * 10
            await peer.send(BytesMessage(data=b"y" * 6, message_finished=False),
                            BytesMessage(data=b"y" * 5))
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
            assert caught.value.reason.code == 1009
            close = await peer.receive()
            assert isinstance(close, CloseConnection) and close.code == 1009
            await peer.send(close.response())
            async with asyncio.timeout(WAIT):
                await ws.aclose()

    run(scenario)


def test_transport_close_handshakes() -> None:
    """A close from the peer is echoed and reported with its code; a close of ours waits for
    the peer's answer; sending on a closed WebSocket raises ConnectionClosed."""

    async def scenario() -> None:
        async with ws_server() as server:
            ws, peer = await server.open()
            await peer.send(CloseConnection(code=4008, reason="slow"))
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
            assert (caught.value.reason.code, caught.value.reason.reason) == (4008, "slow")
            assert await peer.receive() == CloseConnection(code=4008, reason="slow")
            with pytest.raises(ConnectionClosed):
                await ws.send_message(b"late")

            ws, peer = await server.open()
            closing = asyncio.create_task(ws.aclose(1000, "bye"))
            close = await peer.receive()
            assert close == CloseConnection(code=1000, reason="bye")
            assert not closing.done()
            await peer.send(close.response())
            async with asyncio.timeout(WAIT):
                await closing
            assert isinstance(await peer.receive(), CloseConnection)  # end of file: 1006

    run(scenario)


def test_transport_close_is_abandoned_when_the_peer_is_silent() -> None:
    """A close the peer never answers can be bounded by the caller; the socket is dropped."""

    async def scenario() -> None:
        async with ws_server() as server:
            ws, peer = await server.open()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await ws.aclose(1000, "bye")
            assert await peer.receive() == CloseConnection(code=1000, reason="bye")
            assert await peer.receive() == CloseConnection(code=1006)  # dropped, not answered
            assert ws.closed is not None

    run(scenario)


def test_refused_upgrade() -> None:
    """An HTTP refusal of the upgrade raises HandshakeError, and ConnectError from `connect`."""

    async def scenario() -> None:
        async with ws_server(refuse=True) as server:
            url = server.url
            with pytest.raises(HandshakeError, match="404"):
                async with asyncio.timeout(WAIT):
                    await open_websocket(url, max_message_size=100)
            with pytest.raises(ConnectError) as caught:
                async with connect(url):
                    pass
            assert isinstance(caught.value.__cause__, HandshakeError)

    run(scenario)


def test_url_must_be_a_websocket_url() -> None:
    """Only ws:// and wss:// URLs are accepted."""

    async def scenario() -> None:
        with pytest.raises(ValueError, match="ws://"):
            await open_websocket("http://127.0.0.1/", max_message_size=100)

    run(scenario)


def test_client_type_is_exported() -> None:
    """`Client` is the type `connect` yields (for annotations in applications)."""
    assert Client.__module__ == "mqbroker.client.aio"
