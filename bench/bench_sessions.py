"""What the session stores cost: 10,000 sessions created, touched, read, changed, listed and
reaped, per store.

Run: .venv/bin/python bench/bench_sessions.py [--sessions N] [--stores memory,sqlite,...]

The stores are the contract suites' registry backends (tests/contract/backends.py,
REGISTRY_BACKENDS): adding a store there adds it here. Each store starts empty (a fresh SQLite
file, a fresh database on a private PostgreSQL with fsync off). Steps, in order:
- create: N creates, one call each, from 8 concurrent tasks (as 8 connections would);
- touch: N touches in calls of 100 ids (the batch the Protocol allows);
- get: N reads in calls of 100 ids;
- change: N pending -> active transitions, one call each, from 8 concurrent tasks;
- list: every record, in pages of 1000;
- reap: all N expired, in reaps of 1000.
Figures are operations (sessions) per second. Memory per session is tracemalloc's growth over
the creates, for the in-process store only (the others keep their data in the database).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqbroker.sessions import SessionRecord, SessionState, SessionStore
from tests.contract.backends import REGISTRY_BACKENDS

T0 = 1_700_000_000.0
BATCH = 100
TASKS = 8


def record(n: int) -> SessionRecord:
    return SessionRecord(
        id=f"session-{n:06d}", user=f"user-{n % 100}", state=SessionState.PENDING, created=T0,
        updated=T0, expires=T0 + 60, ttl=60.0, metadata={"client": "bench", "n": n},
    )  # fmt: skip


async def concurrently(count: int, call: Callable[[int], Awaitable[object]]) -> None:
    """call(0 .. count-1) from TASKS tasks."""

    async def task(first: int) -> None:
        for n in range(first, count, TASKS):
            await call(n)

    async with trio.open_nursery() as nursery:
        for first in range(TASKS):
            nursery.start_soon(task, first)


async def timed(rates: dict[str, float], step: str, count: int,
                work: Callable[[], Awaitable[None]]) -> None:  # fmt: skip
    started = time.perf_counter()
    await work()
    rates[step] = count / (time.perf_counter() - started)


async def run(store: SessionStore, count: int, in_process: bool) -> dict[str, float]:
    rates: dict[str, float] = {}
    ids = [record(n).id for n in range(count)]
    batches = [ids[start : start + BATCH] for start in range(0, count, BATCH)]
    if in_process:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    await timed(rates, "create", count, lambda: concurrently(
        count, lambda n: store.create(record(n))))  # fmt: skip
    if in_process:
        rates["bytes/session"] = (tracemalloc.get_traced_memory()[0] - before) / count
        tracemalloc.stop()

    async def touch() -> None:
        for batch in batches:
            await store.touch(batch, None, T0 + 1)

    async def get() -> None:
        for batch in batches:
            await store.get(batch, None)

    async def list_all() -> None:
        after: str | None = None
        while True:
            page = await store.list(after=after, limit=1000)
            if page.next is None:
                return
            after = page.next

    async def reap() -> None:
        while (await store.reap(T0 + 10**6, 1000, 300.0)).expired:
            pass

    await timed(rates, "touch", count, touch)
    await timed(rates, "get", count, get)

    async def activate(n: int) -> None:
        await store.change(ids[n], None, T0 + 2, state=SessionState.ACTIVE)

    await timed(rates, "change", count, lambda: concurrently(count, activate))
    await timed(rates, "list", count, list_all)
    await timed(rates, "reap", count, reap)
    return rates


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--stores", default=",".join(REGISTRY_BACKENDS))
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {platform.platform()}; Python {platform.python_version()}")
    print(f"{args.sessions} sessions; operations (sessions) per second")
    steps = ("create", "touch", "get", "change", "list", "reap", "bytes/session")
    print(f"{'store':12}" + "".join(f"{s:>14}" for s in steps))
    for name in args.stores.split(","):
        backend = REGISTRY_BACKENDS[name]
        async with backend.open_sessions(1) as (store,):
            rates = await run(store, args.sessions, in_process=name == "memory")
        print(f"{name:12}" + "".join(
            f"{rates[s]:>14,.0f}" if s in rates else f"{'-':>14}" for s in steps))  # fmt: skip


if __name__ == "__main__":
    trio.run(main)
