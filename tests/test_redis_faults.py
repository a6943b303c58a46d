"""The Redis plugin when Redis fails: degraded health, refused publishes, reconnection, refill.

The servers here are private processes that the tests stop, restart (empty, on the same port)
and flush. Where Redis gives no event to wait on (a dead server), the tests poll the fan-out's
health with a short sleep inside `trio.fail_after`.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import redis
import trio
from structlog.testing import capture_logs

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutOutcomeUnknown, FanoutUnavailable
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


async def until_stat(fanout: RedisFanout, key: str, at_least: int) -> None:
    """Poll the fan-out's stats until `key` reaches `at_least` (the receiver's thread counts)."""
    with trio.fail_after(WAIT):
        while fanout.stats().get(key, 0) < at_least:  # noqa: ASYNC110 - a counter, no event
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
    # The watch on t/1 may have missed messages while the pub/sub connection was down.
    assert [entry["event"] for entry in events] == [
        "fanout.interrupted", "fanout.degraded", "fanout.recovered"]
    assert events[0]["filters"] == 1
    assert "redis unreachable" in events[1]["reason"]


async def test_a_restart_mid_stream_loses_nothing_recorded(redis_server: RedisServer) -> None:
    """Redis restarted (empty) while A publishes a stream: B re-subscribes and refills from the
    stream, so it receives every message whose publish returned, in order, none twice, or it
    reports the topic as interrupted (what Redis had not pushed to B died with it)."""
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
                # A msg_id: a publish whose outcome the restart made unknown is retried
                # (publish_timeout) only if dedup can absorb the retry.
                published.extend(await a.publish(
                    draft(SESSION_TOPIC, n, record=True, msg_id=f"m{n}")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await b.inbox.wait_until(lambda: len(b.inbox.messages) >= restart_at)
            await trio.to_thread.run_sync(redis_server.restart)
        await b.inbox.wait_until(lambda: published[-1] in b.inbox.messages)
        # The last message can arrive before B's receiver has noticed the restart (it may
        # have come through A's retry on a connection B had not lost yet): wait for it.
        await until_stat(b.fanout, "connections", 2)
        stats = b.fanout.stats()

    received = b.inbox.messages
    assert [m.payload for m in published] == list(range(total))
    # A publish whose reply died with the server may have been retried: its payload can
    # come twice, under two positions. No position comes twice, and none published is missing
    # unless B reported the topic interrupted: restarted empty, Redis loses what it had not
    # yet pushed to B, and B's refill (a new epoch) cannot tell whether anything was lost.
    assert len({m.position for m in received}) == len(received)
    missing = {m.position for m in published} - {m.position for m in received}
    reported = set().union(*(filters for _, filters in b.inbox.interruptions))
    assert not missing or SESSION_TOPIC in reported
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


# --- interruptions: every watch that may have missed something is reported (issue 9) --------

UNRECORDED = "u/1"
WILDCARD = "mcp/session/+/message"


def kill_pubsub_clients(server: RedisServer) -> None:
    """What Redis does to a subscriber over `client-output-buffer-limit pubsub`."""
    with redis.Redis.from_url(server.url) as client:
        client.client_kill_filter(_type="pubsub")


async def test_a_dropped_pubsub_connection_reports_what_the_refill_cannot_cover(
    redis_server: RedisServer,
) -> None:
    """Redis drops B's pub/sub connection (as it does to a lagging subscriber): B reports its
    wildcard and unrecorded watches as interrupted, once, after everything delivered before;
    the exact recorded topic is refilled completely, so it is not reported."""
    settings = settings_for(redis_server, publish_timeout=WAIT)
    async with open_instance(settings, "a") as a, open_instance(settings, "b") as b:
        await b.watch(UNRECORDED, WILDCARD, SESSION_TOPIC)
        before = await a.publish(draft(UNRECORDED, 1), draft(SESSION_TOPIC, 1, record=True))
        await b.inbox.wait_until(lambda: all(m in b.inbox.messages for m in before))
        delivered_before = len(b.inbox.messages)
        await trio.to_thread.run_sync(kill_pubsub_clients, redis_server)
        await until_stat(b.fanout, "connections", 2)
        after = await a.publish(draft(UNRECORDED, 2), draft(SESSION_TOPIC, 2, record=True))
        await b.inbox.wait_until(lambda: all(m in b.inbox.messages for m in after))
        stats = b.fanout.stats()

    assert b.inbox.interruptions == [(delivered_before, frozenset({UNRECORDED, WILDCARD}))]
    assert stats["interruptions"] == 1


async def test_a_restart_reports_every_watch_that_may_have_missed_something(
    redis_server: RedisServer,
) -> None:
    """Restarted empty, Redis has a new epoch: even the exact recorded topic's refill cannot
    prove it missed nothing after its last position, so it is reported too."""
    settings = settings_for(redis_server, publish_timeout=WAIT)
    async with open_instance(settings, "a") as a, open_instance(settings, "b") as b:
        await b.watch(UNRECORDED, WILDCARD, SESSION_TOPIC)
        before = await a.publish(draft(SESSION_TOPIC, 1, record=True))
        await b.inbox.wait_until(lambda: before[0] in b.inbox.messages)
        await trio.to_thread.run_sync(redis_server.restart)
        await until_stat(b.fanout, "connections", 2)
        after = await a.publish(draft(UNRECORDED, 2), draft(SESSION_TOPIC, 2, record=True))
        await b.inbox.wait_until(lambda: all(m in b.inbox.messages for m in after))

    reported = set().union(*(filters for _, filters in b.inbox.interruptions))
    assert reported == {UNRECORDED, WILDCARD, SESSION_TOPIC}
    assert all(count == 1 for count, _ in b.inbox.interruptions)  # after the first message


async def test_a_publish_timed_out_in_a_paused_redis_is_outcome_unknown(
    redis_server: RedisServer,
) -> None:
    """Redis paused (SIGSTOP) past socket_timeout: the publish fails as FanoutOutcomeUnknown,
    not as a plain FanoutUnavailable (which promises nothing was published), and indeed
    the message is delivered once Redis resumes."""
    settings = settings_for(redis_server, socket_timeout=0.5)
    async with open_instance(settings, "a") as a:
        await a.watch("p/1")
        redis_server.pause()
        try:
            with pytest.raises(FanoutOutcomeUnknown):
                await a.publish(draft("p/1", "maybe"))
        finally:
            redis_server.resume()
        await a.inbox.wait_until(lambda: [m.payload for m in a.inbox.messages] == ["maybe"])


async def test_a_call_cut_short_by_its_caller_returns_at_once(
    redis_server: RedisServer,
) -> None:
    """Redis paused: a caller's deadline (request_timeout, a shutdown's cancel) ends its wait
    at once; it is not held until socket_timeout, as it was while the bridge waited for its
    worker thread (a stop with Redis hung took socket_timeout per call)."""
    settings = settings_for(redis_server, socket_timeout=5.0)
    async with open_instance(settings, "a") as a:
        bridge = a.fanout.bridge
        redis_server.pause()
        try:
            with trio.fail_after(2.0):  # well under socket_timeout
                with trio.move_on_after(0.2) as cut:
                    await bridge.command("PING")
            assert cut.cancelled_caught
        finally:
            redis_server.resume()
        assert await bridge.command("PING") in (b"PONG", True)


async def test_an_unwatch_never_waits_on_a_paused_redis(redis_server: RedisServer) -> None:
    """The last watcher of a filter goes (a session closing) while Redis hangs: unwatch returns
    at once, the pub/sub thread being woken in the background; once Redis is back, the
    channel is unsubscribed."""
    settings = settings_for(redis_server, socket_timeout=5.0)
    async with open_instance(settings, "a") as a:
        await a.watch("p/1")
        redis_server.pause()
        try:
            with trio.fail_after(1.0):  # well under socket_timeout
                await a.fanout.unwatch("p/1")
        finally:
            redis_server.resume()
        channel = a.fanout.layout.subscription_for("p/1").name
        with redis.Redis.from_url(redis_server.url) as client, trio.fail_after(WAIT):
            while client.pubsub_numsub(channel)[0][1]:  # noqa: ASYNC110 - Redis has no event
                await trio.sleep(0.01)


async def test_a_publish_refused_before_it_was_sent_is_unavailable(
    redis_server: RedisServer,
) -> None:
    """Redis gone before the script could be sent: plain FanoutUnavailable, not unknown."""
    settings = settings_for(redis_server, socket_timeout=0.5)
    async with open_instance(settings, "a") as a:
        await trio.to_thread.run_sync(redis_server.stop)
        with pytest.raises(FanoutUnavailable) as raised:
            await a.publish(draft("p/1", "never"))
    assert not isinstance(raised.value, FanoutOutcomeUnknown)


async def test_an_unknown_outcome_with_msg_ids_is_retried_and_delivered_once(
    redis_server: RedisServer,
) -> None:
    """With publish_timeout and a msg_id, the publish whose outcome a pause made unknown is
    retried: dedup answers the retry with the original, delivered once."""
    settings = settings_for(redis_server, socket_timeout=0.5, publish_timeout=WAIT)
    async with open_instance(settings, "a") as a:
        await a.watch("p/1")
        redis_server.pause()
        async with trio.open_nursery() as nursery:
            results: list[Message] = []

            async def publish() -> None:
                results.extend(await a.publish(draft("p/1", "once", msg_id="k1")))

            nursery.start_soon(publish)
            await trio.sleep(1.5)
            redis_server.resume()
        await a.inbox.wait_for(results[0])
        await trio.sleep(0.2)  # a second copy would have arrived by now
        stats = a.fanout.stats()

    assert [m.payload for m in a.inbox.messages] == ["once"]
    assert stats["outcomes_unknown"] >= 1


def burst_then_kill_pubsub(server: RedisServer, channel: bytes, payloads: range) -> None:
    """Synchronously, while trio is blocked: publish one message (B's pub/sub thread takes it
    and waits for trio to hand it over), then the rest (they wait in B's socket), then have
    Redis close B's pub/sub connection behind them."""
    with redis.Redis.from_url(server.url) as client:
        first, *rest = payloads
        client.publish(channel, msgpack.packb(["e", first, False, "d/1", first, 0.0, None]))
        time.sleep(0.3)
        for n in rest:
            client.publish(channel, msgpack.packb(["e", n, False, "d/1", n, 0.0, None]))
        time.sleep(0.1)
        client.client_kill_filter(_type="pubsub")


async def test_messages_read_just_before_the_connection_broke_are_still_delivered(
    redis_server: RedisServer,
) -> None:
    """Messages that reached B's pub/sub socket before Redis closed it are delivered, then the
    interruption reported: the receiver used to drop the batch it was reading when the read
    hit the closed connection (a restarted Redis cannot refill them)."""
    settings = settings_for(redis_server)
    async with open_instance(settings, "b") as b:
        await b.watch("d/1")
        channel = b.fanout.layout.channel("d/1")
        # Blocks trio on purpose: B's pub/sub thread cannot hand anything over meanwhile.
        burst_then_kill_pubsub(redis_server, channel, range(1, 6))
        await b.inbox.wait_until(lambda: len(b.inbox.messages) >= 5)
        await until_stat(b.fanout, "connections", 2)

    assert [m.payload for m in b.inbox.messages] == [1, 2, 3, 4, 5]
    assert b.inbox.interruptions == [(5, frozenset({"d/1"}))]


async def test_a_recorded_topic_still_empty_is_not_reported_after_a_drop(
    redis_server: RedisServer,
) -> None:
    """A watched exact recorded topic on which nothing was ever published: a dropped pub/sub
    connection costs it nothing, so no interruption (its first offsets, from Redis' clock,
    once made the refill see a hole after offset 0); after a restart empty, it is reported."""
    empty = "mcp/session/empty/message"
    settings = settings_for(redis_server)
    async with open_instance(settings, "a") as a, open_instance(settings, "b") as b:
        await a.publish(draft(SESSION_TOPIC, 1, record=True))  # Redis has an epoch
        await b.watch(empty)
        await trio.to_thread.run_sync(kill_pubsub_clients, redis_server)
        await until_stat(b.fanout, "connections", 2)
        [first] = await a.publish(draft(empty, "first", record=True))
        await b.inbox.wait_for(first)
        assert b.inbox.interruptions == []
        await b.watch("mcp/session/empty2/message")
        await trio.to_thread.run_sync(redis_server.restart)
        await until_stat(b.fanout, "connections", 3)
        await b.inbox.wait_until(lambda: len(b.inbox.interruptions) >= 1)

    reported = set().union(*(filters for _, filters in b.inbox.interruptions))
    assert reported == {empty, "mcp/session/empty2/message"}
