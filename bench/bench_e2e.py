"""End-to-end benchmark over WebSocket: throughput and paced latency through a real broker.

    python bench/bench_e2e.py [--quick]

The broker runs as its own process (`python -m mqbroker serve`); the load generator runs in
this one with raw WebSocket sessions, so that what is measured is the broker, not a client
library: publishers send pre-encoded batches of publishes, subscribers count deliveries from
each frame's msgpack array header without decoding them (latency runs decode, to read the send
time out of the payload). 100-byte payloads throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

from mqbroker.protocol import ClientConnection, Publish, Subscribe

PAYLOAD_BYTES = 100
#: A delivery's payload key and the msgpack bin-8 header of a PAYLOAD_BYTES payload.
PAYLOAD_MARK = b"\xa7payload\xc4" + bytes([PAYLOAD_BYTES])
BATCH = 200  # publishes per frame from the throughput publisher


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


class Broker:
    """The broker in its own process, on a free port."""

    def __init__(self, outbox: int, extra: str = "") -> None:
        self.config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        self.config.write(f"[server]\noutbox_messages = {outbox}\n[log]\nlevel = \"warning\"\n")
        self.config.write(extra)
        self.config.close()
        self.path = self.config.name
        self.port = _free_port()

    def __enter__(self) -> Broker:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mqbroker", "serve", "--config", self.config.name,
             "--port", str(self.port)], stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import socket

        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the broker did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)
        Path(self.path).unlink(missing_ok=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def cpu_seconds(self) -> float:
        """The broker process's CPU time so far: steadier than wall time on a busy machine."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def open_session(nursery: trio.Nursery, url: str, *,
                       ssl_context: ssl.SSLContext | None = None,
                       auth: str | None = None) -> WebSocketConnection:
    """A session past its welcome (over TLS with `ssl_context`, with credential `auth`)."""
    for _ in range(100):
        try:
            ws = await connect_websocket_url(nursery, url, ssl_context=ssl_context,
                                             max_message_size=1 << 26)
            break
        except OSError:
            await trio.sleep(0.05)  # the broker process is still starting
    await ws.send_message(ClientConnection().hello("bench", auth))
    await ws.get_message()
    return ws


def count_deliveries(frame: bytes) -> int:
    """How many events a frame carries, from its msgpack header alone."""
    first = frame[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC:
        return int.from_bytes(frame[1:3], "big")
    if first == 0xDD:
        return int.from_bytes(frame[1:5], "big")
    return 1


async def subscribe(ws: WebSocketConnection, topic: str) -> None:
    await ws.send_message(ClientConnection().encode(Subscribe(id=1, filter=topic)))
    await ws.get_message()  # suback


def publish_frame(topic: str, count: int) -> bytes:
    connection = ClientConnection()
    return connection.encode_batch(
        [Publish(topic=topic, payload=b"x" * PAYLOAD_BYTES) for _ in range(count)])


async def throughput(url: str, subscribers: int, messages: int,
                     topic: str = "bench/fanout", publish_url: str | None = None, *,
                     ssl_context: ssl.SSLContext | None = None) -> float:
    """Deliveries per second from one publisher (on `publish_url`, by default `url` too) to
    `subscribers` sessions on `url`."""
    async with trio.open_nursery() as nursery:
        sessions = [await open_session(nursery, url, ssl_context=ssl_context)
                    for _ in range(subscribers)]
        for ws in sessions:
            await subscribe(ws, topic)
        publisher = await open_session(nursery, publish_url or url, ssl_context=ssl_context)
        frame = publish_frame(topic, BATCH)
        done = trio.Event()
        remaining = [subscribers]

        async def drain(ws: WebSocketConnection) -> None:
            received = 0
            while received < messages:
                received += count_deliveries(await ws.get_message())
            remaining[0] -= 1
            if not remaining[0]:
                done.set()

        for ws in sessions:
            nursery.start_soon(drain, ws)
        start = time.perf_counter()
        for _ in range(messages // BATCH):
            await publisher.send_message(frame)
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return messages * subscribers / elapsed


async def one_to_one(url: str, messages: int, per_frame: int, topic: str = "bench/p2p", *,
                     auth: str | None = None) -> None:
    """One publisher to one subscriber, frames of `per_frame` publishes, until all arrived:
    for benchmarks that read the broker's CPU around it."""
    async with trio.open_nursery() as nursery:
        subscriber = await open_session(nursery, url, auth=auth)
        await subscribe(subscriber, topic)
        publisher = await open_session(nursery, url, auth=auth)
        frame = publish_frame(topic, per_frame)

        async def drain() -> None:
            received = 0
            while received < messages:
                received += count_deliveries(await subscriber.get_message())
            nursery.cancel_scope.cancel()

        nursery.start_soon(drain)
        for _ in range(messages // per_frame):
            await publisher.send_message(frame)
        await trio.sleep_forever()


async def latency(url: str, subscribers: int, rate: float, seconds: float,
                  publish_url: str | None = None) -> list[float]:
    """Publish-to-delivery latencies (ms) at a paced rate of messages per second."""
    topic = "bench/latency"
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        sessions = [await open_session(nursery, url) for _ in range(subscribers)]
        for ws in sessions:
            await subscribe(ws, topic)
        publisher = await open_session(nursery, publish_url or url)
        total = int(rate * seconds)
        expected = total * subscribers
        done = trio.Event()

        async def drain(ws: WebSocketConnection) -> None:
            while True:
                frame = await ws.get_message()
                now = time.perf_counter_ns()
                # The send time is the first 8 bytes of each payload: found by its key, without
                # decoding the frame, so that the load generator stays cheap.
                start = frame.find(PAYLOAD_MARK)
                while start >= 0:
                    at = start + len(PAYLOAD_MARK)
                    latencies.append((now - int.from_bytes(frame[at:at + 8], "big")) / 1e6)
                    start = frame.find(PAYLOAD_MARK, at)
                if len(latencies) >= expected:
                    done.set()

        for ws in sessions:
            nursery.start_soon(drain, ws)
        # One publish frame, pre-encoded around the 8-byte send time it carries first in its
        # payload: each send only splices the time in.
        template = ClientConnection().encode(
            Publish(topic=topic, payload=b"\xee" * 8 + b"x" * (PAYLOAD_BYTES - 8)))
        head, tail = template.split(b"\xee" * 8)
        interval = 1 / rate
        start = trio.current_time()
        for n in range(total):
            await trio.sleep_until(start + n * interval)
            await publisher.send_message(head + time.perf_counter_ns().to_bytes(8, "big") + tail)
        with trio.move_on_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


#: Broker CPU seconds used by the last `run`.
last_cpu = [0.0]


def run(name: str, scenario: Callable[[str], object], outbox: int = 10_000) -> object:
    with Broker(outbox) as broker:
        before = broker.cpu_seconds()
        result = trio.run(scenario, broker.url)
        last_cpu[0] = broker.cpu_seconds() - before
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    figures: dict[str, float] = {}
    print(f"machine: {machine()}")
    print(f"payload: {PAYLOAD_BYTES} bytes; publisher batches of {BATCH} publishes per frame")

    n = int(200_000 * scale)
    figures["1to1_msgs_per_s"] = run("1to1", lambda url: throughput(url, 1, n))  # type: ignore[assignment]
    print(f"1 -> 1      {n:>8} messages: {figures['1to1_msgs_per_s']:>10,.0f} messages/s"
          f"  (broker CPU {last_cpu[0] / n * 1e6:.1f} us/message)")
    n = int(20_000 * scale)
    figures["1to100_deliveries_per_s"] = run("1to100", lambda url: throughput(url, 100, n))  # type: ignore[assignment]
    print(f"1 -> 100    {n:>8} messages: {figures['1to100_deliveries_per_s']:>10,.0f} deliveries/s"
          f"  (broker CPU {last_cpu[0] / n / 100 * 1e6:.2f} us/delivery)")
    n = int(2_000 * scale)
    figures["1to1000_deliveries_per_s"] = run("1to1000", lambda url: throughput(url, 1000, n))  # type: ignore[assignment]
    print(f"1 -> 1000   {n:>8} messages: {figures['1to1000_deliveries_per_s']:>10,.0f} deliveries/s"
          f"  (broker CPU {last_cpu[0] / n / 1000 * 1e6:.2f} us/delivery)")

    seconds = 5 * scale if args.quick else 5
    for subs, rate in ((1, 10_000), (100, 100)):
        values: list[float] = run(  # type: ignore[assignment]
            "latency", lambda url, subs=subs, rate=rate: latency(url, subs, rate, seconds))
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        figures[f"latency_1to{subs}_p50_ms"], figures[f"latency_1to{subs}_p99_ms"] = p50, p99
        print(f"latency 1 -> {subs:<4} at {rate * subs:,} deliveries/s: p50 {p50:.2f} ms, "
              f"p99 {p99:.2f} ms, max {max(values):.2f} ms ({len(values)} samples, "
              f"mean {statistics.fmean(values):.2f})")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
