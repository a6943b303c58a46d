"""What presence costs: a subscribe's added work on the connection's path, and how fast one
instance's presence task writes joins and leaves to the store.

Run: .venv/bin/python bench/bench_presence.py [--entries N] [--redis]

The broker is driven in process (mqbroker.testing.MemorySession, the memory fan-out), so that
the figures are the broker's own work. Steps:
- subscribe: N subscribes, each to a distinct session's topic (mcp/session/sN/message), from
  one connection, with presence off, then on: microseconds per subscribe on the connection's
  path (the presence task does not run meanwhile: its work is measured next);
- write joins: from N joins pending, the time until the presence task has written them all
  (in batches of ANNOUNCE_BATCH) and published their events: joins per second;
- re-announce: one round of re-announcing the N entries, timed alone;
- write leaves: the connection closes; the time from the close (which undoes N fan-out
  watches meanwhile) until the N leaves are written.
The store is the memory one, or with --redis a private redis-server started for the run (the
`redis-server` binary must be installed).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, ServerConfig, SessionsConfig
from mqbroker.protocol import Subscribe
from mqbroker.server.presence import PresenceService
from mqbroker.testing import MemorySession
from mqbroker_plugins.memory import MemoryPresence


def config(entries: int) -> Config:
    return Config(server=ServerConfig(port=0, max_subscriptions=entries),
                  sessions=SessionsConfig(presence_ttl=3600.0, reap_interval=3600.0))


@asynccontextmanager
async def presence_store(redis: bool) -> AsyncIterator[Any]:
    if not redis:
        yield MemoryPresence()
        return
    from mqbroker_plugins.redis import open_redis_presence
    from tests.redis_fixtures import settings_for
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        async with open_redis_presence(settings_for(server), SessionsConfig()) as store:
            yield store


async def subscribe_all(broker: Broker, session: MemorySession, entries: int) -> float:
    """Seconds for `entries` subscribes to distinct sessions' topics."""
    started = time.perf_counter()
    for n in range(entries):
        await broker.subscribe(session, Subscribe(id=n, filter=f"mcp/session/s{n}/message"))
    return time.perf_counter() - started


async def until(condition: Any) -> float:
    started = time.perf_counter()
    while not condition():  # noqa: ASYNC110  (a benchmark's poll, off the measured path)
        await trio.sleep(0.001)
    return time.perf_counter() - started


async def main(entries: int, redis: bool) -> None:
    cfg = config(entries)
    async with open_broker(cfg, "bench") as broker:
        plain = MemorySession()
        broker.attach(plain)
        off = await subscribe_all(broker, plain, entries)
        await broker.detach(plain)
    async with open_broker(cfg, "bench") as broker, presence_store(redis) as store, \
            trio.open_nursery() as nursery:
        service = PresenceService(broker, store, cfg.sessions)
        broker.presence = service
        member = MemorySession()
        broker.attach(member)
        on = await subscribe_all(broker, member, entries)  # the presence task is not started yet
        await nursery.start(service.run)
        joins = await until(lambda: service.stats()["joins"] == entries)
        refresh = collections.deque(service.tracker.announced())
        started = time.perf_counter()
        while refresh:
            await service._refresh(refresh)
        reannounce = time.perf_counter() - started
        started = time.perf_counter()
        await broker.detach(member)  # the presence task writes while the unwatches run
        await until(lambda: service.stats()["leaves"] == entries)
        leaves = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    store_name = "redis" if redis else "memory"
    print(f"entries={entries} store={store_name}")
    print(f"subscribe, presence off: {off / entries * 1e6:.1f} us each")
    print(f"subscribe, presence on:  {on / entries * 1e6:.1f} us each")
    print(f"joins written+published: {entries / joins:,.0f}/s")
    print(f"re-announce round:       {entries / reannounce:,.0f} entries/s")
    print(f"close, then leaves written+published: {entries / leaves:,.0f}/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--redis", action="store_true")
    args = parser.parse_args()
    trio.run(main, args.entries, args.redis)
