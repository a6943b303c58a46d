"""Benchmark of the Redis session registry: sessions created, touched, read, listed, reaped, and
presence re-announced, with Redis' memory per session and each operation's CPU time in Python
and in Redis. bench/bench_sessions.py compares every store (Redis included) on one workload;
this one looks inside the Redis store.

Run: python bench/bench_sessions_redis.py [--sessions N] [--tasks N]

Needs a `redis-server` binary (it starts a private one on a free port; apt-get install
redis-server). Workload: N sessions (default 10,000) of one of 100 users, metadata of about
100 bytes packed, through `RedisSessions` / `RedisPresence` as the broker opens them (worker
threads, pool_size 8). Reports operations per second for:
- create, one task: one session per call, each its own thread hop and script call;
- create, T tasks: T tasks creating at once (what concurrent requests look like);
- touch, batches of B: every session touched in calls of B ids (one script call each);
- touch, T tasks x 1 id: T tasks each touching one session per call;
- get, batches of 1000;
- list, pages of 1000: every session in id order; then one user's, then one state's;
- counts;
- reap, batches of 1000: every session expired, then purged;
- presence: one announce of N entries (an instance's re-announce), queries, one reap.
Per operation: wall time, and CPU time in this process (all threads) and in Redis (INFO
commandstats), which vary less than the wall time on a loaded machine.
Memory: Redis' used_memory before and after the N sessions, per session.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqbroker.sessions import PresenceEntry, SessionRecord, SessionState
from mqbroker_plugins.redis import (
    RedisSessions,
    RedisSettings,
    open_redis_presence,
    open_redis_sessions,
)
from tests.redis_server import RedisServer

T0 = 1_700_000_000.0
USERS = 100


def record(n: int) -> SessionRecord:
    return SessionRecord(
        id=f"session-{n:06d}", user=f"user-{n % USERS}", state=SessionState.ACTIVE,
        created=T0, updated=T0, expires=T0 + 1800, ttl=1800.0,
        metadata={"client": "bench-client/1.0", "protocol": "2025-06-18",
                  "origin": "https://app.example", "n": n, "tags": ["a", "b"]},
    )  # fmt: skip


#: The private server's URL, for Redis' own time per operation (INFO commandstats).
_server_url = ""


def redis_usec() -> int:
    """Microseconds Redis spent running commands so far (scripts included once)."""
    with redis.Redis.from_url(_server_url) as client:
        stats = client.info("commandstats")
    return sum(int(value["usec"]) for name, value in stats.items()
               if name in ("cmdstat_evalsha", "cmdstat_hgetall"))


async def timed(label: str, count: int, run: Callable[[], Awaitable[Any]]) -> float:
    """Runs `run` and prints, per operation: wall time, this process' CPU time (every thread),
    and Redis' time; the two CPU figures vary less with the machine's load than the wall."""
    used = redis_usec()
    cpu = time.process_time()
    start = time.perf_counter()
    await run()
    elapsed = time.perf_counter() - start
    cpu_us = (time.process_time() - cpu) * 1e6 / count
    redis_us = (redis_usec() - used) / count
    print(f"  {label:<40} {count / elapsed:>9,.0f} /s {elapsed * 1e6 / count:>8.1f} us "
          f"(CPU: Python {cpu_us:6.1f}, Redis {redis_us:6.1f} us)")
    return count / elapsed


async def in_tasks(tasks: int, items: list[Any], work: Callable[[Any], Awaitable[Any]]) -> None:
    async def worker(share: list[Any]) -> None:
        for item in share:
            await work(item)

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, items[t::tasks])


def used_memory(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.info("memory")["used_memory"])


async def sessions_bench(store: RedisSessions, url: str, count: int, tasks: int) -> None:
    records = [record(n) for n in range(count)]
    ids = [r.id for r in records]
    before = used_memory(url)
    await timed("create, 1 task", count // 2, lambda: in_tasks(1, records[: count // 2],
                                                                store.create))
    await timed(f"create, {tasks} tasks", count - count // 2,
                lambda: in_tasks(tasks, records[count // 2 :], store.create))
    per_session = (used_memory(url) - before) / count
    for batch in (1000, 100):
        chunks = [ids[i : i + batch] for i in range(0, count, batch)]
        await timed(f"touch, batches of {batch}", count,
                    lambda c=chunks: in_tasks(1, c, lambda ch: store.touch(ch, None, T0 + 1)))
    await timed(f"touch, {tasks} tasks x 1 id", count,
                lambda: in_tasks(tasks, ids, lambda i: store.touch([i], None, T0 + 2)))
    chunks = [ids[i : i + 1000] for i in range(0, count, 1000)]
    await timed("get, batches of 1000", count,
                lambda: in_tasks(1, chunks, lambda ch: store.get(ch, None)))
    await timed("list, pages of 1000", count, lambda: list_all(store, {}))
    mine = count // USERS
    await timed("list one user's, pages of 1000", mine,
                lambda: list_all(store, {"user": "user-7"}))
    await timed("list one state's, pages of 1000", count,
                lambda: list_all(store, {"state": SessionState.ACTIVE}))
    await timed("counts", 1000, lambda: in_tasks(1, list(range(1000)), lambda _: store.counts()))
    await timed("reap, batches of 1000 (expire)", count, lambda: reap_all(store, T0 + 10_000))
    await timed("reap, batches of 1000 (purge)", count, lambda: reap_all(store, T0 + 20_000))
    print(f"  Redis memory per session: {per_session:,.0f} bytes (used_memory, {count:,} "
          "sessions, ~100-byte metadata)")


async def list_all(store: RedisSessions, filters: dict[str, Any]) -> None:
    after = None
    while True:
        page = await store.list(after=after, limit=1000, **filters)
        if page.next is None:
            return
        after = page.next


async def reap_all(store: RedisSessions, now: float) -> None:
    while True:
        reaped = await store.reap(now, 1000, 300.0)
        if not reaped.expired and not reaped.purged:
            return


async def presence_bench(settings: RedisSettings, count: int) -> None:
    entries = [
        PresenceEntry(session=f"session-{n % (count // 2):06d}", instance="instance-a",
                      connection=f"conn-{n}", client="bench-client/1.0", principal="alice",
                      expires=T0 + 15)
        for n in range(count)
    ]  # fmt: skip
    async with open_redis_presence(settings) as presence:
        await timed(f"presence announce of {count:,} (1 call)", count,
                    lambda: presence.announce(entries))
        await timed(f"presence announce again ({count:,})", count,
                    lambda: presence.announce(entries))
        sessions = [f"session-{n:06d}" for n in range(1000)]
        await timed("presence query (2 entries each)", len(sessions),
                    lambda: in_tasks(1, sessions, lambda s: presence.query(s, T0)))
        await timed(f"presence reap of {count:,}, batches of 1000", count,
                    lambda: reap_presence(presence))


async def reap_presence(presence: Any) -> None:
    while await presence.reap(T0 + 100, 1000):
        pass


async def main(count: int, tasks: int) -> None:
    print(f"Python {platform.python_version()}, redis-py {version('redis')}, "
          f"{platform.processor() or platform.machine()}")
    global _server_url
    with RedisServer() as server:
        _server_url = server.url
        with redis.Redis.from_url(server.url) as client:
            print(f"Redis {client.info('server')['redis_version']} (private, no persistence)")
        settings = RedisSettings(url=server.url, key_prefix="bench:")
        async with open_redis_sessions(settings) as store:
            await sessions_bench(store, server.url, count, tasks)
        await presence_bench(settings, count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=8)
    arguments = parser.parse_args()
    trio.run(main, arguments.sessions, arguments.tasks)
