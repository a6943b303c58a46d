"""A hypothesis-driven hostile client against ONE running broker (issue 7).

Random byte streams, random handshakes, random frames (any opcode, flags, masking, announced
length) and random events are thrown at a single broker, one connection per example, each
ended by a close, a TCP reset or a read. Meanwhile the broker's monitor session (tests/
monitor.py) checks its own stream. The process must survive with the monitor intact and
every attacker's connection gone.

Hypothesis runs each example synchronously, so the broker and its monitor run in a thread of
their own (their own trio loop); the attacker uses plain blocking sockets.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqbroker.config import Config
from mqbroker.protocol import (
    ClientConnection,
    Forget,
    Format,
    Hello,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
)
from mqbroker.protocol.codec import encode
from tests.harness import RunningBroker, broker_config, running_broker
from tests.monitor import monitored, wait_until
from tests.rawws import BINARY, TEXT, encode_frame, upgrade_request


class BrokerThread:
    """A broker and its monitor in a thread's own trio loop, until `stop`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.running: RunningBroker | None = None
        #: The broker's counters as the attack ended.
        self.counters: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(15), "the broker did not start"
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # reported by stop(), in the test's thread
            self.error = error
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with running_broker(self.config) as running, monitored(running.listener.port):
            self.running = running
            self.port = running.listener.port
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()
            self.counters = dict(running.broker.counters)
            # Every attacker's connection ends (a close, a reset, or a timeout of ours).
            await wait_until(lambda: running.listener.open_connections == 2, 15)

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        """Stop the broker, which checks its monitor on the way out; raise what went wrong."""
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the broker did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def broker_thread() -> Iterator[BrokerThread]:
    thread = BrokerThread(broker_config(hello_timeout=1.0, idle_timeout=2.0, ping_interval=0.5,
                                        shutdown_grace=1.0, max_frame_bytes=64 * 1024))
    thread.start()
    yield thread
    thread.stop()


# --- What the hostile client sends ------------------------------------------------------------

# Topics stay clear of the monitor's `monitor/#`: the monitor must see only its own messages.
topics = st.one_of(st.text(max_size=20).map(lambda t: "fuzz/" + t),
                   st.sampled_from(["", "/", "#", "+", "a/#/b", "fuzz/+", "\x00", "a" * 2000]))
ids = st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70))
payloads = st.one_of(st.none(), st.binary(max_size=100), st.text(max_size=50), st.integers())

events = st.one_of(
    st.builds(Publish, topic=topics, payload=payloads, id=ids,
              msg_id=st.one_of(st.none(), st.text(max_size=10))),
    st.builds(Subscribe, id=ids, filter=topics,
              since=st.one_of(st.none(), st.text(max_size=30))),
    st.builds(Unsubscribe, id=ids),
    st.builds(Forget, id=ids, filter=topics),
    st.builds(Ping, id=ids),
    st.builds(Hello, version=st.integers(-2, 3), client=st.text(max_size=10)),
)
#: Anything msgpack can carry, as an item of a batch or a whole frame.
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
              st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.text(max_size=8),
                                                      st.sampled_from(["op", "id", "topic"])),
                                            inner, max_size=5)),
    max_leaves=20,
)


def _event_bytes(event: Any, fmt: Format) -> bytes:
    try:
        frame = encode(event, fmt)
    except Exception:  # values the encoder refuses (ids beyond 64 bits...): send junk instead
        return msgpack.packb([1, 2, 3])
    return frame.encode("utf-8") if isinstance(frame, str) else frame


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    """A frame carrying events: valid ones, a batch, or junk; binary or text."""
    fmt = draw(st.sampled_from(Format))
    kind = draw(st.sampled_from(["event", "batch", "junk"]))
    if kind == "event":
        payload = _event_bytes(draw(events), fmt)
    elif kind == "batch":
        items = [_event_bytes(e, Format.MSGPACK) for e in draw(st.lists(events, max_size=30))]
        payload = struct.pack("!BH", 0xDC, len(items)) + b"".join(items)
        fmt = Format.MSGPACK
    else:
        payload = msgpack.packb(draw(junk), use_bin_type=True)
    return encode_frame(TEXT if fmt is Format.JSON else BINARY, payload)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """Any frame at all: opcode, FIN, RSV bits, masking and announced length all free."""
    payload = draw(st.binary(max_size=300))
    length = draw(st.one_of(st.none(), st.sampled_from([0, 125, 126, 127, 65535, 65536,
                                                        2**31, 2**63 - 1, 2**64 - 1])))
    return encode_frame(
        draw(st.integers(0, 15)), payload, fin=draw(st.booleans()), rsv=draw(st.integers(0, 7)),
        mask=draw(st.one_of(st.just(b"\x01\x02\x03\x04"), st.binary(min_size=4, max_size=4),
                            st.none())),
        length=length)


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    """A valid upgrade request, or one mangled: cut, with bytes inserted, fields replaced."""
    request = upgrade_request(draw(st.sampled_from(["/", "/x?y=z", "*", "//" * 100])))
    # Mostly valid: most of the attack is in what follows the handshake.
    how = draw(st.sampled_from(["valid"] * 6 + ["cut", "insert", "fields", "garbage"]))
    if how == "cut":
        return request[:draw(st.integers(0, len(request)))]
    if how == "insert":
        at = draw(st.integers(0, len(request)))
        return request[:at] + draw(st.binary(max_size=50)) + request[at:]
    if how == "fields":
        fields = draw(st.lists(st.tuples(st.text(max_size=15), st.text(max_size=30)),
                               max_size=5))
        extra = "".join(f"{name}: {value}\r\n" for name, value in fields)
        return request[:-2] + extra.encode("utf-8") + b"\r\n"
    if how == "garbage":
        return draw(st.binary(max_size=3000))
    return request


@st.composite
def attacks(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """The chunks one connection sends, and how it ends."""
    opening = draw(handshakes())
    hello = encode_frame(BINARY, ClientConnection().hello("fuzz"))
    chunks = [opening]
    if draw(st.integers(0, 3)):
        chunks.append(hello)
    chunks += draw(st.lists(st.one_of(data_frames(), raw_frames(), st.binary(max_size=200)),
                            max_size=8))
    # Sometimes the whole stream in one write, sometimes split at random points.
    if draw(st.booleans()):
        stream = b"".join(chunks)
        cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=4)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return chunks, draw(st.sampled_from(["close", "reset", "read"]))


def _attack(port: int, chunks: list[bytes], ending: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        for chunk in chunks:
            if chunk:
                sock.sendall(chunk)
        if ending == "read":
            sock.settimeout(0.05)
            while sock.recv(65536):
                pass
    except OSError:
        pass  # the broker closed on us (or we timed out reading): it is allowed to
    finally:
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(attack=attacks())
def test_random_hostile_clients_do_not_hurt_the_broker_or_its_monitor(
        broker_thread: BrokerThread, attack: tuple[list[bytes], str]) -> None:
    """Whatever one connection sends, and however it ends, the broker keeps running (its
    monitor checked when the module's broker stops) and keeps accepting."""
    assert broker_thread.alive(), broker_thread.error
    chunks, ending = attack
    _attack(broker_thread.port, chunks, ending)
    assert broker_thread.alive(), broker_thread.error


def test_after_the_fuzzing_a_new_session_is_served(broker_thread: BrokerThread) -> None:
    """Runs after the random clients (file order): the same broker still opens a session."""
    client = ClientConnection()
    with socket.create_connection(("127.0.0.1", broker_thread.port), timeout=5) as sock:
        sock.sendall(upgrade_request() + encode_frame(BINARY, client.hello("after")))
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 6:
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 101 ")
    assert broker_thread.alive(), broker_thread.error
    broker_thread.stop()  # checks the monitor and that every attacker's connection ended
    counters = broker_thread.counters
    assert counters["sessions_closed_internal_error"] == 0, counters  # no session crashed
    assert counters["sessions_opened"] >= 20, counters  # the attack reached open sessions
