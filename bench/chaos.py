"""Chaos run: the hostile clients of issue 7 thrown at one broker process for some minutes.

    python bench/chaos.py MINUTES [--seed N]

The broker runs as its own process (`python -m mqbroker serve`, loopback only), and so do the
attackers (this script with --attack), so that neither's CPU shows in the other's figures; this
process runs, beside them, only what is measured:

- the monitor (tests/monitor.py): a session fed a numbered trickle, every message of which must
  arrive in order;
- a healthy session doing ping/pong round trips, paced at 100 a second, whose round-trip times
  are kept apart while a flood runs (the issue's case 4: target p99 < 20 ms);
- attackers, a few at a time, cycling through the issue's patterns: TCP resets right after the
  101, mid-handshake and mid-frame (case 1); pings after the broker's close, for a refused hello,
  a hello timeout and an idle timeout (case 2); never-reading clients sending invalid items or
  pings (case 3); broken frames that must get their close code on the wire (case 5); random
  handshakes, frames and bytes; and every FLOOD_EVERY seconds, while the other attacks pause,
  a flooding publisher sending 1 MiB frames of publishes as fast as it can for FLOOD_FOR
  seconds (case 4), frames of tiny publishes (over the item cap) and of 1,000 publishes in turn.

Bounded in time (MINUTES) and in count (at most ATTACKERS connections at once). At the end it
prints the counts: connections tried, broker restarts (the PID must be the same and alive),
monitor messages lost, peak RSS of the broker, close frames missing, and the healthy session's
round trips under the flood and outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the raw client and the monitor live with the tests

from mqbroker.protocol import ClientConnection, Ping, Pong, Publish  # noqa: E402
from tests.monitor import monitored  # noqa: E402
from tests.rawws import (  # noqa: E402
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

#: Most attacking connections at once (the flooder and the slow attacks included).
ATTACKERS = 20
CONFIG = """\
[server]
hello_timeout = 2.0
idle_timeout = 3.0
ping_interval = 1.0
shutdown_grace = 1.0
outbox_messages = 1000
outbox_bytes = 1048576
max_connections = 1000
[log]
level = "warning"
format = "json"
"""
FLOOD_EVERY = 15.0  # seconds between floods
FLOOD_FOR = 5.0  # seconds each flood lasts


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Observer:
    """What this process measures: the broker's life and RSS, the healthy session's round
    trips (told apart by whether the attackers say a flood is on)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        #: The kind of flood on ("tiny" or "capped"), None when there is none.
        self.flooding: str | None = None
        self.rtt: dict[str | None, list[float]] = {None: [], "tiny": [], "capped": [],
                                                   "changing": []}
        self.dead = False

    async def watch(self, process: subprocess.Popen[bytes]) -> None:
        while True:
            if process.poll() is not None:
                self.dead = True
                print(f"BROKER DIED (exit {process.returncode})", flush=True)
                return
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            await trio.sleep(0.2)

    async def healthy(self, port: int) -> None:
        session = await ProtocolSession.open(port, "healthy")
        n = 0
        while True:
            start = time.perf_counter()
            flooding = self.flooding
            await session.send(Ping(id=n))
            event = await session.next_event()
            assert event == Pong(id=n), event
            self.rtt[flooding if flooding == self.flooding else "changing"
                     ].append(time.perf_counter() - start)
            n += 1
            await trio.sleep(max(0.0, 0.01 - (time.perf_counter() - start)))

    async def listen(self, stream: trio.abc.ReceiveStream, report: dict[str, Any]) -> None:
        """The attackers' lines: flood on/off, and their counts (JSON) at the end."""
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"flood on "):
                    self.flooding = line.split()[-1].decode()
                elif line == b"flood off":
                    self.flooding = None
                elif line.startswith(b"{"):
                    report.update(json.loads(line))


class Chaos:
    """The attackers (in their own process)."""

    def __init__(self, port: int, seed: int, only: str | None = None) -> None:
        self.port = port
        self.only = only
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.tried = 0
        self.limiter = trio.CapacityLimiter(ATTACKERS)
        self.calm = trio.Event()  # set while no flood runs: the other attacks go on
        self.calm.set()

    # --- the attacks ------------------------------------------------------------------------

    async def connect(self) -> RawWebSocket:
        self.tried += 1
        return await RawWebSocket.open_tcp(self.port)

    async def reset_after_101(self) -> None:
        ws = await self.connect()
        await ws.handshake()
        ws.reset()

    async def reset_midway(self) -> None:
        ws = await self.connect()
        stream = (upgrade_request() + encode_frame(BINARY, ClientConnection().hello("x"))
                  + encode_frame(BINARY, batch([Publish(topic="chaos", payload=b"y" * 500)])))
        await ws.send(stream[:self.random.randrange(1, len(stream))])
        await trio.sleep(0.001)
        ws.reset()

    async def ping_after_close(self) -> None:
        kind = self.random.choice(["refused", "hello_timeout", "idle_timeout"])
        ws = await self.connect()
        await ws.handshake()
        if kind == "refused":
            await ws.send_frame(BINARY, batch([Ping(id=1)]))
        elif kind == "idle_timeout":
            await ws.send_frame(BINARY, ClientConnection().hello("idle"))
        await ws.read_close(10)
        try:
            with trio.move_on_after(2):
                for n in range(20):
                    await ws.send_frame(PING, b"late %d" % n)
                    await trio.sleep(0.1)
        except ConnectionEnded:
            pass  # the broker closed TCP after its grace period: it did not answer, fine
        if await ws.read_until_end(5):
            self.counts["answered after close"] += 1
        ws.close()

    async def never_reading(self) -> None:
        ws = await self.connect()
        await ws.handshake()
        await ws.send_frame(BINARY, ClientConnection().hello("attacker"))
        if self.random.random() < 0.5:
            frame = encode_frame(BINARY, msgpack.packb([5] * 1000))  # invalid items
        else:
            frame = encode_frame(PING, b"p" * 125) * 100
        try:
            with trio.move_on_after(10):
                for _ in range(8 * 1024 * 1024 // len(frame)):
                    await ws.send(frame)
        except ConnectionEnded:
            self.counts["never_reading cut off"] += 1  # let go as a slow consumer
        ws.close()

    BROKEN: ClassVar[list[tuple[bytes, int]]] = [
        (encode_frame(TEXT, b'{"op":"ping","x":"\xff"}'), 1007),
        (encode_frame(PING, b"p" * 126), 1002),
        (encode_frame(PING, b"p", fin=False), 1002),
        (encode_frame(BINARY, b"\x80", mask=None), 1002),
        (encode_frame(BINARY, b"\x80", rsv=2), 1002),
        (encode_frame(CONTINUATION, b"x"), 1002),
        (encode_frame(BINARY, b"x" * 4096, length=2 * 1024 * 1024), 1009),
    ]

    async def broken_frame(self) -> None:
        frame, code = self.random.choice(self.BROKEN)
        ws = await self.connect()
        await ws.handshake()
        if self.random.random() < 0.5:
            await ws.send_frame(BINARY, ClientConnection().hello("breaker"))
        await ws.send(frame)
        try:
            close = await ws.read_close()
            if close.close_code != code:
                self.counts["wrong close code"] += 1
            await ws.read_until_end()
            if ws.reset_seen:
                self.counts["reset after close frame"] += 1
        except ConnectionEnded:
            self.counts["close frame missing"] += 1
        ws.close()

    async def random_bytes(self) -> None:
        ws = await self.connect()
        rnd = self.random
        stream = upgrade_request() if rnd.random() < 0.7 else b""
        for _ in range(rnd.randrange(1, 6)):
            choice = rnd.random()
            if choice < 0.3:
                stream += rnd.randbytes(rnd.randrange(0, 300))
            elif choice < 0.7:
                stream += encode_frame(rnd.randrange(16), rnd.randbytes(rnd.randrange(0, 200)),
                                       fin=rnd.random() < 0.8, rsv=rnd.randrange(8)
                                       if rnd.random() < 0.2 else 0)
            else:
                stream += encode_frame(BINARY, ClientConnection().hello("fuzz"))
        await ws.send(stream)
        if rnd.random() < 0.5:
            ws.reset()
        else:
            with trio.move_on_after(0.2):
                await ws.read_until_end(0.2)
            ws.close()

    async def flood(self) -> None:
        """Every FLOOD_EVERY seconds, FLOOD_FOR seconds of 1 MiB frames of publishes, tiny
        ones (over the item cap) and capped ones (1,000 a frame) in turn."""
        tiny = Publish(topic="flood/a", payload=b"")
        tiny_count = 1024 * 1024 // (len(batch([tiny, tiny])) - len(batch([tiny]))) - 10
        capped = Publish(topic="flood/a", payload=b"f" * 1000)
        frames = [("tiny", encode_frame(BINARY, batch([tiny] * tiny_count))),
                  ("capped", encode_frame(BINARY, batch([capped] * 1000)))]
        turn = 0
        while True:
            await trio.sleep(FLOOD_EVERY - FLOOD_FOR)
            kind, frame = frames[turn % 2]
            turn += 1
            self.tried += 1
            # Said before the flood starts and after its tail has gone through (the broker
            # still reads what its socket holds), so that no round trip during the flood is
            # counted as outside it.
            self.calm = trio.Event()
            print(f"flood on {kind}", flush=True)
            await trio.sleep(0.1)
            flooder = await ProtocolSession.open(self.port, "flooder")
            self.counts["floods"] += 1
            with trio.move_on_after(FLOOD_FOR):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain, flooder)
                    while True:
                        await flooder.ws.send(frame)
                        self.counts[f"flood frames {kind}"] += 1
            flooder.close()
            await trio.sleep(1)
            print("flood off", flush=True)
            self.calm.set()

    @staticmethod
    async def _drain(session: ProtocolSession) -> None:
        while True:
            await session.ws.read_frame()

    async def attack(self) -> None:
        patterns = [self.reset_after_101, self.reset_midway, self.ping_after_close,
                    self.never_reading, self.broken_frame, self.random_bytes]
        weights = [4, 4, 1, 1, 4, 4]
        if self.only is not None:
            weights = [int(p.__name__ == self.only) for p in patterns]
        async with trio.open_nursery() as nursery:
            while True:
                await self.calm.wait()
                pattern = self.random.choices(patterns, weights)[0]
                token = object()  # one per attacker: the limiter counts borrowers
                await self.limiter.acquire_on_behalf_of(token)
                nursery.start_soon(self._one, pattern, token)

    async def _one(self, pattern: object, token: object) -> None:
        try:
            with trio.move_on_after(30):
                await pattern()  # type: ignore[operator]
            self.counts[pattern.__name__] += 1  # type: ignore[attr-defined]
        except (ConnectionEnded, OSError, trio.TooSlowError):
            self.counts[f"{pattern.__name__} ended early"] += 1  # type: ignore[attr-defined]
        finally:
            self.limiter.release_on_behalf_of(token)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def attack(port: int, minutes: float, seed: int, only: str | None) -> None:
    """The attackers' process: attacks and floods for `minutes`, then the counts as JSON."""
    chaos = Chaos(port, seed, only)
    async with trio.open_nursery() as nursery:
        if only != "flood":
            nursery.start_soon(chaos.attack)
        if only in (None, "flood"):
            nursery.start_soon(chaos.flood)
        await trio.sleep(minutes * 60)
        nursery.cancel_scope.cancel()
    print(json.dumps({"tried": chaos.tried, **chaos.counts}), flush=True)


def run(minutes: float, seed: int, only: str | None, broker_root: Path = ROOT) -> int:
    """Start the broker, run the chaos against it, report; 1 if the broker died or the
    monitor lost anything."""
    config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    config.write(CONFIG)
    config.close()
    log = tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False)
    port, metrics_port = _free_port(), _free_port()
    with open(config.name, "a") as extra:
        extra.write(f"[metrics]\nport = {metrics_port}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "mqbroker", "serve", "--port", str(port), "--config",
         config.name], stderr=log, cwd=broker_root,
        env={**os.environ, "PYTHONPATH": str(broker_root)})
    try:
        return trio.run(observe, port, metrics_port, process, minutes, seed, only)
    finally:
        process.terminate()
        process.wait(10)
        Path(config.name).unlink()
        log.close()
        crashes = [line for line in Path(log.name).read_text().splitlines()
                   if "crashed" in line or "Traceback" in line]
        print(f"broker log: {len(crashes)} crash lines"
              + ("" if not crashes else "; first: " + crashes[0][:300]))
        Path(log.name).unlink()


async def observe(port: int, metrics_port: int, process: subprocess.Popen[bytes],
                  minutes: float, seed: int, only: str | None) -> int:
    await _wait_listening(port)
    observer = Observer(process.pid)
    report: dict[str, Any] = {}
    started = time.perf_counter()
    async with monitored(port, check=False) as monitor:
        attackers = await trio.lowlevel.open_process(
            [sys.executable, __file__, str(minutes), "--seed", str(seed), "--attack",
             str(port), *(["--only", only] if only else [])], stdout=subprocess.PIPE)
        assert attackers.stdout is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(observer.watch, process)
            nursery.start_soon(observer.healthy, port)
            nursery.start_soon(observer.listen, attackers.stdout, report)
            with trio.move_on_after(minutes * 60 + 30):
                await attackers.wait()
            nursery.cancel_scope.cancel()
        await monitor.stop()
    elapsed = time.perf_counter() - started
    alive = process.poll() is None
    counts = Counter({k: v for k, v in report.items() if k != "tried"})
    print(f"chaos run: {elapsed:.0f} s, seed {seed}, on {machine()}")
    print(f"connections tried          {report.get('tried', '?')}")
    print(f"broker restarts            {0 if alive else 1} (pid {process.pid} "
          f"{'still alive' if alive else 'DEAD'})")
    print(f"monitor messages published {monitor.published}")
    print(f"monitor messages lost      {monitor.lost}"
          f"{'' if monitor.failure is None else '  FAILURE: ' + monitor.failure}")
    print(f"broker peak RSS            {observer.peak_rss / 2**20:.1f} MiB")
    for problem in ("close frame missing", "wrong close code", "reset after close frame",
                    "answered after close"):
        print(f"{problem:<27}{counts[problem]}")
    for name, rtts in (("tiny floods", observer.rtt["tiny"]),
                       ("capped floods", observer.rtt["capped"]),
                       ("outside floods", observer.rtt[None])):
        print(f"healthy round trips, {name:<14} n={len(rtts):<5} "
              f"p50 {percentile(rtts, 0.5) * 1000:.2f} ms  "
              f"p99 {percentile(rtts, 0.99) * 1000:.2f} ms  "
              f"max {max(rtts, default=float('nan')) * 1000:.1f} ms")
    print("attacks:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if alive:
        print("broker's sessions closed, by code:", await _closes(metrics_port))
    failed = not alive or monitor.lost or monitor.failure is not None
    return 1 if failed else 0


async def _closes(metrics_port: int) -> str:
    """The broker's count of sessions closed, by close code, from its /metrics."""
    stream = await trio.open_tcp_stream("127.0.0.1", metrics_port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    async for chunk in stream:
        body += chunk
    closes = []
    for line in body.decode().splitlines():
        if line.startswith("mqbroker_sessions_closed_") and not line.endswith(" 0"):
            name, value = line.split()[0].split("{")[0], line.split()[-1]
            name = name.removeprefix("mqbroker_sessions_closed_").removesuffix("_total")
            closes.append(f"{name} {value}")
    return ", ".join(closes)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(port: int) -> None:
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", type=float, help="how long to run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", help="one pattern alone (a method name of Chaos, or flood)")
    parser.add_argument("--broker-root", type=Path, default=ROOT,
                        help="run the broker of another checkout (to compare side by side)")
    parser.add_argument("--attack", type=int, metavar="PORT",
                        help="(internal) be the attackers' process, against PORT")
    args = parser.parse_args()
    if args.attack:
        trio.run(attack, args.attack, args.minutes, args.seed, args.only)
        return
    sys.exit(run(args.minutes, args.seed, args.only, args.broker_root.resolve()))


if __name__ == "__main__":
    main()
