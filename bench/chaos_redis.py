"""Chaos: Redis killed, paused, flushed, restarted and its pub/sub clients dropped, under load.

    python bench/chaos_redis.py [--faults 10] [--instances 2] [--spacing 1.0] [--kinds ...]

Starts its own redis-server on a free loopback port (no persistence) and two or three broker
processes on it (tests/chaos.py has the setup). A publisher on instance A streams acknowledged
messages (with msg_ids, retried until acknowledged) to three topics as fast as acknowledgements
allow; subscribers on the other instances read them: exact recorded, exact unrecorded, wildcard.
Each fault kind runs `--faults` times, `--spacing` seconds apart, in its own run:

- kill:        SIGKILL, restart empty 0.3 s later
- pause:       SIGSTOP for 1 s (past the instances' 0.5 s socket_timeout), then SIGCONT
- flush:       FLUSHALL
- restart:     SIGTERM, restart empty 0.3 s later
- pubsub-kill: CLIENT KILL TYPE pubsub (what `client-output-buffer-limit pubsub` does)

Prints per kind of subscriber: acknowledged, delivered, lost with a gap, lost silently (must be
0), duplicated, and the time from each fault's end to the first delivery of a message
acknowledged after it. Bounded: faults x spacing seconds per kind, plus at most 10 s to settle.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_e2e import machine

from tests.chaos import FAULTS, run_chaos, table
from tests.redis_server import RedisServer


async def main(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}")
    silent = 0
    for kind in args.kinds:
        with RedisServer() as server, tempfile.TemporaryDirectory() as directory:
            rows, published = await run_chaos(
                Path(directory), server, [kind] * args.faults, instances=args.instances,
                spacing=args.spacing)
        refused = sum(published.refused.values())
        print(f"\n### {kind} x {args.faults} ({args.instances} instances, "
              f"{args.spacing} s apart; publishes refused then retried: {refused})\n")
        print(table(rows))
        silent += sum(row.lost_silently for row in rows)
    print(f"\nlost silently, all runs: {silent}")
    return 1 if silent else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=10, help="faults of each kind")
    parser.add_argument("--instances", type=int, choices=(2, 3), default=2)
    parser.add_argument("--spacing", type=float, default=1.0, help="seconds between faults")
    parser.add_argument("--kinds", nargs="+", choices=FAULTS, default=list(FAULTS))
    sys.exit(trio.run(main, parser.parse_args()))
