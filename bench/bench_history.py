"""What the memory history costs: publishing with history on vs off, and reading a backlog.

Run: /work/venv/bin/python bench/bench_history.py [--messages N] [--topics N] [--rounds N]

Publishing goes through MemoryFanout (the broker's one delivery path) to a deliver that only
counts; "on" records every draft in MemoryHistory, "off" publishes the same drafts unrecorded.
Each figure is the median of the rounds, on and off alternating so drift hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib.metadata import version

import trio

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext
from mqbroker.message import Draft, Message, Position
from mqbroker_plugins.memory import open_memory_fanout, open_memory_history

PAYLOAD = "x" * 100
BACKLOG = 10_000


def machine() -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} cores; {platform.platform()}; "
        f"Python {platform.python_version()}; trio {version('trio')}"
    )


def workload(messages: int, topics: int, *, record: bool) -> list[Draft]:
    return [
        Draft(
            topic=f"mcp/session/{n % topics}/message",
            payload=PAYLOAD,
            published_at=0.0,
            record=record,
        )
        for n in range(messages)
    ]


async def publish_rate(drafts: Sequence[Draft], batch: int) -> float:
    """Messages per second through a fresh fan-out and store."""
    delivered = 0

    def deliver(messages: Sequence[Message]) -> None:
        nonlocal delivered
        delivered += len(messages)

    async with open_memory_history(None, HistoryConfig()) as history:
        context = FanoutContext(
            instance_id="bench", history=history, deliver=deliver, dedup_window=120
        )
        async with open_memory_fanout(None, context) as fanout:
            started = time.perf_counter()
            for start in range(0, len(drafts), batch):
                await fanout.publish(drafts[start : start + batch])
            elapsed = time.perf_counter() - started
    assert delivered == len(drafts)
    return len(drafts) / elapsed


async def compare_publish(messages: int, topics: int, batch: int, rounds: int) -> None:
    recorded, unrecorded = (
        workload(messages, topics, record=True),
        workload(messages, topics, record=False),
    )
    on: list[float] = []
    off: list[float] = []
    for _ in range(rounds):
        on.append(await publish_rate(recorded, batch))
        off.append(await publish_rate(unrecorded, batch))
    rate_on, rate_off = statistics.median(on), statistics.median(off)
    print(
        f"  batch {batch:>4}: history on {rate_on:>10,.0f} msg/s | off {rate_off:>10,.0f} msg/s"
        f" | on/off {rate_on / rate_off:.2f}"
    )


async def read_backlog(rounds: int) -> None:
    config = HistoryConfig(max_messages=BACKLOG)
    async with open_memory_history(None, config) as history:
        messages = await history.append(workload(BACKLOG, 1, record=True))
        for label, since in (
            ("whole backlog", Position(history.epoch, 0)),
            ("last half", messages[BACKLOG // 2 - 1].position),
            ("nothing new", messages[-1].position),
        ):
            timings = []
            for _ in range(rounds):
                started = time.perf_counter()
                replay = await history.read(messages[0].topic, since)
                timings.append(time.perf_counter() - started)
            median = statistics.median(timings)
            count = len(replay.messages)
            print(f"  {label:<13}: {count:>6} messages in {median * 1e3:7.3f} ms")


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"workload: {args.messages:,} messages of {len(PAYLOAD)}-byte str payloads over "
        f"{args.topics:,} topics, default [history] bounds, median of {args.rounds} rounds"
    )
    print("publish through MemoryFanout, history on vs off:")
    for batch in (1, 100):
        await compare_publish(args.messages, args.topics, batch, args.rounds)
    print(f"read a backlog of {BACKLOG:,} messages on one topic:")
    await read_backlog(args.rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args())
