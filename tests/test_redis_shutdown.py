"""A shutdown over the Redis fan-out: an event whose publish a cancel cuts short is told once.
The Redis fan-out publishes through its writer task, which carries a publish out even when its
caller is cancelled while waiting for the answer: what the way out tells again must not be what
Redis published already. A private redis-server, paused (SIGSTOP) to hold a publish in flight."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import trio

from mqbroker.broker import open_broker
from mqbroker.config import Config, FanoutConfig, ServerConfig, SessionsConfig
from mqbroker.protocol import Delivery
from mqbroker.registry import Rules
from mqbroker.server.presence import PresenceService
from mqbroker.server.registry import Registry
from mqbroker.sessions import PresenceKey, Reaped, SessionRecord, SessionState
from mqbroker.testing import MemorySession, watching
from mqbroker_plugins.memory import MemoryPresence
from mqbroker_plugins.memory_sessions import MemorySessions
from tests.redis_server import RedisServer

WATCHED = "mcp/session/S/message"
PRESENCE = "mcp/session/S/presence"
#: The longest a test waits for a delivery.
WAIT = 10.0
WITHDRAW_DELAY = 0.2


class SlowWithdraws(MemoryPresence):
    """A presence store that withdraws at once and answers WITHDRAW_DELAY later: long enough
    for the test to pause Redis before the leave is published."""

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        await super().withdraw(keys)
        await trio.sleep(WITHDRAW_DELAY)


class SlowReaps(MemorySessions):
    """A session store that reaps at once and answers WITHDRAW_DELAY later."""

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        reaped = await super().reap(now, limit, retain)
        await trio.sleep(WITHDRAW_DELAY)
        return reaped


def config(server: RedisServer) -> Config:
    return Config(server=ServerConfig(port=0), fanout=FanoutConfig(plugin="redis"),
                  sessions=SessionsConfig(presence_ttl=60.0),
                  plugins={"redis": {"url": server.url, "reconnect_max_delay": 0.2}})


def events(watcher: MemorySession, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    watcher.flush()
    seen += [e.payload for e in watcher.take_events() if isinstance(e, Delivery)]
    return seen


async def wait_for(watcher: MemorySession, seen: list[dict[str, Any]], count: int) -> None:
    with trio.fail_after(WAIT):
        while len(events(watcher, seen)) < count:  # noqa: ASYNC110 (deliveries: no event)
            await trio.sleep(0.01)


async def test_a_leave_whose_publish_a_shutdown_cut_short_is_published_once(
        redis_server: RedisServer) -> None:
    """The presence service is cancelled (a shutdown) while the leave of a closed connection
    is on its way through the Redis fan-out: the publish is finished, not given back to the
    flush on the way out to publish a second time (other instances would see the connection
    leave twice)."""
    cfg = config(redis_server)
    seen: list[dict[str, Any]] = []
    async with open_broker(cfg, "a") as broker:
        watcher = await watching(broker, PRESENCE)
        service = PresenceService(broker, SlowWithdraws(), cfg.sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            broker.presence = service
            session = await watching(broker, WATCHED)
            await wait_for(watcher, seen, 1)
            await broker.detach(session)
            await trio.sleep(WITHDRAW_DELAY / 2)  # the service is withdrawing the entry
            redis_server.pause()
            await trio.sleep(WITHDRAW_DELAY)  # the leave's publish waits for the paused Redis
            nursery.cancel_scope.cancel()
            redis_server.resume()
        await service.flush()
        await wait_for(watcher, seen, 2)
        await trio.sleep(0.5)  # a second leave, if one was published, has arrived too
        assert [(e["event"], e.get("reason")) for e in events(watcher, seen)] == [
            ("join", None), ("leave", "closed")]


async def test_an_expired_whose_publish_a_shutdown_cut_short_is_published_once(
        redis_server: RedisServer) -> None:
    """A reaper round is cancelled (a shutdown) while its `expired` event is on its way through
    the Redis fan-out: the publish is finished and the round told, not told a second time on
    the way out (`tell_reaped`)."""
    cfg = config(redis_server)
    seen: list[dict[str, Any]] = []
    async with open_broker(cfg, "a") as broker:
        watcher = await watching(broker, "mcp/session/+/lifecycle")
        registry = Registry(store=SlowReaps(), broker=broker, rules=Rules(cfg.sessions))
        now = time.time()
        await registry.store.create(SessionRecord(
            id="s1", user="u", state=SessionState.ACTIVE, created=now - 2, updated=now - 2,
            expires=now - 1, ttl=1.0, metadata={}))
        with trio.CancelScope() as reaper:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.reap)
                await trio.sleep(WITHDRAW_DELAY / 2)  # the store is reaping
                redis_server.pause()
                await trio.sleep(WITHDRAW_DELAY)  # the `expired` waits for the paused Redis
                reaper.cancel()
                redis_server.resume()
        await registry.tell_reaped()
        await wait_for(watcher, seen, 1)
        await trio.sleep(0.5)  # a second `expired`, if one was published, has arrived too
        assert [(e["event"], e["session"]) for e in events(watcher, seen)] == [("expired", "s1")]
