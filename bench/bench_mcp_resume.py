"""Cut-and-resume runs of examples/mcp: duplicates and losses over many runs.

Two MCP server instances (examples/mcp/server.py) beside one broker; each run is a new MCP
session whose `count` call is cut after its k-th SSE event (k cycling from right after the
priming event to right before the response) and resumed with Last-Event-ID on the other
instance. Reports, per backend, the runs, the duplicate and lost notifications, the failed
calls and the time per run.

    .venv/bin/python bench/bench_mcp_resume.py --runs 100 --backend memory --backend redis
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import anyio
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_mcp_example import broker_of, example_client, mcp_servers


async def bench(backend: str, runs: int, ticks: int, delay: float) -> None:
    client = example_client()
    expected = [f"tick {i}" for i in range(1, ticks + 1)]
    duplicates = lost = failed = resumed = 0
    async with broker_of(backend) as broker_url, mcp_servers(broker_url) as (first, second):
        started = time.perf_counter()
        for run in range(runs):
            cut_after = 1 + run % (ticks + 1)
            call = partial(client.call_cut, first, second, cut_after=cut_after, n=ticks,
                           delay=delay)
            try:
                with trio.fail_after(60):
                    outcome = await trio.to_thread.run_sync(anyio.run, call)
            except Exception as e:
                failed += 1
                print(f"  run {run} (cut after {cut_after}) failed: {e!r}")
                continue
            counts = Counter(outcome.ticks)
            duplicates += sum(n - 1 for n in counts.values() if n > 1)
            lost += sum(1 for tick in expected if tick not in counts)
            failed += outcome.result != f"counted to {ticks}"
            resumed += outcome.resumes
        elapsed = time.perf_counter() - started
    print(f"{backend:>6}: {runs} runs ({resumed} resumed on the other instance), "
          f"{duplicates} duplicates, {lost} lost, {failed} failed; "
          f"{elapsed / runs * 1000:.0f} ms per run ({ticks} ticks, {delay * 1000:.0f} ms apart)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--backend", action="append", choices=["memory", "redis"])
    args = parser.parse_args()
    for backend in args.backend or ["memory", "redis"]:
        trio.run(bench, backend, args.runs, args.ticks, args.delay)


if __name__ == "__main__":
    main()
