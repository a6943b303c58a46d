"""Hostile clients against the real server (issue 7): no client can stop the broker, every
session stays bounded, and a healthy session beside the attacker never notices.

Each test runs a `Monitor` beside the attack: a session subscribed to `monitor/#`, fed a steady
trickle of numbered messages by a second session; every message must arrive, in order, and the
monitor's session must stay open. The attackers are raw sockets (tests/rawws.py), so that they
can do what no WebSocket library would: reset TCP at any point, ping after the close, never
read, send broken frames.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import attrs
import msgpack
import pytest
import trio
import trio.lowlevel

from mqbroker.protocol import (
    ClientConnection,
    CloseCode,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Publish,
)
from mqbroker.server.session import Session
from tests.daemon import running_daemon
from tests.harness import RunningBroker, broker_config, running_broker
from tests.monitor import monitored, wait_until
from tests.rawws import (
    BINARY,
    CONTINUATION,
    PING,
    TEXT,
    ConnectionEnded,
    ProtocolSession,
    RawWebSocket,
    batch,
    encode_frame,
    upgrade_request,
)


async def still_serving(port: int) -> None:
    """A new session opens and gets a round trip: the listener is still there."""
    session = await ProtocolSession.open(port, "newcomer")
    try:
        await session.send(Ping(id=7))
        assert await session.next_event() == Pong(id=7)
    finally:
        session.close()


async def wait_connections(broker: RunningBroker, count: int) -> None:
    """Wait until the listener holds exactly `count` connections (the attackers' are gone)."""
    await wait_until(lambda: broker.listener.open_connections == count)


# --- (1) TCP resets, and running out of file descriptors -----------------------------------


async def test_reset_right_after_the_upgrade_does_not_stop_the_broker() -> None:
    """Issue 7 case 1: 10 rounds of 10 connections reset (SO_LINGER 0) as soon as the 101
    arrives. The old listener asked the reset socket for its peer address outside its crash
    guard and died of ENOTCONN."""
    async with running_broker() as broker, monitored(broker.listener.port):
        port = broker.listener.port
        for _ in range(10):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(_reset_after_101, port)
            await still_serving(port)
        await wait_connections(broker, 2)


async def _reset_after_101(port: int) -> None:
    ws = await RawWebSocket.open_tcp(port)
    assert await ws.handshake() == 101
    ws.reset()


async def test_reset_mid_handshake_and_mid_frame() -> None:
    """Resets at every other point: in the middle of the HTTP request, right after the hello
    (before the welcome is read), in the middle of a frame's header and of its payload."""
    async with running_broker() as broker, monitored(broker.listener.port):
        port = broker.listener.port
        request = upgrade_request()
        hello = encode_frame(BINARY, ClientConnection().hello("x"))
        publish = encode_frame(BINARY, batch([Publish(topic="monitor/x", payload=b"y" * 1000)]))
        cuts = [
            request[:20],                    # mid request line... and mid fields
            request[:-2],                    # all but the final CRLF
            request + hello,                 # the hello sent, the welcome never read
            request + hello + publish[:1],   # mid frame header
            request + hello + publish[:8],   # header, part of the mask
            request + hello + publish[:500], # mid payload
        ]
        for _ in range(10):
            for data in cuts:
                ws = await RawWebSocket.open_tcp(port)
                await ws.send(data)
                await trio.sleep(0.001)  # let the broker take some of it before the reset
                ws.reset()
            await still_serving(port)
        await wait_connections(broker, 2)


def _low_fd_limit(limit: int) -> None:
    """In the broker's child process, before exec: a soft file-descriptor limit of `limit`."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


async def test_out_of_file_descriptors_is_logged_once_and_survived(tmp_path: Path) -> None:
    """Issue 7 case 1, without an attacker: past the process's file-descriptor limit, accept
    fails with EMFILE. The broker logs it once for the burst, keeps serving its sessions, and
    accepts again once connections close. Resets of connections waiting in the backlog (the
    old broker's death) change nothing."""
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhello_timeout = 60.0\n[log]\nformat = "json"\n')
    limit = 64
    async with running_daemon(config, preexec_fn=lambda: _low_fd_limit(limit)) as daemon, \
            monitored(daemon.port):
        idle = [await RawWebSocket.open_tcp(daemon.port) for _ in range(limit + 20)]
        await wait_until(lambda: bool(_events(daemon.lines, "server.accept_failed")))
        # Aborted handshakes while out of descriptors: some reset in the backlog, some after
        # sending part of a request.
        for ws in idle[-10:]:
            await ws.send(upgrade_request()[:30])
            ws.reset()
        await trio.sleep(0.5)
        assert daemon.process.returncode is None, [line.get("raw") for line in daemon.lines]
        for ws in idle[:-10]:
            ws.close()
        await wait_until(lambda: bool(_events(daemon.lines, "server.accepting_again")))
        await still_serving(daemon.port)
        assert len(_events(daemon.lines, "server.accept_failed")) == 1
        failed = _events(daemon.lines, "server.accept_failed")[0]
        assert "open files" in failed["error"].lower(), failed
    assert not _events(daemon.lines, "session.crashed")
    assert not [line for line in daemon.lines if "raw" in line], "not a log line: a traceback?"


def _events(lines: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [line for line in lines if line.get("event") == name]


# --- (2) Pings after the broker's close ----------------------------------------------------


async def _ping_after_close(ws: RawWebSocket, code: int) -> None:
    """Read up to the broker's close frame (with `code`), then ping it for a while: nothing may
    be answered, and the broker ends TCP without a reset."""
    close = await ws.read_close()
    assert close.close_code == code
    try:
        with trio.move_on_after(3.5):  # the old broker died 2.5 to 7 s after the close
            for n in range(35):
                await ws.send_frame(PING, b"after close %d" % n)
                await trio.sleep(0.1)
    except ConnectionEnded:
        pass  # the broker gave up on us (after shutdown_grace): fine, it did not answer
    frames = await ws.read_until_end()
    assert frames == [], "the broker answered after its close frame"


async def test_pings_after_the_close_are_not_answered_and_harm_nothing() -> None:
    """Issue 7 case 2: after a refused hello, a hello timeout and an idle timeout, a client
    keeps pinging. The old server answered in LOCAL_CLOSING and wsproto's LocalProtocolError
    ended the process (trio-websocket issue #184)."""
    config = broker_config(hello_timeout=0.5, idle_timeout=1.0, ping_interval=0.3,
                           shutdown_grace=3.0)
    async with running_broker(config) as broker, monitored(broker.listener.port):
        port = broker.listener.port

        async def refused_hello() -> None:
            ws = await RawWebSocket.open_tcp(port)
            assert await ws.handshake() == 101
            await ws.send_frame(BINARY, batch([Ping(id=1)]))  # not a hello
            await _ping_after_close(ws, CloseCode.HANDSHAKE_FAILED)
            ws.close()

        async def hello_timeout() -> None:
            ws = await RawWebSocket.open_tcp(port)
            assert await ws.handshake() == 101
            await _ping_after_close(ws, CloseCode.HANDSHAKE_FAILED)
            ws.close()

        async def idle_timeout() -> None:
            session = await ProtocolSession.open(port, "idle")
            await _ping_after_close(session.ws, CloseCode.IDLE_TIMEOUT)
            session.close()

        async with trio.open_nursery() as nursery:
            for attack in (refused_hello, hello_timeout, idle_timeout) * 3:
                nursery.start_soon(attack)
        await still_serving(port)
        await wait_connections(broker, 2)


# --- (3) A client that never reads -------------------------------------------------------------


def _attacker(broker: RunningBroker) -> Session | None:
    for session in broker.broker.sessions:
        if session.protocol.client == "attacker":
            return session
    return None


@attrs.define
class Peak:
    """The most the attacker's session held at once, sampled as the attack runs."""

    outbox_messages: int = 0
    outbox_bytes: int = 0
    pending_bytes: int = 0
    rss_bytes: int = 0

    async def watch(self, broker: RunningBroker) -> None:
        while True:
            self.rss_bytes = max(self.rss_bytes, _rss_bytes())
            session = _attacker(broker)
            if session is not None:
                self.outbox_messages = max(self.outbox_messages, len(session.outbox))
                self.outbox_bytes = max(self.outbox_bytes, session.outbox._bytes)
                self.pending_bytes = max(self.pending_bytes, session.connection.pending)
            await trio.lowlevel.checkpoint()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _never_reading(port: int, frame: bytes, total_bytes: int, *, hello: bool = True
                         ) -> int:
    """Open a session (or only the WebSocket), then send `frame` over and over, reading
    nothing, with a small receive buffer so that what the broker answers piles up on its side.
    The bytes it sent."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    ws = RawWebSocket(sock)
    assert await ws.handshake() == 101
    if hello:
        await ws.send_frame(BINARY, ClientConnection().hello("attacker"))
    sent = 0
    try:
        with trio.move_on_after(20):
            for _ in range(total_bytes // len(frame)):
                await ws.send(frame)
                sent += len(frame)
    except ConnectionEnded:
        pass  # closed as a slow consumer (and then cut off): what is expected
    finally:
        ws.close()
    return sent


async def _check_never_reading(frame: bytes, total_bytes: int, *, hello: bool = True,
                               let_go: bool = True) -> None:
    config = broker_config(outbox_messages=100, outbox_bytes=64 * 1024, shutdown_grace=1.0,
                           hello_timeout=20.0)
    server = config.server
    async with running_broker(config) as broker, monitored(broker.listener.port):
        rss_before = _rss_bytes()
        peak = Peak()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peak.watch, broker)
            await _never_reading(broker.listener.port, frame, total_bytes, hello=hello)
            nursery.cancel_scope.cancel()
        await wait_connections(broker, 2)
        # The attacker sent tens of MB; the broker kept none of it (loose: RSS is noisy).
        assert peak.rss_bytes - rss_before < 30 * 1024 * 1024, peak
        if not hello or not let_go:
            return  # no session yet, or nothing piled up: no 4008, bounded is what counts
        assert broker.broker.counters["sessions_closed_slow_consumer"] == 1, peak
        assert peak.outbox_messages <= server.outbox_messages
        assert peak.outbox_bytes <= server.outbox_bytes
        # Beyond the outbox, at most one frame is in the connection's hands.
        assert peak.pending_bytes <= server.outbox_bytes + server.max_frame_bytes, peak


async def test_never_reading_client_sending_invalid_items_is_let_go() -> None:
    """Issue 7 case 3: 1,000 invalid one-byte items per frame, never reading the errors: the
    errors count toward the outbox bounds and the session is closed with 4008."""
    await _check_never_reading(encode_frame(BINARY, msgpack.packb([5] * 1000)), 8 * 1024 * 1024)


async def test_never_reading_client_sending_pings_is_bounded() -> None:
    """Issue 7 case 3: WebSocket pings (125-byte payloads), never reading the pongs: the pongs
    are bounded like every other reply (past `outbox_bytes` waiting, the session is closed with
    4008). Only the latest ping of a read is answered, so 40 MB of pings in bursts cost a pong
    per read, which the socket's buffers hold: the session may well never get that far."""
    ping = encode_frame(PING, b"p" * 125)
    await _check_never_reading(ping * 100, 40 * 1024 * 1024, let_go=False)


async def test_never_reading_client_pinging_before_its_hello_is_bounded() -> None:
    """Issue 7 case 3, before the hello (within hello_timeout): the pongs stay bounded too."""
    ping = encode_frame(PING, b"p" * 125)
    await _check_never_reading(ping * 100, 60 * 1024 * 1024, hello=False)


async def test_never_reading_client_sending_protocol_pings_is_let_go() -> None:
    """Issue 7 case 3: protocol pings (each answered with a pong event), never read."""
    await _check_never_reading(encode_frame(BINARY, batch([Ping(id=n) for n in range(1000)])),
                               16 * 1024 * 1024)


async def test_a_message_in_one_byte_fragments_costs_its_size_not_fifty_times_it() -> None:
    """Issue 7 case 3: a binary message of almost max_frame_bytes (1 MiB) sent in one-byte
    fragments (7 MB on the wire) and never finished. The broker holds the message so far, and
    should hold it as bytes: kept as one object per fragment it took ~56 MB per connection."""
    async with running_broker() as broker, monitored(broker.listener.port):
        session = await ProtocolSession.open(broker.listener.port, "fragments")
        fragment = encode_frame(CONTINUATION, b"a", fin=False)
        chunk = fragment * 9000
        rss_before = _rss_bytes()
        peak = Peak()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peak.watch, broker)
            await session.ws.send(encode_frame(BINARY, b"a", fin=False))
            for _ in range(110):  # 990,000 bytes of the message: under max_frame_bytes
                await session.ws.send(chunk)
            await session.send(Ping(id=1))  # a new message before the end: refused (1002)
            close = await session.ws.read_close()
            nursery.cancel_scope.cancel()
        assert close.close_code == CloseCode.PROTOCOL_ERROR
        assert peak.rss_bytes - rss_before < 20 * 1024 * 1024, (peak.rss_bytes - rss_before)
        session.close()


#: What the never-reading clients must have sent while the healthy session was measured.
ATTACK_BYTES = 10 * 1024 * 1024

NEVER_READING = {
    "invalid items": encode_frame(BINARY, msgpack.packb([5] * 1000)),
    "pings": encode_frame(PING, b"p" * 125) * 100,
    "protocol pings": encode_frame(BINARY, batch([Ping(id=n) for n in range(1000)])),
}


async def _healthy_round_trips(port: int, seconds: float,
                               until: Callable[[], bool] = lambda: True,
                               longest: float = 20.0) -> list[float]:
    """Ping round trips of a healthy session, sorted: for `seconds`, and on until `until()`
    holds (the attack beside it has done what the test needs: on a loaded machine that takes
    longer), for `longest` at most."""
    healthy = await ProtocolSession.open(port, "healthy")
    round_trips: list[float] = []
    started = trio.current_time()
    with trio.move_on_after(longest):
        for n in range(1_000_000):
            start = trio.current_time()
            await healthy.send(Ping(id=n))
            assert await healthy.next_event() == Pong(id=n)
            round_trips.append(trio.current_time() - start)
            if start - started >= seconds and until():
                break
    healthy.close()
    return sorted(round_trips)


@pytest.mark.parametrize("kind", NEVER_READING)
async def test_never_reading_clients_do_not_starve_a_healthy_session(kind: str) -> None:
    """Issue 7 cases 3 and 4: five clients at a time that never read, each let go and replaced,
    beside a healthy session. A read of 64 KiB holds dozens of small frames of 1,000 items:
    handled without a checkpoint, one read held the loop for a quarter of a second."""
    config = broker_config(outbox_messages=1000, outbox_bytes=1024 * 1024, shutdown_grace=1.0)
    async with running_broker(config) as broker, monitored(broker.listener.port):
        port = broker.listener.port
        # 64 KiB per send, as a client in its own process sends them: the broker reads many
        # frames at once.
        frame = NEVER_READING[kind] * max(1, 65536 // len(NEVER_READING[kind]))

        sent = 0

        async def attacker() -> None:
            nonlocal sent
            while True:
                sent += await _never_reading(port, frame, 8 * 1024 * 1024)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(attacker)
            await trio.sleep(0.2)
            round_trips = await _healthy_round_trips(
                port, 3, until=lambda: sent >= ATTACK_BYTES)
            nursery.cancel_scope.cancel()
        assert sent >= ATTACK_BYTES, sent  # the attack ran
        assert len(round_trips) >= 100, (len(round_trips), round_trips[-5:])
        assert round_trips[-1] < 0.5, round_trips[-5:]


# --- (4) A flooding publisher ------------------------------------------------------------------


def flood_frames(max_frame_bytes: int) -> dict[str, bytes]:
    """1 MiB frames of publishes: tiny ones as many as fit (the issue's flood: tens of
    thousands of items, over the item cap), and 1,000 bigger ones (the most a frame may hold)."""
    tiny = Publish(topic="flood/a", payload=b"")
    count = max_frame_bytes // (len(batch([tiny, tiny])) - len(batch([tiny]))) - 10
    capped = Publish(topic="flood/a", payload=b"f" * (max_frame_bytes // 1000 - 40))
    frames = {"tiny": batch([tiny] * count), "capped": batch([capped] * 1000)}
    for frame in frames.values():
        assert max_frame_bytes // 2 < len(frame) <= max_frame_bytes
    return {name: encode_frame(BINARY, frame) for name, frame in frames.items()}


@pytest.mark.parametrize("kind", ["tiny", "capped"])
async def test_flooding_publisher_does_not_starve_a_healthy_session(kind: str) -> None:
    """Issue 7 case 4: a publisher sending 1 MiB frames of publishes as fast as it can, beside
    a session doing ping round trips. The healthy session keeps being served (a loose bound;
    the strict p99 is bench/chaos.py's). The old broker decoded a frame of tiny publishes for
    ~0.7 s at a time and let the healthy session do ~10 round trips a second."""
    async with running_broker() as broker, monitored(broker.listener.port):
        port = broker.listener.port
        frame = flood_frames(broker.listener.config.max_frame_bytes)[kind]
        flooder = await ProtocolSession.open(port, "flooder")
        healthy = await ProtocolSession.open(port, "healthy")
        round_trips: list[float] = []
        published_before = broker.broker.counters["published"]
        refused = 0

        async def flood() -> None:
            while True:
                await flooder.ws.send(frame)

        async def drain() -> None:  # the flooder reads what it is answered (errors)
            nonlocal refused
            while True:
                refused += len(await flooder.receive())

        async def measure() -> None:
            for n in range(1_000_000):
                start = trio.current_time()
                await healthy.send(Ping(id=n))
                assert await healthy.next_event() == Pong(id=n)
                round_trips.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(drain)
            await trio.sleep(0.2)  # the flood under way first
            nursery.start_soon(measure)
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        flooder.close()
        healthy.close()
        flooded = broker.broker.counters["published"] - published_before
        round_trips.sort()
        assert len(round_trips) >= 500, (len(round_trips), round_trips[-5:])
        assert round_trips[-1] < 0.5, round_trips[-5:]
        # The flood flowed: frames of tiny publishes were each refused (over the item cap),
        # the capped ones published.
        assert (refused if kind == "tiny" else flooded // 1000) >= 5, (refused, flooded)


async def test_a_batch_over_max_frame_items_is_refused_with_one_error(
        broker: RunningBroker) -> None:
    """Issue 7 case 4: a batch of more than max_frame_items (1000) events is refused whole, with
    one bad_frame error, and the session carries on."""
    async with monitored(broker.listener.port):
        session = await ProtocolSession.open(broker.listener.port, "batcher")
        await session.send(*[Publish(topic="monitor/x", payload=b"no") for _ in range(1001)])
        await session.send(Ping(id=1))
        error = await session.next_event()
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_FRAME, error
        assert await session.next_event() == Pong(id=1)
        session.close()


# --- (5) Close frames on the wire for broken frames -------------------------------------------


BROKEN_FRAMES = {
    "invalid UTF-8 in a text frame": (encode_frame(TEXT, b'{"op":"ping","x":"\xff\xfe"}'), 1007),
    "ping over 125 bytes": (encode_frame(PING, b"p" * 126), 1002),
    "fragmented ping": (encode_frame(PING, b"p", fin=False), 1002),
    "unmasked frame": (encode_frame(BINARY, batch([Ping(id=1)]), mask=None), 1002),
    "reserved bits": (encode_frame(BINARY, batch([Ping(id=1)]), rsv=4), 1002),
    "continuation without a message": (encode_frame(CONTINUATION, b"x"), 1002),
    "over max_frame_bytes": (encode_frame(BINARY, b"x" * 65536, length=2 * 1024 * 1024), 1009),
}


async def _read_close_without_reset(ws: RawWebSocket, code: int, what: str) -> None:
    try:
        close = await ws.read_close()
    except ConnectionEnded as ended:
        raise AssertionError(f"{what}: {ended} before the close frame") from None
    assert close.close_code == code, (what, close)
    rest = await ws.read_until_end()
    assert rest == [] and not ws.reset_seen, (what, rest, ws.reset_seen)


async def test_broken_frames_get_their_close_code_on_the_wire() -> None:
    """Issue 7 case 5: every broken frame is answered with a close frame the client reads
    (1007, 1002 or 1009), then an orderly end of TCP; never a reset. 50 times each, before the
    hello and after it. The old server logged the right code and reset the connection."""
    async with running_broker() as broker, monitored(broker.listener.port):
        port = broker.listener.port
        for what, (frame, code) in BROKEN_FRAMES.items():
            for n in range(50):
                if n % 2:
                    session = await ProtocolSession.open(port, "breaker")
                    ws = session.ws
                else:
                    ws = await RawWebSocket.open_tcp(port)
                    assert await ws.handshake() == 101
                await ws.send(frame)
                await _read_close_without_reset(ws, code, what)
                ws.close()
        await still_serving(port)
        await wait_connections(broker, 2)


# --- max_connections -------------------------------------------------------------------------


async def test_past_max_connections_a_new_connection_gets_503() -> None:
    """The monitor's two sessions and one more fill max_connections (3): the next connection
    is answered 503 and closed; once one leaves, a new one is served again."""
    async with running_broker(broker_config(max_connections=3)) as broker, \
            monitored(broker.listener.port):
        port = broker.listener.port
        third = await ProtocolSession.open(port, "third")
        for _ in range(5):
            ws = await RawWebSocket.open_tcp(port)
            assert await ws.handshake() == 503
            ws.close()
        # Refused connections that reset, at once or part-way through their request.
        for cut in (0, 10, 40):
            ws = await RawWebSocket.open_tcp(port)
            await ws.send(upgrade_request()[:cut])
            ws.reset()
        await wait_connections(broker, 3)
        assert broker.broker.counters["connections_refused"] == 8
        third.close()
        await wait_connections(broker, 2)
        await still_serving(port)

