"""Two broker instances on one Redis, against one instance alone: latency and throughput.

    python bench/bench_cluster.py [--quick]

Starts a private redis-server on a free port and two broker processes using the Redis fan-out
and history (instances A and B), plus one broker on the memory plugins. 100-byte payloads to a
recorded per-session topic. Cross-instance: the publisher on A, the subscriber on B. Measured
side by side in one run: paced latency at 5,000 messages/s (p50/p99) and throughput (publisher
batches of 200 publishes per frame), for the pair and for the single instance.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import Broker, latency, machine, percentile, throughput

from tests.redis_server import RedisServer

TOPIC = "mcp/session/bench/message"


def redis_config(url: str) -> str:
    return ('[fanout]\nplugin = "redis"\n[history]\nplugin = "redis"\n'
            f'[plugins.redis]\nurl = "{url}"\nkey_prefix = "bench:"\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    seconds, messages = (2, 20_000) if args.quick else (5, 100_000)
    print(f"machine: {machine()}")
    with RedisServer() as redis, Broker(20_000, redis_config(redis.url)) as a, \
            Broker(20_000, redis_config(redis.url)) as b, Broker(20_000) as single:
        for label, pub, sub in (("single instance (memory)", single.url, single.url),
                                ("A -> B through Redis", a.url, b.url)):
            values = trio.run(partial(latency, sub, 1, 5_000, seconds, publish_url=pub))
            print(f"{label:26} latency at 5,000 msg/s: p50 {percentile(values, 0.5):.2f} ms, "
                  f"p99 {percentile(values, 0.99):.2f} ms ({len(values)} samples)")
        for label, pub, sub in (("single instance (memory)", single.url, single.url),
                                ("A -> B through Redis", a.url, b.url)):
            rate = trio.run(partial(throughput, sub, 1, messages, TOPIC, publish_url=pub))
            print(f"{label:26} throughput: {rate:>9,.0f} messages/s ({messages:,} messages)")


if __name__ == "__main__":
    main()
