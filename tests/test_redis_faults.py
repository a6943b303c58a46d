"""The Redis plugin when Redis fails: degraded health, refused publishes, reconnection, refill.

The servers here are private processes that the tests stop, restart (empty, on the same port)
and flush. Where Redis gives no event to wait on (a dead server), the tests poll the fan-out's
health with a short sleep inside `trio.fail_after`.
"""

from __future__ import annotations

import pytest
import redis
import trio
from structlog.testing import capture_logs

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutUnavailable
from mqbroker.history import Gap, HistoryUnavailable
from mqbroker.message import Message, Position
from mqbroker_plugins.redis import RedisFanout, RedisSettings
from tests.redis_fixtures import (
    WAIT,
    draft,
    open_instance,
    redis_server,
    redis_settings,
    settings_for,
)
from tests.redis_server import RedisServer

__all__ = ["redis_server", "redis_settings"]  # fixtures used by name below

SESSION_TOPIC = "mcp/session/s1/message"  # recorded by the default [history] record filters


async def until_health(fanout: RedisFanout, ok: bool) -> None:
    """Poll health until it is `ok` (Redis gives no event for its own death)."""
    with trio.fail_after(WAIT):
        while fanout.health().ok != ok:  # noqa: ASYNC110 - health() is a state, not an event
            await trio.sleep(0.01)


def flushall(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as client:
        client.flushall()


async def test_stopped_redis_degrades_health_and_refuses_publishes(
    redis_server: RedisServer, redis_settings: RedisSettings
) -> None:
    """Redis gone: the fan-out stays open, health says why, publish and watch raise
    FanoutUnavailable, reads raise HistoryUnavailable; both changes are logged once."""
    with capture_logs() as logs:
        async with open_instance(redis_settings, "a") as a:
            await a.watch("t/1")
            assert a.fanout.health().ok
            await trio.to_thread.run_sync(redis_server.stop)
            await until_health(a.fanout, ok=False)
            health = a.fanout.health()
            with trio.fail_after(WAIT):
                with pytest.raises(FanoutUnavailable):
                    await a.fanout.publish([draft("t/1", "lost")])
                with pytest.raises(FanoutUnavailable):
                    await a.fanout.watch("t/2")
                with pytest.raises(HistoryUnavailable):
                    await a.history.read(SESSION_TOPIC, Position("e", 1))
            await trio.to_thread.run_sync(redis_server.start)
            await until_health(a.fanout, ok=True)
            [message] = await a.publish(draft("t/1", "after"))
            await a.inbox.wait_for(message)

    assert "redis unreachable" in health.detail
    events = [entry for entry in logs if entry["event"].startswith("fanout.")]
    assert [entry["event"] for entry in events] == ["fanout.degraded", "fanout.recovered"]
    assert "redis unreachable" in events[0]["reason"]


async def test_a_restart_mid_stream_loses_nothing_recorded(redis_server: RedisServer) -> None:
    """Redis restarted (empty) while A publishes a stream: B re-subscribes and refills from the
    stream, so it receives every message whose publish returned, in order, none twice."""
    settings = settings_for(redis_server, publish_timeout=WAIT)
    total, restart_at = 300, 100
    published: list[Message] = []
    async with (
        open_instance(settings, "a") as a,
        open_instance(settings, "b") as b,
    ):
        await b.watch(SESSION_TOPIC)

        async def stream() -> None:
            for n in range(total):
                published.extend(await a.publish(draft(SESSION_TOPIC, n, record=True)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await b.inbox.wait_until(lambda: len(b.inbox.messages) >= restart_at)
            await trio.to_thread.run_sync(redis_server.restart)
        await b.inbox.wait_until(lambda: published[-1] in b.inbox.messages)
        stats = b.fanout.stats()

    received = b.inbox.messages
    assert [m.payload for m in published] == list(range(total))
    # A publish whose reply died with the server may have been retried: its payload can
    # come twice, under two positions. No position comes twice, and none published is missing.
    assert len({m.position for m in received}) == len(received)
    assert {m.position for m in published} <= {m.position for m in received}
    assert [m.payload for m in received] == sorted(m.payload for m in received)
    assert stats["connections"] >= 2


async def test_refill_after_an_outage_delivers_what_was_recorded_meanwhile(
    redis_server: RedisServer,
) -> None:
    """B loses its pub/sub connection while A keeps publishing; once B is back it delivers
    the recorded messages it missed from the stream, and not the unrecorded ones."""
    settings = settings_for(redis_server)
    async with (
        open_instance(settings, "a") as a,
        open_instance(settings, "b") as b,
    ):
        await b.watch(SESSION_TOPIC, "mcp/other")
        [before] = await a.publish(draft(SESSION_TOPIC, "before", record=True))
        await b.inbox.wait_for(before)
        with redis.Redis.from_url(redis_server.url) as client:
            # Refuse new connections, then cut every pub/sub connection: B cannot be back
            # before A has published, so what B missed can only come from the refill.
            connected = client.info("clients")["connected_clients"]
            client.config_set("maxclients", connected - 2)
            assert client.client_kill_filter(_type="pubsub") == 2
            missed = await a.publish(
                draft(SESSION_TOPIC, "missed", record=True), draft("mcp/other", "unrecorded")
            )
            client.config_set("maxclients", 10_000)
        [after] = await a.publish(draft(SESSION_TOPIC, "after", record=True))
        await b.inbox.wait_for(after)
        stats = b.fanout.stats()

    on_session = [m for m in b.inbox.messages if m.topic == SESSION_TOPIC]
    assert on_session == [before, missed[0], after]
    assert stats["connections"] == 2
    assert stats["refilled"] >= 1  # "missed" (and "after", if it beat B back)


async def test_flushall_changes_the_epoch(
    redis_server: RedisServer, redis_settings: RedisSettings
) -> None:
    """A flushed Redis is a new life: old positions read as UNKNOWN_EPOCH with everything
    retained since, and new messages carry the new epoch."""
    async with open_instance(redis_settings, "a") as a:
        old = await a.publish(*(draft(SESSION_TOPIC, n, record=True) for n in range(3)))
        await trio.to_thread.run_sync(flushall, redis_server)
        new = await a.publish(draft(SESSION_TOPIC, "new", record=True))
        with trio.fail_after(WAIT):
            replay = await a.history.read(SESSION_TOPIC, old[0].position)

    assert new[0].position.epoch != old[0].position.epoch
    assert (list(replay.messages), replay.gap) == (new, Gap.UNKNOWN_EPOCH)


async def test_publish_timeout_waits_for_redis_to_come_back(redis_server: RedisServer) -> None:
    """With publish_timeout set, a publish made while Redis is down completes once it is back."""
    settings = settings_for(redis_server, publish_timeout=WAIT)
    async with open_instance(settings, "a") as a:
        await a.watch("p/t")
        await trio.to_thread.run_sync(redis_server.stop)
        await until_health(a.fanout, ok=False)
        async with trio.open_nursery() as nursery:
            results: list[Message] = []

            async def publish() -> None:
                results.extend(await a.publish(draft("p/t", "waited")))

            nursery.start_soon(publish)
            await trio.testing.wait_all_tasks_blocked()
            assert not results
            await trio.to_thread.run_sync(redis_server.start)
        await a.inbox.wait_for(results[0])
        stats = a.fanout.stats()

    assert stats["publish_failures"] >= 1


async def test_opening_with_redis_down_degrades_then_recovers(redis_server: RedisServer) -> None:
    """The fan-out opens even if Redis is unreachable, degraded; it connects when Redis starts."""
    settings = settings_for(redis_server)
    await trio.to_thread.run_sync(redis_server.stop)
    async with open_instance(settings, "a") as a:
        assert not a.fanout.health().ok
        await trio.to_thread.run_sync(redis_server.start)
        await until_health(a.fanout, ok=True)
        await a.watch("o/t")
        [message] = await a.publish(draft("o/t", 1))
        await a.inbox.wait_for(message)


async def test_the_probe_round_trips_through_pubsub(redis_settings: RedisSettings) -> None:
    """A probe published to the instance's own channel comes back, and is counted."""
    async with open_instance(redis_settings, "a") as a:
        with trio.fail_after(WAIT):
            assert await a.fanout.probe()
            assert await a.fanout.probe()
        stats = a.fanout.stats()
    assert (stats["probes_sent"], stats["probes_returned"]) == (2, 2)
    assert "probes_lost" not in stats


async def test_max_age_is_exact_on_read(redis_server: RedisServer) -> None:
    """Entries older than max_age are not replayed even while newer appends keep the stream
    alive, and their loss is reported."""
    settings = settings_for(redis_server)
    config = HistoryConfig(max_age=0.3)
    async with open_instance(settings, "a", config=config) as a:
        first = await a.history.append([draft("m/t", n, record=True) for n in range(2)])
        await trio.sleep(0.5)  # let max_age pass: the behaviour under test is expiry
        later = await a.history.append([draft("m/t", 2, record=True)])
        with trio.fail_after(WAIT):
            replay = await a.history.read("m/t", first[0].position)
    assert (list(replay.messages), replay.gap) == (later, Gap.TRIMMED)


async def test_a_lost_offset_counter_never_reuses_positions(
    redis_server: RedisServer, redis_settings: RedisSettings
) -> None:
    """If a topic's counter and stream vanish (expiry, eviction), new positions still come
    after every old one, and a read from an old position reports TRIMMED, not "complete"."""
    async with open_instance(redis_settings, "a") as a:
        old = await a.history.append([draft("c/t", n, record=True) for n in range(3)])
        with redis.Redis.from_url(redis_server.url) as client:
            prefix = redis_settings.key_prefix
            assert client.delete(f"{prefix}o:c/t", f"{prefix}s:c/t") == 2
        new = await a.history.append([draft("c/t", 3, record=True)])
        with trio.fail_after(WAIT):
            replay = await a.history.read("c/t", old[-1].position)
    assert new[0].position.offset > old[-1].position.offset
    assert (list(replay.messages), replay.gap) == (new, Gap.TRIMMED)
