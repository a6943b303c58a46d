"""Per-frame CPU cost of the server's WebSocket layer, against the two candidates it replaced.

Run: python bench/bench_websocket.py [--rounds N] [--seconds S]

Side by side in one run, on the same frames: (a) mqbroker.protocol.websocket (ours),
(b) wsproto's `Connection` (what trio-websocket drives), (c) the Sans-I/O layer of the
`websockets` library (`ServerProtocol`, with its C speedup for masking; not a dependency of the
project: `pip install websockets` into the venv to include it). Each case is timed in rounds that
alternate the implementations, and the median round is reported, so that the noise of a shared
machine falls on all three alike.

Cases (client frames are masked, as clients must send them):
  parse 120 B     one masked 120-byte binary frame fed and its message taken
  send 150 B      one 150-byte binary frame serialized
  parse 64 KiB    a 64 KiB chunk of masked 120-byte frames (a full socket read), per frame
  parse 1 MiB     one masked 1 MiB binary frame, fed in 64 KiB chunks as reads deliver it
Then the heap one idle connection object holds (tracemalloc, 5,000 of them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import wsproto.events
from wsproto.connection import Connection, ConnectionType

from mqbroker.protocol.websocket import ServerWebSocket

try:
    from websockets.protocol import State
    from websockets.server import ServerProtocol
except ImportError:  # optional: the bench says so and runs the other two
    ServerProtocol = None  # type: ignore[assignment,misc]

MASK = b"\x37\xfa\x21\x3d"
CHUNK = 64 * 1024
BIG = 1 << 20
MAX_MESSAGE = 2 * BIG

#: A case: name -> (setup(impl) -> a callable doing one unit of work, frames per unit).
Work = Callable[[], object]


def masked_frame(payload: bytes) -> bytes:
    """A client's binary frame, built independently of the implementations measured."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
    key = (MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + MASK + masked


SMALL = masked_frame(bytes(range(120)))
OUTGOING = bytes(range(150))
MANY = SMALL * (CHUNK // len(SMALL))
MANY_FRAMES = CHUNK // len(SMALL)
LARGE = masked_frame(os.urandom(BIG))
LARGE_CHUNKS = [LARGE[i:i + CHUNK] for i in range(0, len(LARGE), CHUNK)]


# --- The three implementations, behind the same four operations ------------------------------


class Ours:
    name = "mqbroker"

    def __init__(self) -> None:
        self.ws = ServerWebSocket(MAX_MESSAGE)

    def parse(self, data: bytes) -> int:
        return len(self.ws.receive_data(data))

    def send(self, payload: bytes) -> bytes:
        return self.ws.send(payload)


class WsProto:
    name = "wsproto"

    def __init__(self) -> None:
        self.connection = Connection(ConnectionType.SERVER)

    def parse(self, data: bytes) -> int:
        self.connection.receive_data(data)
        return sum(1 for event in self.connection.events()
                   if isinstance(event, wsproto.events.Message) and event.message_finished)

    def send(self, payload: bytes) -> bytes:
        return self.connection.send(wsproto.events.BytesMessage(payload))


class WebSockets:
    name = "websockets"

    def __init__(self) -> None:
        assert ServerProtocol is not None
        self.protocol = ServerProtocol(state=State.OPEN, max_size=MAX_MESSAGE)

    def parse(self, data: bytes) -> int:
        self.protocol.receive_data(data)
        return len(self.protocol.events_received())

    def send(self, payload: bytes) -> bytes:
        self.protocol.send_binary(payload)
        return b"".join(self.protocol.data_to_send())


Impl = type[Ours] | type[WsProto] | type[WebSockets]


def case_parse_small(impl: Impl) -> tuple[Work, int]:
    instance = impl()
    return lambda: instance.parse(SMALL), 1


def case_send(impl: Impl) -> tuple[Work, int]:
    instance = impl()
    return lambda: instance.send(OUTGOING), 1


def case_parse_many(impl: Impl) -> tuple[Work, int]:
    instance = impl()
    return lambda: instance.parse(MANY), MANY_FRAMES


def case_parse_large(impl: Impl) -> tuple[Work, int]:
    instance = impl()

    def work() -> int:
        received = 0
        for chunk in LARGE_CHUNKS:
            received += instance.parse(chunk)
        return received
    return work, 1


CASES: dict[str, Callable[[Impl], tuple[Work, int]]] = {
    "parse 120 B": case_parse_small,
    "send 150 B": case_send,
    "parse 64 KiB": case_parse_many,
    "parse 1 MiB": case_parse_large,
}


def check(impls: list[Impl]) -> None:
    """Every implementation gets the same messages out of the same bytes (else the race is void)."""
    for impl in impls:
        instance = impl()
        assert instance.parse(SMALL) == 1, impl.name
        assert instance.parse(MANY) == MANY_FRAMES, impl.name
        assert sum(instance.parse(chunk) for chunk in LARGE_CHUNKS) == 1, impl.name
        assert instance.send(OUTGOING) == b"\x82\x7e\x00\x96" + OUTGOING, impl.name


def time_one(work: Work, seconds: float) -> tuple[float, int]:
    """CPU seconds per unit of work, calling it for about `seconds` of CPU. Process CPU time,
    not wall time: on a shared machine, time spent descheduled is not the code's cost."""
    units = 0
    start = time.process_time()
    deadline = start + seconds
    while True:
        for _ in range(10):
            work()
        units += 10
        now = time.process_time()
        if now >= deadline:
            return (now - start) / units, units


def idle_bytes(impl: Impl, count: int = 5000) -> float:
    """Heap bytes per idle connection object, fresh after its handshake."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [impl() for _ in range(count)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / count


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    parser.add_argument("--seconds", type=float, default=0.3, help="time per case per round")
    args = parser.parse_args(argv)

    impls: list[Impl] = [Ours, WsProto]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    versions = f"wsproto {metadata.version('wsproto')}"
    if ServerProtocol is None:
        print("websockets: NOT INSTALLED, skipped (pip install websockets into the venv to "
              "include it)")
    else:
        impls.append(WebSockets)
        from websockets import speedups  # noqa: F401  (the C masking; the line above says so)
        versions += f", websockets {metadata.version('websockets')} (C speedups loaded)"
    print(versions)
    check(impls)
    print(f"{args.rounds} interleaved rounds of {args.seconds} s per case; median round; "
          "microseconds of process CPU per frame\n")

    header = f"{'case':<14}" + "".join(f"{impl.name:>12}" for impl in impls)
    header += "".join(f"{impl.name + '/ours':>18}" for impl in impls[1:])
    print(header)
    for case, setup in CASES.items():
        rounds: dict[str, list[float]] = {impl.name: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                work, frames = setup(impl)
                per_unit, _ = time_one(work, args.seconds)
                rounds[impl.name].append(per_unit / frames * 1e6)
        medians = {name: statistics.median(values) for name, values in rounds.items()}
        ours = medians[Ours.name]
        line = f"{case:<14}" + "".join(f"{medians[impl.name]:>12.2f}" for impl in impls)
        line += "".join(f"{medians[impl.name] / ours:>17.1f}x" for impl in impls[1:])
        print(line, flush=True)
    sizes = {impl.name: idle_bytes(impl) for impl in impls}
    line = f"{'idle bytes':<14}" + "".join(f"{sizes[impl.name]:>12.0f}" for impl in impls)
    line += "".join(f"{sizes[impl.name] / sizes[Ours.name]:>17.1f}x" for impl in impls[1:])
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
