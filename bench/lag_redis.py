"""Where saturated A -> B messages go with no fault (issue 9, item 2): a lagging pub/sub reader.

    python bench/lag_redis.py [--runs 3] [--messages 200000] [--limit "pubsub 32mb 8mb 60"]

A private redis-server and two broker processes on it (Redis fan-out, unrecorded topic). One
publisher on A sends fire-and-forget frames of 200 publishes (100-byte payloads) as fast as A
takes them; one raw subscriber on B counts the `message` and `gap` events it gets, and notes
the close code if B closes it (4008: its outbox overflowed, the `slow_consumer` policy).
Meanwhile Redis' `CLIENT LIST TYPE pubsub` is sampled every 50 ms for the largest output
buffer (omem) of any pub/sub connection, and B's /metrics gives its fan-out counters at the end
(connections, interruptions, probes lost). `--limit` sets Redis' client-output-buffer-limit for
pub/sub clients (Redis' default: "pubsub 32mb 8mb 60").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import count_deliveries, machine, open_session, publish_frame, subscribe

from mqbroker.protocol import Delivery, GapNotice
from mqbroker.protocol.codec import SERVER_SPECS, decode
from tests.daemon import running_daemon
from tests.harness import free_port
from tests.redis_server import RedisServer

TOPIC = "bench/lag"  # not recorded
#: The msgpack of the `gap` op's value, to spot the rare frames that need decoding.
GAP_OP = b"\xa3gap"
BATCH = 200


def config(directory: Path, url: str, name: str, metrics: int) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(
        f'[server]\ninstance_id = "{name}"\n[metrics]\nport = {metrics}\n'
        '[fanout]\nplugin = "redis"\n[history]\nplugin = "redis"\n'
        f'[plugins.redis]\nurl = "{url}"\nkey_prefix = "lag:"\n')
    return path


async def metrics(port: int) -> dict[str, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        async for chunk in stream:
            data += chunk
    values: dict[str, float] = {}
    for line in data.decode().split("\r\n\r\n", 1)[1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def largest_pubsub_buffer(client: Any) -> int:
    return max((int(c.get("omem", 0)) for c in client.client_list(_type="pubsub")), default=0)


async def one_run(server: RedisServer, messages: int) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    with tempfile.TemporaryDirectory() as directory:
        paths = [config(Path(directory), server.url, n, p) for n, p in zip("ab", ports,
                                                                            strict=True)]
        async with running_daemon(paths[0]) as a, running_daemon(paths[1]) as b, \
                trio.open_nursery() as nursery:
            sub = await open_session(nursery, b.url)
            await subscribe(sub, TOPIC)
            publisher = await open_session(nursery, a.url)
            counts = {"delivered": 0, "gaps": 0, "omem_max": 0, "closed": 0}
            progress = [time.monotonic()]

            async def read(ws: WebSocketConnection) -> None:
                while True:
                    try:
                        frame = await ws.get_message()
                    except ConnectionClosed as closed:
                        counts["closed"] = closed.reason.code
                        return
                    assert isinstance(frame, bytes)
                    if GAP_OP in frame:  # rare: decode this one (a payload could match too)
                        events = decode(frame, SERVER_SPECS)
                        counts["gaps"] += sum(isinstance(e, GapNotice) for e in events)
                        counts["delivered"] += sum(isinstance(e, Delivery) for e in events)
                    else:  # only deliveries: count them from the header, as fast as B sends
                        counts["delivered"] += count_deliveries(frame)
                    progress[0] = time.monotonic()

            async def sample() -> None:
                with redis.Redis.from_url(server.url) as client:
                    while True:
                        omem = await trio.to_thread.run_sync(largest_pubsub_buffer, client)
                        counts["omem_max"] = max(counts["omem_max"], omem)
                        await trio.sleep(0.05)

            nursery.start_soon(read, sub)
            nursery.start_soon(sample)
            frame = publish_frame(TOPIC, BATCH)
            start = time.perf_counter()
            for _ in range(messages // BATCH):
                await publisher.send_message(frame)
            # Polled: the reader sets no event per delivery, to stay as fast as it can.
            while counts["delivered"] < messages and time.monotonic() - progress[0] < 5:  # noqa: ASYNC110
                await trio.sleep(0.1)
            elapsed = time.perf_counter() - start
            stats = await metrics(ports[1])
            nursery.cancel_scope.cancel()
    return {**counts, "seconds": elapsed,
            **{k.removeprefix("mqbroker_"): v for k, v in stats.items()}}


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(f"workload: {args.messages:,} messages of 100 bytes, A -> B, unrecorded topic, "
          f"client-output-buffer-limit {args.limit}")
    for run in range(args.runs):
        with RedisServer() as server:
            with redis.Redis.from_url(server.url) as client:
                client.config_set("client-output-buffer-limit", args.limit)
            result = await one_run(server, args.messages)
        lost = args.messages - result["delivered"]
        print(f"run {run + 1}: delivered {result['delivered']:,} lost {lost:,} "
              f"gap events {result['gaps']} in {result['seconds']:.1f} s; "
              f"largest pub/sub output buffer {result['omem_max'] / 2**20:.1f} MiB; "
              f"B: connections {result.get('fanout_connections_total', 0):.0f}, "
              f"interruptions {result.get('fanout_interruptions_total', 0):.0f}, "
              f"probes lost {result.get('fanout_probes_lost_total', 0):.0f}, "
              f"sessions closed as slow consumers "
              f"{result.get('sessions_closed_slow_consumer_total', 0):.0f}"
              + (f"; the subscriber was closed with {result['closed']}" if result["closed"]
                 else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--limit", default="pubsub 32mb 8mb 60")
    trio.run(main, parser.parse_args())
