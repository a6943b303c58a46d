"""The cost of per-session rate limits ([limits]) per publish, beside the same run without.

    python bench/bench_ratelimit.py [--quick]

The broker runs as its own process (bench_e2e's setup); one publisher sends 100-byte publishes
to one subscriber, in batches of 200 per frame and one per frame (the fast path). "on" sets
publish_messages_per_second, publish_bytes_per_second and requests_per_second so high that
nothing is refused: what is measured is the checking, the buckets and the size of each publish.
Rounds alternate off/on so that the machine's noise falls on both; the figure is the broker's
CPU time per message (steadier than wall time on a busy machine), median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import Broker, machine, one_to_one

LIMITS_ON = """
[limits]
publish_messages_per_second = 1e9
publish_bytes_per_second = 1e12
requests_per_second = 1e9
"""


def measure(extra: str, messages: int, per_frame: int) -> float:
    """Broker CPU microseconds per message."""
    with Broker(10_000, extra) as broker:
        before = broker.cpu_seconds()
        trio.run(one_to_one, broker.url, messages, per_frame, "bench/rate")
        time.sleep(0.1)  # let the broker finish writing before its CPU time is read
        return (broker.cpu_seconds() - before) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    print(f"machine: {machine()}")
    for per_frame, n in ((200, int(200_000 * scale)), (1, int(40_000 * scale))):
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.rounds):
            off.append(measure("", n, per_frame))
            on.append(measure(LIMITS_ON, n, per_frame))
        a, b = statistics.median(off), statistics.median(on)
        print(f"1 -> 1, {per_frame:>3} publishes/frame, {n} messages x {args.rounds} rounds: "
              f"limits off {a:.2f} us/message, on {b:.2f} us/message, on/off {b / a:.3f} "
              f"(rounds off {', '.join(f'{x:.2f}' for x in off)}; "
              f"on {', '.join(f'{x:.2f}' for x in on)})")


if __name__ == "__main__":
    main()
