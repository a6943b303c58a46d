"""Attacks on the merged whole (the review of issues 7, 8 and 9): what the separate branches
could not see together, each against a real broker over real sockets."""

from __future__ import annotations

import contextlib
import signal

import trio

from mqbroker.client import connect
from mqbroker.config import Config, ServerConfig
from mqbroker.protocol import ClientConnection, Delivery, Format, Publish, Subscribe
from tests.daemon import running_daemon
from tests.harness import RunningBroker, running_broker
from tests.monitor import wait_until
from tests.rawws import (
    BINARY,
    CLOSE,
    TEXT,
    ConnectionEnded,
    ProtocolSession,
    RawWebSocket,
    batch,
)

TOPIC = "mcp/session/s1/message"  # recorded by the default [history] record filters
#: Enough replay to fill the socket buffers on both sides of a loopback connection.
PAYLOAD = b"x" * 60_000
MESSAGES = 200


async def _recorded(url: str) -> str:
    """Record MESSAGES large messages on TOPIC; the id of the first."""
    async with connect(url) as client:
        first = await client.publish(TOPIC, PAYLOAD)
        for _ in range(MESSAGES - 1):
            await client.publish(TOPIC, PAYLOAD)
    return first


def _utf8(frame: bytes | str) -> bytes:
    return frame.encode() if isinstance(frame, str) else frame


async def _ended(broker: RunningBroker, within: float = 5.0) -> bool:
    """Whether every session and connection ended within `within` seconds."""
    try:
        await wait_until(lambda: not broker.broker.sessions
                         and not broker.listener.open_connections, within)
    except trio.TooSlowError:
        return False
    return True


async def test_a_client_reset_while_its_replay_waits_for_room_ends_its_session() -> None:
    """A resuming client that resets TCP while its replay waits for outbox room: its session
    ends and its connection is closed (it used to wait for room forever, holding both)."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        assert await _ended(broker)
        attacker = await ProtocolSession.open(broker.listener.port)
        await attacker.send(Subscribe(id=1, filter=TOPIC, since=first))
        await trio.sleep(0.5)  # the replay fills the socket buffers, and waits for room
        attacker.ws.reset()
        assert await _ended(broker), (len(broker.broker.sessions),
                                      broker.listener.open_connections)
        # Gone without a close frame (1006), not counted as a slow consumer.
        assert broker.broker.counters["sessions_closed_other"] == 1


async def test_a_client_that_stops_reading_during_its_replay_is_let_go() -> None:
    """A resuming client that never reads its replay (and sends nothing more) is not held for
    ever: once its replay has found no room for `idle_timeout`, it is let go with 4008, like
    any consumer too slow for its outbox (its session used to count as busy, never idle)."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5, idle_timeout=1.0,
                                        ping_interval=0.5, shutdown_grace=0.5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        assert await _ended(broker)
        attacker = await ProtocolSession.open(broker.listener.port)
        try:
            await attacker.send(Subscribe(id=1, filter=TOPIC, since=first))
            assert await _ended(broker, within=5.0), (broker.broker.counters)
            assert broker.broker.counters["sessions_closed_slow_consumer"] == 1
        finally:
            attacker.close()


async def test_live_messages_overflowing_a_replay_close_the_session_under_drop_oldest() -> None:
    """docs/protocol.md: the live messages held back while a subscription replays are bounded
    by outbox_messages, and overflowing that bound closes the session with 4008 under either
    policy. Under drop_oldest the broker used to drop the newest live messages instead (a
    `dropped` amid the replay), though they were in history: a resume would have lost none."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5, slow_consumer="drop_oldest",
                                        shutdown_grace=0.5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        attacker = await ProtocolSession.open(broker.listener.port)
        try:
            await attacker.send(Subscribe(id=1, filter=TOPIC, since=first))
            await trio.sleep(0.3)  # the replay waits for room
            async with connect(broker.url) as client:
                for n in range(20):
                    await client.publish(TOPIC, n)
            await wait_until(
                lambda: broker.broker.counters["sessions_closed_slow_consumer"] == 1, 5)
        finally:
            attacker.close()


async def test_shutdown_during_a_replay_to_a_client_that_reads_nothing_is_bounded() -> None:
    """Shutdown while a replay waits for room, its client reading nothing: every session ends
    within the grace period (held up: the replay stops when the session is closed)."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5, shutdown_grace=0.5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        attacker = await ProtocolSession.open(broker.listener.port)
        try:
            await attacker.send(Subscribe(id=1, filter=TOPIC, since=first))
            await trio.sleep(0.3)
            with trio.fail_after(3):
                await broker.listener.shutdown()
            assert await _ended(broker, within=2.0)
        finally:
            attacker.close()


async def test_handshakes_that_never_finish_free_their_slots_at_hello_timeout() -> None:
    """max_connections taken by connections that never finish their handshake (silent, or
    upgraded with no hello): a newcomer gets 503 meanwhile, and is served once hello_timeout
    has let them go (held up)."""
    config = Config(server=ServerConfig(port=0, max_connections=2, hello_timeout=0.5))
    async with running_broker(config) as broker:
        port = broker.listener.port
        silent = await RawWebSocket.open_tcp(port)
        upgraded = await RawWebSocket.open_tcp(port)
        try:
            assert await upgraded.handshake() == 101
            refused = await RawWebSocket.open_tcp(port)
            assert await refused.handshake() == 503
            refused.close()
            await trio.sleep(1.0)
            session = await ProtocolSession.open(port)
            session.close()
        finally:
            silent.close()
            upgraded.close()


async def test_a_json_client_reset_mid_replay_ends_its_session() -> None:
    """The reset-mid-replay case for a JSON session (the payloads go out as $base64)."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        assert await _ended(broker)
        ws = await RawWebSocket.open_tcp(broker.listener.port)
        assert await ws.handshake() == 101
        attacker = ProtocolSession(ws, ClientConnection(Format.JSON))
        await ws.send_frame(TEXT, _utf8(attacker.connection.hello("json")))
        assert (await ws.read_frame()).opcode == TEXT  # the welcome
        await ws.send_frame(TEXT, _utf8(attacker.connection.encode_batch(
            [Subscribe(id=1, filter=TOPIC, since=first)])))
        await trio.sleep(0.5)
        ws.reset()
        assert await _ended(broker)


async def test_live_messages_held_during_a_replay_are_bounded_in_bytes() -> None:
    """The live messages held back while a subscription replays count against outbox_bytes,
    not only outbox_messages: 100 held messages of 60 KB (6 MB) under a 1 MiB outbox close the
    session with 4008 (it held them all: a few large publishes per replaying session, and a
    client reading just often enough, could hold gigabytes)."""
    config = Config(server=ServerConfig(port=0, outbox_bytes=1024 * 1024,
                                        shutdown_grace=0.5))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        attacker = await ProtocolSession.open(broker.listener.port)
        try:
            await attacker.send(Subscribe(id=1, filter=TOPIC, since=first))
            await trio.sleep(0.3)  # the replay waits for room
            async with connect(broker.url) as client:
                for _ in range(100):
                    await client.publish(TOPIC, PAYLOAD)
            await wait_until(
                lambda: broker.broker.counters["sessions_closed_slow_consumer"] == 1, 5)
        finally:
            attacker.close()


async def test_a_replay_of_large_messages_fills_the_outbox_by_bytes_and_goes_on() -> None:
    """A replay whose messages fill outbox_bytes before outbox_messages: it waits for room and
    delivers every message (it stopped at the first message that did not fit, silently: the
    outbox was marked overflowed, the session stayed open, and the rest never came)."""
    config = Config(server=ServerConfig(port=0, outbox_bytes=1024 * 1024))
    async with running_broker(config) as broker:
        first = await _recorded(broker.url)
        reader = await ProtocolSession.open(broker.listener.port)
        try:
            await reader.send(Subscribe(id=1, filter=TOPIC, since=first))
            deliveries = 0
            while deliveries < MESSAGES - 1:
                if isinstance(await reader.next_event(), Delivery):
                    deliveries += 1
        finally:
            reader.close()


async def test_sigterm_during_a_flood_and_a_replay_exits_0_within_the_grace() -> None:
    """SIGTERM while one client floods publishes and another's replay waits for room (it
    reads nothing): the daemon exits 0, within its grace periods (held up)."""
    async with running_daemon() as daemon:
        first = await _recorded(daemon.url)
        replaying = await ProtocolSession.open(daemon.port)
        flooder = await ProtocolSession.open(daemon.port)
        frame = batch([Publish(topic="flood/x", payload=b"x" * 100)] * 1000)

        async def flood() -> None:
            with contextlib.suppress(ConnectionEnded, OSError):
                while True:
                    await flooder.ws.send_frame(BINARY, frame)

        try:
            await replaying.send(Subscribe(id=1, filter=TOPIC, since=first))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.sleep(1.0)
                daemon.process.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    assert await daemon.process.wait() == 0
                nursery.cancel_scope.cancel()
        finally:
            replaying.close()
            flooder.close()


async def test_a_hello_during_shutdown_is_closed_with_1001_without_holding_the_shutdown() -> None:
    """A connection upgraded before shutdown whose hello arrives while sessions are closing:
    it gets 1001 like every session, and the shutdown does not wait its grace for it."""
    config = Config(server=ServerConfig(port=0, shutdown_grace=3.0))
    async with running_broker(config) as broker:
        port = broker.listener.port
        staying = await ProtocolSession.open(port)  # keeps the shutdown waiting a moment
        late = await RawWebSocket.open_tcp(port)
        try:
            assert await late.handshake() == 101
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def shut() -> None:
                    await broker.listener.shutdown()
                    done.set()

                nursery.start_soon(shut)
                await trio.sleep(0.05)
                await late.send_frame(BINARY, ClientConnection(Format.MSGPACK).hello("late"))
                # The staying session reads its close and answers it.
                assert (await staying.ws.read_close()).close_code == 1001
                await staying.ws.send_frame(CLOSE, (1001).to_bytes(2, "big"))
                staying.close()
                frames = await late.read_until_end(within=2.0)
                closes = [f.close_code for f in frames if f.opcode == CLOSE]
                assert closes == [1001], closes
                with trio.fail_after(1.0):
                    await done.wait()
        finally:
            staying.close()
            late.close()
