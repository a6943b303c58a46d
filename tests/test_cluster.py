"""Several broker instances, as separate processes, on one Redis: one broker for the clients.

Each instance is `python -m mqbroker serve` with the Redis fan-out and history; Redis is a
private redis-server the test starts (and stops, restarts or flushes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import redis
import trio

from mqbroker.client import BrokerError, Gap, Message, Reconnect, connect
from mqbroker.config import Config, FanoutConfig, HistoryConfig, ServerConfig
from tests.daemon import Daemon, running_daemon
from tests.harness import free_port, running_broker
from tests.redis_server import RedisServer

TOPIC = "mcp/session/s1/message"
FAST = Reconnect(initial_delay=0.01, max_delay=0.1)


def instance_config(tmp_path: Path, server: RedisServer, name: str, **metrics: int) -> Path:
    path = tmp_path / f"{name}.toml"
    metrics_section = f"[metrics]\nport = {metrics['port']}\n" if metrics else ""
    path.write_text(
        f'[server]\ninstance_id = "{name}"\n'
        '[fanout]\nplugin = "redis"\n[history]\nplugin = "redis"\n'
        f'[plugins.redis]\nurl = "{server.url}"\nkey_prefix = "cluster:"\n'
        "reconnect_max_delay = 0.2\nprobe_interval = 0.5\n" + metrics_section)
    return path


@asynccontextmanager
async def instances(tmp_path: Path, server: RedisServer, *names: str
                    ) -> AsyncIterator[list[Daemon]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(
            running_daemon(instance_config(tmp_path, server, name))) for name in names]


async def collect(subscription: object, count: int) -> list[Message]:
    received: list[Message] = []
    with trio.fail_after(20):
        async for item in subscription:  # type: ignore[attr-defined]
            assert isinstance(item, Message), item
            received.append(item)
            if len(received) == count:
                break
    return received


async def test_every_instance_gets_every_message_once_in_one_order(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Publishers on two instances; subscribers (exact and wildcard) on three: each gets every
    message exactly once, all see the same order, which is the history's order, and each
    publisher's messages keep the order it published them in (several of its batches are in
    flight at once)."""
    async with instances(tmp_path, redis_server, "a", "b", "c") as (a, b, c), \
            connect(a.url) as on_a, connect(b.url) as on_b, connect(c.url) as on_c:
        subscriptions = [await on_a.subscribe(TOPIC), await on_b.subscribe(TOPIC),
                         await on_c.subscribe("mcp/session/+/message")]

        async def publish(client: object, name: str) -> None:
            for n in range(100):
                await client.publish(TOPIC, [name, n], ack=n % 10 == 9)  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish, on_a, "a")
            nursery.start_soon(publish, on_b, "b")
        received = [await collect(s, 200) for s in subscriptions]
        orders = [[m.event_id for m in messages] for messages in received]
        assert len(set(orders[0])) == 200
        assert orders[0] == orders[1] == orders[2]
        for name in ("a", "b"):  # each publisher's messages in the order it published them
            assert [n for (p, n) in (m.payload for m in received[0]) if p == name] == list(
                range(100))
        offsets = [int(event.rsplit("-", 1)[1]) for event in orders[0]]
        assert offsets == sorted(offsets)


async def test_resume_on_another_instance(tmp_path: Path, redis_server: RedisServer) -> None:
    """A stream dropped on instance A resumes on instance B from its last event id: exactly
    the missed messages, recovered."""
    async with instances(tmp_path, redis_server, "a", "b") as (a, b), \
            connect(b.url) as publisher:
        async with connect(a.url) as first:
            subscription = await first.subscribe(TOPIC)
            for n in range(5):
                await publisher.publish(TOPIC, n)
            last = (await collect(subscription, 5))[-1].event_id
        for n in range(5, 10):
            await publisher.publish(TOPIC, n)
        async with connect(b.url) as second:
            resumed = await second.subscribe(TOPIC, since=last)
            assert resumed.ack is not None and resumed.ack.recovered
            await publisher.publish(TOPIC, 10)
            assert [m.payload for m in await collect(resumed, 6)] == list(range(5, 11))


async def test_a_flushed_redis_is_reported_not_a_silent_gap(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """After FLUSHALL (a replaced Redis), an old event id is reported as unknown_epoch."""
    async with instances(tmp_path, redis_server, "a", "b") as (a, b), \
            connect(a.url) as client:
        old = await client.publish(TOPIC, "before")
        redis.Redis.from_url(redis_server.url).flushall()
        await client.publish(TOPIC, "after")
        async with connect(b.url) as other:
            subscription = await other.subscribe(TOPIC, since=old)
            assert subscription.ack is not None
            assert (subscription.ack.recovered, subscription.ack.reason) == (
                False, "unknown_epoch")


async def test_a_redis_restart_mid_stream_loses_nothing_acknowledged_silently(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis restarts (empty) while a publisher on A streams to a subscriber on B: publishes
    during the outage fail with Unavailable (and are retried by the app); every acknowledged
    message reaches B once, in order, or, when Redis died before pushing it to B (its data gone,
    B's refill cannot tell), B's stream has a Gap where it is missing."""
    async with instances(tmp_path, redis_server, "a", "b") as (a, b), \
            connect(a.url, reconnect=FAST) as publisher, \
            connect(b.url, reconnect=FAST) as subscriber:
        subscription = await subscriber.subscribe(TOPIC)
        acknowledged: list[str] = []
        refused = 0

        async def outage() -> None:
            redis_server.stop()
            await trio.sleep(0.5)  # the outage itself, while the publisher keeps trying
            redis_server.start()

        async def stream(nursery: trio.Nursery) -> None:
            nonlocal refused
            for n in range(300):
                if n == 100:
                    nursery.start_soon(outage)
                while True:
                    try:
                        acknowledged.append(
                            await publisher.publish(TOPIC, n, msg_id=f"m{n}"))  # type: ignore[arg-type]
                        break
                    except BrokerError:  # unavailable, or outcome_unknown: same msg_id again
                        refused += 1
                        await trio.sleep(0.02)  # the app's retry pacing

        items: list[Message | Gap] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream, nursery)
            with trio.fail_after(20):
                async for item in subscription:
                    items.append(item)
                    if isinstance(item, Message) and item.payload == 299:
                        break
        received = [item for item in items if isinstance(item, Message)]
        assert [m.payload for m in received] == sorted({m.payload for m in received})
        missing = set(range(300)) - {m.payload for m in received}
        for n in missing:  # each missing one has a Gap between its delivered neighbours
            before = max((i for i, m in enumerate(items)
                          if isinstance(m, Message) and m.payload < n), default=-1)
            after = min(i for i, m in enumerate(items) if isinstance(m, Message) and m.payload > n)
            assert any(isinstance(item, Gap) for item in items[before + 1:after]), n
        assert len(acknowledged) == 300
        assert refused > 0  # the outage was seen


async def test_an_instance_receives_only_what_its_sessions_need(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Per-session traffic published on A is not copied to B, whose only session watches its
    own topic: B's pub/sub receives that topic's messages and nothing else."""
    metrics_port = free_port()
    config_b = instance_config(tmp_path, redis_server, "b", port=metrics_port)
    async with instances(tmp_path, redis_server, "a") as (a,), running_daemon(config_b) as b, \
            connect(a.url) as on_a, connect(b.url) as on_b:
        mine = await on_b.subscribe("mcp/session/b-only/message")
        for n in range(200):
            await on_a.publish(f"mcp/session/a{n}/message", n, ack=n == 199)
        await on_a.publish("mcp/session/b-only/message", "for b")
        assert [m.payload for m in await collect(mine, 1)] == ["for b"]
        stats = await _metrics(metrics_port)
        assert stats["mqbroker_fanout_pubsub_received_total"] <= 1 + stats.get(
            "mqbroker_fanout_probes_total", 0) * 2


async def _metrics(port: int) -> dict[str, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            async for chunk in stream:
                data += chunk
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values




async def test_an_sse_stream_dropped_on_one_instance_resumes_on_the_other(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """The SSE example across two instances: a browser's stream served through instance A
    drops; it reconnects, through instance B, with Last-Event-ID and gets exactly what it
    missed (examples/README.md, "Two instances")."""
    from tests.test_sse_example import open_stream, publish, serving_sse

    async with instances(tmp_path, redis_server, "a", "b") as (a, b), \
            serving_sse(a.url) as sse_a, serving_sse(b.url) as sse_b, \
            connect(a.url) as publisher:
        with trio.fail_after(20):
            async with open_stream(sse_a, "s1") as first:
                ids = [await publish(publisher, "s1", n) for n in range(1, 6)]
                read = await first.next_events(3)
            last_id = first.parser.last_event_id
            ids += [await publish(publisher, "s1", n) for n in range(6, 9)]
            async with open_stream(sse_b, "s1", last_event_id=last_id) as second:
                resumed = await second.next_events(5)
    assert [e.id for e in read] == ids[:3]
    assert [e.id for e in resumed] == ids[3:]
    assert [e.payload["n"] for e in resumed] == [4, 5, 6, 7, 8]


async def test_resumes_on_another_instance_under_concurrent_publishers_give_each_message_once(
        redis_server: RedisServer) -> None:
    """Publishers on A, resumers on B from the newest event a subscriber on A has seen: B's
    replay and B's live copies (which Redis pub/sub brings later) overlap; each message comes
    once (issue 9, item 4: 31 of 300 such resumes delivered one twice)."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                    fanout=FanoutConfig(plugin="redis"),
                    plugins={"redis": {"url": redis_server.url, "key_prefix": "x:"}})
    async with running_broker(config) as a, running_broker(config) as b, \
            connect(a.url) as watcher, connect(b.url) as keeper:
        await keeper.subscribe(TOPIC)  # B watches the topic already, as a busy instance would
        watching = await watcher.subscribe(TOPIC)
        last_seen = [await watcher.publish(TOPIC, "mark")]

        async def publish_forever(n: int) -> None:
            async with connect(a.url) as publisher:
                for i in range(1_000_000):
                    await publisher.publish(TOPIC, [n, i], ack=i % 10 == 9)

        async def follow() -> None:
            async for item in watching:
                assert isinstance(item, Message)
                last_seen.append(item.event_id)

        doubled = 0
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                for n in range(3):
                    nursery.start_soon(publish_forever, n)
                for _ in range(40):
                    async with connect(b.url) as resumer:
                        since = last_seen[-1]
                        subscription = await resumer.subscribe(TOPIC, since=since)
                        ids: list[str] = []
                        with trio.move_on_after(0.05):
                            async for item in subscription:
                                assert isinstance(item, Message), item
                                ids.append(item.event_id)
                        doubled += len(ids) != len(set(ids)) or since in ids
                nursery.cancel_scope.cancel()
    assert doubled == 0


async def test_a_publish_caught_by_a_paused_redis_is_outcome_unknown_not_unavailable(
        redis_server: RedisServer) -> None:
    """Redis paused (SIGSTOP) past socket_timeout: the publish is answered `outcome_unknown`,
    not `unavailable` (which promises nothing was published), and it is delivered once Redis
    resumes (issue 9, item 3: 3 publishes answered `unavailable` were delivered)."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                    fanout=FanoutConfig(plugin="redis"),
                    plugins={"redis": {"url": redis_server.url, "socket_timeout": 0.5}})
    async with running_broker(config) as broker, connect(broker.url) as client:
        subscription = await client.subscribe("p/1")
        redis_server.pause()
        try:
            with trio.fail_after(10), pytest.raises(BrokerError) as raised:
                await client.publish("p/1", "maybe", msg_id="k1")
        finally:
            redis_server.resume()
        assert raised.value.code == "outcome_unknown"
        [delivered] = await collect(subscription, 1)
        assert delivered.payload == "maybe"
