"""Benchmark of the Redis bridge: publish throughput, batched against one thread hop per message.

Run: python bench/bench_redis_bridge.py [--messages N] [--publishers N]

Needs a `redis-server` binary (it starts a private one on a free port; apt-get install
redis-server). Workload: 100-byte payloads (bytes) on 100 recorded topics, as publishes of
one draft each unless said otherwise. Reports messages per second for:
- hop per message: each publish is its own thread hop and EVALSHA (no writer);
- writer, 1 publisher: one task publishing one draft at a time through the ScriptWriter;
- writer, P publishers: P tasks publishing one draft at a time; the writer batches what
  queued up while its previous call was running (the mean batch size is printed);
- writer, batches of 100: one task publishing lists of 100 drafts;
- end to end: P publishers on instance A, every message delivered on instance B (RedisFanout
  and pub/sub thread included), timed until B has them all;
- redis.asyncio under trio-asyncio, P publishers, one EVALSHA per publish (run only if
  trio-asyncio is installed: pip install trio-asyncio).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext
from mqbroker.message import Draft, Message
from mqbroker_plugins.redis import RedisSettings, open_redis_fanout, open_redis_history
from mqbroker_plugins.redis.bridge import RedisBridge
from mqbroker_plugins.redis.channels import KeyLayout
from mqbroker_plugins.redis.scripts import (
    PUBLISH_LUA,
    Outbound,
    PublishCall,
    StreamBounds,
)
from mqbroker_plugins.redis.writer import ScriptWriter
from tests.redis_server import RedisServer

PAYLOAD = bytes(100)
TOPICS = 100


def drafts(count: int) -> list[Draft]:
    return [
        Draft(topic=f"bench/{n % TOPICS}", payload=PAYLOAD, published_at=time.time(), record=True)
        for n in range(count)
    ]


def publish_call(prefix: str) -> PublishCall:
    bounds = StreamBounds.of(HistoryConfig(), 3600)
    return PublishCall(
        layout=KeyLayout(prefix), bounds=bounds, dedup_ms=0, publish=True, record="all"
    )


async def timed(label: str, count: int, run: Callable[[], Awaitable[Any]]) -> None:
    start = time.perf_counter()
    extra = await run()
    elapsed = time.perf_counter() - start
    note = f"  ({extra})" if extra else ""
    print(
        f"  {label:<34} {count / elapsed:>10,.0f} msg/s  {elapsed * 1e6 / count:>7.1f} us/msg{note}"
    )


async def hop_per_message(bridge: RedisBridge, count: int) -> None:
    call = publish_call("b1:")
    for draft in drafts(count):
        await bridge.script("publish", call.args([Outbound.of(draft)]))


async def through_writer(bridge: RedisBridge, count: int, publishers: int, size: int) -> str:
    writer = ScriptWriter(bridge, publish_call(f"b{publishers}x{size}:"))
    batches = [drafts(size) for _ in range(count // size)]

    async def publisher(mine: list[list[Draft]]) -> None:
        for batch in mine:
            await writer.write([Outbound.of(d) for d in batch])

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        async with trio.open_nursery() as publishing:
            for p in range(publishers):
                publishing.start_soon(publisher, batches[p::publishers])
        nursery.cancel_scope.cancel()
    return f"{writer.written / writer.calls:.1f} drafts per script call"


async def end_to_end(settings: RedisSettings, count: int, publishers: int) -> str:
    received: list[Message] = []
    done = trio.Event()

    def deliver(messages: Any) -> None:
        received.extend(messages)
        if len(received) >= count:
            done.set()

    async with open_redis_history(settings, HistoryConfig()) as history:
        a = FanoutContext(instance_id="a", history=history, deliver=lambda m: None, dedup_window=0)
        b = FanoutContext(instance_id="b", history=history, deliver=deliver, dedup_window=0)
        async with open_redis_fanout(settings, a) as fa, open_redis_fanout(settings, b) as fb:
            await fb.watch("bench/+")
            all_drafts = drafts(count)

            async def publisher(mine: list[Draft]) -> None:
                for draft in mine:
                    await fa.publish([draft])

            async with trio.open_nursery() as nursery:
                for p in range(publishers):
                    nursery.start_soon(publisher, all_drafts[p::publishers])
            await done.wait()
            stats = fb.stats()
    return f"{stats['pubsub_received'] / max(1, stats['connections']):,.0f} copies received by B"


async def asyncio_publishes(url: str, count: int, publishers: int) -> str:
    import redis.asyncio

    # Optional, and not a dependency: imported by name so type checking does not need it.
    trio_asyncio: Any = importlib.import_module("trio_asyncio")

    call = publish_call("ba:")
    all_drafts = drafts(count)
    async with trio_asyncio.open_loop():
        client = redis.asyncio.Redis.from_url(url)
        script = client.register_script(PUBLISH_LUA)

        async def publisher(mine: list[Draft]) -> None:
            for draft in mine:
                await trio_asyncio.aio_as_trio(script)(args=call.args([Outbound.of(draft)]))

        async with trio.open_nursery() as nursery:
            for p in range(publishers):
                nursery.start_soon(publisher, all_drafts[p::publishers])
        await trio_asyncio.aio_as_trio(client.aclose)()
    return ""


async def main(count: int, publishers: int) -> None:
    with RedisServer() as server:
        settings = RedisSettings(url=server.url, key_prefix="bench:", pool_size=8)
        bridge = RedisBridge.open(settings)
        try:
            await bridge.run(bridge.load_scripts_sync)
            await timed("hop per message", count // 4, lambda: hop_per_message(bridge, count // 4))
            for label, p, size in (
                ("writer, 1 publisher", 1, 1),
                (f"writer, {publishers} publishers", publishers, 1),
                ("writer, batches of 100", 1, 100),
            ):
                await timed(label, count, partial(through_writer, bridge, count, p, size))
        finally:
            bridge.close()
        await timed(
            f"end to end, {publishers} publishers",
            count,
            lambda: end_to_end(settings, count, publishers),
        )
        if importlib.util.find_spec("trio_asyncio") is None:
            print("  redis.asyncio under trio-asyncio: not run (pip install trio-asyncio)")
        else:
            await timed(
                f"redis.asyncio/trio-asyncio, {publishers} pub.",
                count,
                lambda: asyncio_publishes(server.url, count, publishers),
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=50)
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, trio {trio.__version__}, "
        f"{args.messages} messages of {len(PAYLOAD)} bytes over {TOPICS} recorded topics"
    )
    trio.run(main, args.messages, args.publishers)
