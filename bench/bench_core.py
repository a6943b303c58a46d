"""Benchmark of the emitter core's matching: SubscriptionIndex.match on the reference workload.

Run: python bench/bench_core.py [--publishes N] [--sessions N] [--seed N]

Workload: SESSIONS sessions, each subscribed to its own exact `mcp/session/<id>/message`,
plus 100 wildcard filters held by randomly chosen sessions; then PUBLISHES publishes to random
session topics (a list drawn before timing). Reports routed publishes per second with the
per-topic cache warm and with caching off, and how many sessions each publish reached.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mqbroker.index import SubscriptionIndex
from mqbroker.topics import validate_filter

WILDCARD_FILTERS = 100
TARGET_PER_SECOND = 1_000_000


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it, or what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def session_topic(session: int) -> str:
    return f"mcp/session/{session}/message"


def wildcard_filters(rng: random.Random, sessions: int) -> list[str]:
    """100 wildcard filters: a few broad ones, the rest aimed at one session or another."""
    broad = ["mcp/session/+/message", "mcp/#", "mcp/broadcast/+", "+/session/#", "#"]
    shapes = [
        "mcp/session/{k}/+",
        "mcp/session/{k}/#",
        "+/session/{k}/message",
        "mcp/+/{k}/message",
        "mcp/broadcast/{k}/#",
        "mcp/session/+/{k}",
    ]
    filters = list(broad)
    while len(filters) < WILDCARD_FILTERS:
        shape = rng.choice(shapes)
        filters.append(shape.format(k=rng.randrange(sessions)))
    return filters


def build_index(sessions: int, rng: random.Random, cache_size: int) -> SubscriptionIndex[int]:
    """The reference subscriptions: one exact filter per session, wildcards spread over some."""
    index: SubscriptionIndex[int] = SubscriptionIndex(cache_size=cache_size)
    for session in range(sessions):
        index.add(session, 1, session_topic(session))
    for sub_id, filter in enumerate(wildcard_filters(rng, sessions), start=2):
        validate_filter(filter)
        index.add(rng.randrange(sessions), sub_id, filter)
    return index


def route(index: SubscriptionIndex[int], topics: Sequence[str]) -> tuple[float, int]:
    """Match every topic; (seconds taken, total sessions reached)."""
    match = index.match
    reached = 0
    started = time.perf_counter()
    for topic in topics:
        reached += len(match(topic))
    return time.perf_counter() - started, reached


def report(label: str, seconds: float, publishes: int, reached: int) -> float:
    rate = publishes / seconds
    print(
        f"{label:<28} {publishes:>9,} publishes in {seconds:7.3f} s = {rate:>12,.0f} /s "
        f"({seconds / publishes * 1e9:6.0f} ns each), "
        f"{reached / publishes:.2f} sessions matched on average"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--uncached-publishes", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    print(f"machine: {cpu_model()}, python {sys.version.split()[0]} ({platform.machine()})")
    print(
        f"workload: {args.sessions:,} sessions with one exact filter each + "
        f"{WILDCARD_FILTERS} wildcard filters; random session topics"
    )
    topics = [session_topic(rng.randrange(args.sessions)) for _ in range(args.publishes)]

    uncached = build_index(args.sessions, random.Random(args.seed), cache_size=0)
    seconds, reached = route(uncached, topics[: args.uncached_publishes])
    report("uncached (cache off)", seconds, args.uncached_publishes, reached)

    index = build_index(args.sessions, random.Random(args.seed), cache_size=65536)
    seconds, reached = route(index, topics)
    report("first pass (cache filling)", seconds, args.publishes, reached)
    seconds, reached = route(index, topics)
    rate = report("warm cache", seconds, args.publishes, reached)

    verdict = "met" if rate >= TARGET_PER_SECOND else "NOT met"
    print(f"target {TARGET_PER_SECOND:,} routed publishes/s with a warm cache: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
