"""mqbroker.mcp's EventStore: the cost per stored message at the SDK's pace (one after another).

The SDK's message router awaits `store_event` for each message before routing the next, so a
store that waits for the broker per message costs a round trip per message. This measures what
the router waits per message (`store_event` alone), and the cost per message including the
broker's acknowledgement of all of them (the time until the last is stored, divided by the
count), in memory and through Redis (a private redis-server; the broker in its own process,
like the MCP server), with and without the store for reference (a session's messages written
in calls of 601 messages, as in issue 12).

    .venv/bin/python bench/bench_mcp_store.py [--calls 20] [--per-call 601]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from mcp_types import JSONRPCNotification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cluster import redis_config
from bench_e2e import Broker, machine

from mqbroker.mcp import BrokerEventStore
from tests.redis_server import RedisServer


def notification(i: int) -> JSONRPCNotification:
    # About 100 bytes of JSON, like a progress or log notification.
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/message",
                               params={"level": "info", "data": f"tick {i:06d} of the call"})


async def run(url: str, calls: int, per_call: int) -> tuple[float, float]:
    """(ms the router waits per message, ms per message until all are acknowledged)."""
    router, stored = [], []
    async with BrokerEventStore(url) as store:
        for call in range(calls + 1):  # the first call warms up (connection, caches)
            session = store.session(f"bench{call}")
            messages = [notification(i) for i in range(per_call)]
            started = time.perf_counter()
            for message in messages:
                await session.store_event(str(call), message)
            queued = time.perf_counter()
            while store._tasks:
                await asyncio.wait(set(store._tasks))
            done = time.perf_counter()
            if call:
                router.append((queued - started) / per_call * 1000)
                stored.append((done - started) / per_call * 1000)
        assert store.stats["lost"] == 0 and store.stats["omitted"] == 0, store.stats
    return statistics.median(router), statistics.median(stored)


async def baseline(url: str, calls: int, per_call: int) -> float:
    """For reference: the same messages serialized, with no store at all (ms per message)."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        for i in range(per_call):
            notification(i).model_dump_json(by_alias=True, exclude_unset=True)
            await asyncio.sleep(0)
        times.append((time.perf_counter() - started) / per_call * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--per-call", type=int, default=601)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{args.calls} calls of {args.per_call} messages each, one store_event after another; "
          "medians over the calls")
    reference = asyncio.run(baseline("", args.calls, args.per_call))
    print(f"{'no store (serialize only)':28} {reference:.4f} ms per message")
    with RedisServer() as redis, Broker(20_000, redis_config(redis.url)) as through_redis, \
            Broker(20_000) as in_memory:
        for label, broker in (("memory broker", in_memory), ("Redis broker", through_redis)):
            router, stored = asyncio.run(run(broker.url, args.calls, args.per_call))
            print(f"{label:28} router waits {router:.4f} ms per message; "
                  f"{stored:.4f} ms per message until all acknowledged")


if __name__ == "__main__":
    main()
