"""The heap one idle subscription inside an application session's topics holds, with presence.

Run: .venv/bin/python bench/bench_subscription_memory.py [--sessions N] [--top K]

N MemorySessions (mqbroker.testing), attached to a running_broker(presence=True)
(tests/harness.py: registry, presence over the memory store, the WebSocket listener), each
subscribes to its own `mcp/session/<i>/message`; once the presence task has announced every
join, tracemalloc's growth divided by N is the cost of one such subscription (its session
object excluded: it is created before the measurement starts). `--top` lists the files that
grew most (per subscription).
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqbroker.config import Config, ServerConfig, SessionsConfig
from mqbroker.protocol import Subscribe
from mqbroker.testing import MemorySession
from tests.harness import running_broker


async def main(sessions: int, top: int, key: str) -> None:
    config = Config(server=ServerConfig(port=0, max_subscriptions=1000),
                    sessions=SessionsConfig(presence_ttl=3600.0, reap_interval=3600.0))
    async with running_broker(config, presence=True) as running:
        broker = running.broker
        members = [MemorySession() for _ in range(sessions)]
        for member in members:
            broker.attach(member)
        presence = broker.presence
        assert presence is not None
        await trio.sleep(0.05)
        tracemalloc.start(1)
        before_snapshot = tracemalloc.take_snapshot()
        before = tracemalloc.get_traced_memory()[0]
        for n, member in enumerate(members):
            await broker.subscribe(member, Subscribe(id=1, filter=f"mcp/session/{n}/message"))
        with trio.fail_after(30):
            while presence.stats()["announced"] < sessions:  # noqa: ASYNC110  (bounded poll)
                await trio.sleep(0.01)
        for member in members:  # the acknowledgements are the connection's, not kept
            member.queued.clear()
            member.frames.clear()
        after = tracemalloc.get_traced_memory()[0]
        after_snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        print(f"sessions={sessions}: {(after - before) / sessions:,.0f} B per subscription")
        stats = after_snapshot.compare_to(before_snapshot, key)
        for stat in stats[:top]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / sessions:8,.0f} B  {frame.filename}:{frame.lineno}")
        for member in members:
            await broker.detach(member)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=5_000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--lines", action="store_true", help="group by line, not file")
    args = parser.parse_args()
    trio.run(main, args.sessions, args.top, "lineno" if args.lines else "filename")
