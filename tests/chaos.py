"""Redis faults under load, counted per kind of subscriber: the chaos harness (issue 9).

Broker instances run as processes (`python -m mqbroker serve`) on one private redis-server that
this harness kills, pauses, flushes or restarts on a schedule while a publisher on instance A
streams acknowledged messages to three topics and subscribers on the other instances read them:

- exact recorded:   `mcp/session/chaos/message` (recorded by the default filters)
- exact unrecorded: `chaos/u`
- wildcard:         `chaos/w/+` (over the unrecorded topic `chaos/w/1`)

Every acknowledged message is either delivered, or lost *with a gap* (a `Gap` in the
subscription's stream between the delivered messages around it), or lost *silently*: the
figure that must be 0. Used by tests/test_chaos_redis.py (a few faults) and bench/chaos_redis.py
(10 or more of each kind). Loopback only; bounded in count and time.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import trio
from attrs import define, field

from mqbroker.client import ClientError, Gap, Message, Reconnect, connect
from tests.daemon import Daemon, running_daemon
from tests.redis_server import RedisServer

#: kind -> (the topic published, the filter subscribed)
KINDS: dict[str, tuple[str, str]] = {
    "exact recorded": ("mcp/session/chaos/message", "mcp/session/chaos/message"),
    "exact unrecorded": ("chaos/u", "chaos/u"),
    "wildcard": ("chaos/w/1", "chaos/w/+"),
}
FAULTS = ("kill", "pause", "flush", "restart", "pubsub-kill")
FAST = Reconnect(initial_delay=0.01, max_delay=0.1)
#: How long a paused Redis stays paused: past the instances' socket_timeout, so that publishes
#: under way time out with their outcome unknown.
SOCKET_TIMEOUT = 0.5
PAUSE = 1.0


def instance_config(directory: Path, server: RedisServer, name: str) -> Path:
    path = directory / f"chaos-{name}.toml"
    path.write_text(
        f'[server]\ninstance_id = "{name}"\n'
        '[fanout]\nplugin = "redis"\n[history]\nplugin = "redis"\nmax_messages = 100000\n'
        f'[plugins.redis]\nurl = "{server.url}"\nkey_prefix = "chaos:"\n'
        f"reconnect_max_delay = 0.2\nprobe_interval = 0.5\nsocket_timeout = {SOCKET_TIMEOUT}\n"
        "connect_timeout = 0.5\n")
    return path


@define
class Stream:
    """What one subscription yielded, in order: payload numbers, and "gap" markers."""

    kind: str
    instance: str
    items: list[int | str] = field(factory=list)
    #: trio time of each delivered payload number's first arrival.
    arrived: dict[int, float] = field(factory=dict)


@define
class Published:
    """What the publisher learnt per kind: payload number -> trio time it was acknowledged."""

    acknowledged: dict[str, dict[int, float]] = field(
        factory=lambda: {kind: {} for kind in KINDS})
    refused: Counter[str] = field(factory=Counter)


@define
class Row:
    kind: str
    acknowledged: int = 0
    delivered: int = 0
    lost_with_gap: int = 0
    lost_silently: int = 0
    duplicated: int = 0
    #: Seconds from each fault's end to the first delivery of a message acknowledged after it.
    recoveries: list[float] = field(factory=list)

    def cells(self) -> list[str]:
        recover = (f"{statistics.median(self.recoveries):.2f} / {max(self.recoveries):.2f}"
                   if self.recoveries else "-")
        return [self.kind, str(self.acknowledged), str(self.delivered), str(self.lost_with_gap),
                str(self.lost_silently), str(self.duplicated), recover]


HEADER = ["subscriber", "acknowledged", "delivered", "lost with a gap", "lost silently",
          "duplicated", "recover s (median / max)"]


def analyse(stream: Stream, acknowledged: dict[int, float], fault_ends: Sequence[float],
            row: Row) -> None:
    """Add one subscription's stream to its kind's row."""
    counts = Counter(item for item in stream.items if isinstance(item, int))
    row.acknowledged += len(acknowledged)
    row.delivered += sum(1 for n in acknowledged if n in counts)
    row.duplicated += sum(count - 1 for count in counts.values())
    # Where each delivered number first appears in the stream.
    index: dict[int, int] = {}
    for i, item in enumerate(stream.items):
        if isinstance(item, int):
            index.setdefault(item, i)
    gaps = [i for i, item in enumerate(stream.items) if item == "gap"]
    delivered = sorted(index)
    for n in sorted(set(acknowledged) - set(counts)):
        before = [m for m in delivered if m < n]
        after = [m for m in delivered if m > n]
        start = index[before[-1]] if before else -1
        end = index[after[0]] if after else len(stream.items)
        if any(start < g < end for g in gaps):
            row.lost_with_gap += 1
        else:
            row.lost_silently += 1
    for end in fault_ends:
        later = [n for n, at in acknowledged.items() if at >= end and n in stream.arrived]
        if later:
            row.recoveries.append(stream.arrived[min(later)] - end)


async def inject(server: RedisServer, fault: str) -> None:
    """One fault; returns once Redis is back."""
    if fault == "kill":
        await trio.to_thread.run_sync(server.kill)
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(server.start)
    elif fault == "restart":
        await trio.to_thread.run_sync(server.stop)
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(server.start)
    elif fault == "pause":
        server.pause()
        try:
            await trio.sleep(PAUSE)
        finally:
            server.resume()
    elif fault == "flush":
        await trio.to_thread.run_sync(_on_redis, server, "FLUSHALL")
    elif fault == "pubsub-kill":  # what `client-output-buffer-limit pubsub` does to a laggard
        await trio.to_thread.run_sync(_on_redis, server, "CLIENT", "KILL", "TYPE", "pubsub")
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _on_redis(server: RedisServer, *command: str) -> Any:
    with redis.Redis.from_url(server.url, socket_timeout=5) as client:
        return client.execute_command(*command)


@asynccontextmanager
async def _instances(directory: Path, server: RedisServer, count: int
                     ) -> AsyncIterator[list[Daemon]]:
    names = "abc"[:count]
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(
            running_daemon(instance_config(directory, server, name))) for name in names]


async def _publish(client: Any, kind: str, published: Published, stop: trio.Event) -> None:
    topic = KINDS[kind][0]
    n = 0
    while not stop.is_set():
        msg_id = f"{kind}-{n}"
        # Retry with the same msg_id until acknowledged: dedup makes a retry of a publish
        # whose outcome was unknown safe (unless Redis lost the dedup key with its data).
        for _attempt in range(200):
            try:
                await client.publish(topic, n, msg_id=msg_id)
            except ClientError:
                published.refused[kind] += 1
                await trio.sleep(0.02)
                continue
            published.acknowledged[kind][n] = trio.current_time()
            break
        n += 1


async def _read(subscription: Any, stream: Stream) -> None:
    async for item in subscription:
        if isinstance(item, Gap):
            stream.items.append("gap")
        elif isinstance(item, Message):
            stream.items.append(item.payload)
            stream.arrived.setdefault(item.payload, trio.current_time())


def _caught_up(streams: list[Stream], published: Published) -> bool:
    for stream in streams:
        acknowledged = published.acknowledged[stream.kind]
        if acknowledged and max(acknowledged) not in stream.arrived:
            return False
    return True


async def run_chaos(directory: Path, server: RedisServer, faults: Sequence[str], *,
                    instances: int = 2, spacing: float = 1.0, settle: float = 10.0
                    ) -> tuple[list[Row], Published]:
    """Run `faults` one after another, `spacing` seconds apart, under load; return the rows."""
    async with _instances(directory, server, instances) as daemons, AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(connect(daemons[0].url, reconnect=FAST))
        streams: list[Stream] = []
        subscriptions = []
        for daemon, name in zip(daemons[1:], "bc", strict=False):
            client = await stack.enter_async_context(connect(daemon.url, reconnect=FAST))
            for kind, (_topic, filter) in KINDS.items():
                subscriptions.append(await client.subscribe(filter))
                streams.append(Stream(kind=kind, instance=name))
        published = Published()
        fault_ends: list[float] = []
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for subscription, stream in zip(subscriptions, streams, strict=True):
                nursery.start_soon(_read, subscription, stream)
            async with trio.open_nursery() as publishing:
                for kind in KINDS:
                    publishing.start_soon(_publish, publisher, kind, published, stop)
                await trio.sleep(spacing)
                for fault in faults:
                    await inject(server, fault)
                    fault_ends.append(trio.current_time())
                    await trio.sleep(spacing)
                stop.set()
            with trio.move_on_after(settle):
                while not _caught_up(streams, published):  # noqa: ASYNC110 - counts, no event
                    await trio.sleep(0.05)
            await trio.sleep(0.2)  # a duplicate still on its way would arrive by now
            nursery.cancel_scope.cancel()
    rows = {kind: Row(kind) for kind in KINDS}
    for stream in streams:
        analyse(stream, published.acknowledged[stream.kind], fault_ends, rows[stream.kind])
    return list(rows.values()), published


def table(rows: Sequence[Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)
