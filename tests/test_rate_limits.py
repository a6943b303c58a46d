"""Rate limits against the real server ([limits]): `rate_limited`, the 4029 close, new
connections per peer (HTTP 429), security events and counters. Timing is asserted loosely:
only what holds on a slow, shared machine (a bucket never admits more than it may, a paced
client is never refused)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio
from trio_websocket import ConnectionClosed

from mqbroker.auth import token_hash
from mqbroker.config import (
    AuthConfig,
    Config,
    FanoutConfig,
    HistoryConfig,
    LimitsConfig,
    LogConfig,
    RoleConfig,
    RoleLimitsConfig,
    ServerConfig,
    TokenConfig,
)
from mqbroker.logs import configure
from mqbroker.protocol import (
    CloseCode,
    Delivery,
    Error,
    ErrorCode,
    Forget,
    Ping,
    Pong,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from mqbroker.server.http import exposition
from tests.harness import RawSession, raw_session, running_broker, session_of
from tests.rawws import RawWebSocket
from tests.redis_server import RedisServer


def limited(**limits: Any) -> Config:
    return Config(server=ServerConfig(port=0), limits=LimitsConfig(**limits))


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The broker's log as JSON lines; structlog is left as other test modules expect it."""
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    yield out
    structlog.reset_defaults()


def events_named(out: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line.get("event") == name]


async def drain(session: RawSession, count: int) -> list[Any]:
    """The next `count` events."""
    return [await session.next_event() for _ in range(count)]


async def until_closed(session: RawSession) -> tuple[list[Any], int]:
    """The events up to the broker's close, and its close code."""
    events: list[Any] = []
    with trio.fail_after(5):
        try:
            while True:
                events.append(await session.next_event())
        except ConnectionClosed as e:
            assert e.reason is not None
            return events, int(e.reason.code)


def rate_limited(events: list[Any]) -> list[Error]:
    return [e for e in events if isinstance(e, Error) and e.code == ErrorCode.RATE_LIMITED]


# --- off by default ----------------------------------------------------------------------------


async def test_with_no_limits_a_flood_is_served_in_full() -> None:
    """The defaults limit nothing: a frame of a thousand acknowledged publishes is acknowledged
    in full, as before [limits] existed."""
    async with running_broker() as broker, raw_session(broker.url) as session:
        await session.send(*(Publish(topic="t", payload=n, id=n) for n in range(1000)))
        replies = await drain(session, 1000)
        assert all(isinstance(reply, PubAck) for reply in replies)
        assert broker.broker.counters["security_rate_limited"] == 0


async def test_the_welcome_tells_the_limits_in_force() -> None:
    """Clients pace themselves by the welcome: the rates, the bursts as applied (0 in the config
    is one second's worth), and the violations allowed."""
    config = limited(publish_messages_per_second=50, publish_bytes_per_second=10_000,
                     publish_bytes_burst=20_000, requests_per_second=5, max_violations=4,
                     violation_window=2.5)
    async with running_broker(config) as broker, raw_session(broker.url, hello=False) as session:
        await session.send_frame(session.connection.hello("pacer"))
        welcome = await session.next_event()
    assert isinstance(welcome, Welcome)
    assert {key: welcome.limits[key] for key in (
        "publish_messages_per_second", "publish_messages_burst", "publish_bytes_per_second",
        "publish_bytes_burst", "requests_per_second", "requests_burst", "max_violations",
        "violation_window")} == {
        "publish_messages_per_second": 50.0, "publish_messages_burst": 50.0,
        "publish_bytes_per_second": 10_000.0, "publish_bytes_burst": 20_000.0,
        "requests_per_second": 5.0, "requests_burst": 5.0, "max_violations": 4,
        "violation_window": 2.5}


# --- per session -------------------------------------------------------------------------------


async def test_a_flooding_session_is_limited_then_closed_while_a_paced_one_keeps_its_rate(
        log_lines: io.StringIO) -> None:
    """The issue's case: a session publishing far over its rate gets `rate_limited` for what is
    over (and none of that is delivered), then 4029 after max_violations frames; a session
    beside it, publishing at a fraction of the rate, has every publish acknowledged."""
    config = limited(publish_messages_per_second=50, max_violations=3, violation_window=60)
    async with running_broker(config) as broker, \
            raw_session(broker.url) as watcher, \
            raw_session(broker.url) as flooder, \
            raw_session(broker.url) as paced:
        await watcher.send(Subscribe(id=1, filter="flood"), Subscribe(id=2, filter="paced"))
        assert [type(e) for e in await drain(watcher, 2)] == [SubAck, SubAck]
        paced_acks: list[Any] = []

        async def pace() -> None:
            for n in range(20):
                await paced.send(Publish(topic="paced", payload=n, id=n))
                paced_acks.append(await paced.next_event())
                await trio.sleep(0.05)  # 20/s against a limit of 50/s

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pace)
            flood_replies: list[Any] = []
            for frame in range(3):
                await flooder.send(*(Publish(topic="flood", payload=n, id=frame * 1000 + n)
                                     for n in range(200)))
                if frame < 2:
                    flood_replies += await drain(flooder, 200)
            # The third violation closes the session at once: the rest of that frame is not
            # carried out, nor answered.
            last, code = await until_closed(flooder)
            assert code == CloseCode.RATE_LIMITED
            flood_replies += last
        elapsed = trio.current_time() - started

        acked = [r for r in flood_replies if isinstance(r, PubAck)]
        refused = rate_limited(flood_replies)
        assert len(acked) + len(refused) == len(flood_replies) >= 400
        assert 50 <= len(acked) <= 50 + 50 * elapsed
        assert all(error.ref == "publish" and error.id is not None for error in refused)
        assert all(isinstance(ack, PubAck) for ack in paced_acks)
        # What the watcher got from the flood is exactly what was acknowledged.
        deliveries = await drain(watcher, len(acked) + 20)
        flood_seen = [d for d in deliveries if isinstance(d, Delivery) and d.topic == "flood"]
        assert len(flood_seen) == len(acked)
        await broker.wait_sessions(3)
        counters = broker.broker.counters
    assert counters["security_rate_limited"] == len(refused)
    assert counters["security_violations_exceeded"] == 1
    assert counters["sessions_closed_rate_limited"] == 1
    # One log line per session per window, not one per refused publish.
    [logged] = events_named(log_lines, "security.rate_limited")
    assert logged["limit"] == "publish_messages_per_second"
    [exceeded] = events_named(log_lines, "security.violations_exceeded")
    assert logged["session"] == exceeded["session"] and "peer" in exceeded


async def test_publishes_without_id_over_the_limit_get_one_error_per_frame() -> None:
    """Nothing to tell them apart by: a frame of unacknowledged publishes over the limit is
    answered with one `rate_limited` error, and only those within the limit are delivered."""
    config = limited(publish_messages_per_second=1, publish_messages_burst=10)
    async with running_broker(config) as broker, \
            raw_session(broker.url) as watcher, raw_session(broker.url) as publisher:
        await watcher.send(Subscribe(id=1, filter="t"))
        await watcher.next_event()
        await publisher.send(*(Publish(topic="t", payload=n) for n in range(100)))
        await publisher.send(Publish(topic="t", payload="marker", id=1))
        [error] = await publisher.receive()
        assert isinstance(error, Error) and error.code == ErrorCode.RATE_LIMITED
        assert error.id is None and error.ref == "publish"
        # The marker went into a second frame: refused (the bucket is empty) and answered.
        [marker] = await publisher.receive()
        assert isinstance(marker, Error) and marker.id == 1
        delivered = await drain(watcher, 10)
        assert [d.payload for d in delivered if isinstance(d, Delivery)] == list(range(10))
        with trio.move_on_after(0.2):
            extra = await watcher.next_event()
            raise AssertionError(f"delivered past the burst: {extra}")


async def test_bytes_per_second_counts_topic_and_payload() -> None:
    config = limited(publish_bytes_per_second=1, publish_bytes_burst=1000)
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        await session.send(Publish(topic="t", payload=b"x" * 600, id=1),
                           Publish(topic="t", payload=b"x" * 600, id=2),
                           Publish(topic="t", payload=b"x" * 300, id=3))
        replies = await drain(session, 3)
    # Refusals are answered at once, acknowledgements once published: sorted by id.
    first, second, third = sorted(replies, key=lambda reply: reply.id)
    assert isinstance(first, PubAck)
    assert isinstance(second, Error) and second.code == ErrorCode.RATE_LIMITED
    assert "publish_bytes_per_second" in second.message
    assert isinstance(third, PubAck)  # a refused publish took nothing from the bucket


async def test_subscribe_unsubscribe_and_forget_share_the_request_rate() -> None:
    """Over requests_per_second, a subscribe is refused and not made: what is published on its
    filter is not delivered; pings are not limited."""
    config = limited(requests_per_second=0.01, requests_burst=2)
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        await session.send(Subscribe(id=1, filter="a"), Unsubscribe(id=1),
                           Subscribe(id=2, filter="b"), Forget(id=3, filter="c"))
        replies = await drain(session, 4)
        assert [type(r).__name__ for r in replies[:2]] == ["SubAck", "UnsubAck"]
        assert [(e.id, e.ref) for e in rate_limited(replies[2:])] == [(2, "subscribe"),
                                                                      (3, "forget")]
        await session.send(Publish(topic="b", payload=1, id=9))
        assert isinstance(await session.next_event(), PubAck)
        with trio.move_on_after(0.2):
            raise AssertionError(f"delivered to a refused subscribe: {await session.next_event()}")


# --- per peer ----------------------------------------------------------------------------------


async def test_new_connections_per_peer_over_the_rate_get_429(log_lines: io.StringIO) -> None:
    """Past its burst, a peer's new connection is answered 429 before any handshake; the
    connections it already has are unaffected."""
    config = limited(connections_per_second_per_peer=0.01, connections_burst_per_peer=2)
    async with running_broker(config) as broker:
        port = broker.listener.port
        first = await RawWebSocket.open_tcp(port)
        assert await first.handshake() == 101
        second = await RawWebSocket.open_tcp(port)
        assert await second.handshake() == 101
        statuses = []
        for _ in range(5):
            ws = await RawWebSocket.open_tcp(port)
            statuses.append(await ws.handshake())
            ws.close()
        assert statuses == [429] * 5
        counters = broker.broker.counters
        assert counters["connections_rate_limited"] == 5
        assert counters["connections_refused"] == 0
        first.close()
        second.close()
        metrics = exposition(counters, instance="test", healthy=True)
    assert "mqbroker_connections_rate_limited_total 5" in metrics
    assert "mqbroker_security_rate_limited_total 0" in metrics
    [logged] = events_named(log_lines, "security.rate_limited")
    assert logged["peer"] == "127.0.0.1" and logged["limit"] == "connections_per_second_per_peer"


async def test_the_limits_hold_with_the_redis_fanout_too(redis_server: RedisServer) -> None:
    """With a fan-out that is not local, publishes go through the session's publishing task
    (another path than the memory fan-out's): they are limited before it, the same way."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                    fanout=FanoutConfig(plugin="redis"),
                    plugins={"redis": {"url": redis_server.url, "key_prefix": "rl:"}},
                    limits=LimitsConfig(publish_messages_per_second=0.01,
                                        publish_messages_burst=5))
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        await session.send(*(Publish(topic="t", payload=n, id=n) for n in range(8)))
        replies = await drain(session, 8)
        await session.send(Publish(topic="t", payload=8, id=8))
        [last] = await session.receive()
    assert sorted(r.id for r in replies if isinstance(r, PubAck)) == [0, 1, 2, 3, 4]
    assert sorted(e.id for e in rate_limited(replies)) == [5, 6, 7]  # type: ignore[misc]
    assert isinstance(last, Error) and last.code == ErrorCode.RATE_LIMITED


# --- per role ([auth.roles.NAME.limits]) -------------------------------------------------------

ROLE_TOKENS = {"enduser": "token-of-enduser-0001", "service": "token-of-service-0002",
               "both": "token-of-both-000003", "reader": "token-of-reader-00004"}


def role_limited() -> Config:
    """[limits] at 5 publishes/s; end users at 20/s, a broadcast service at 200/s."""
    everything = ("#",)
    roles = {
        "user": RoleConfig(publish=everything, limits=RoleLimitsConfig(
            publish_messages_per_second=20, max_violations=1000)),
        "broadcaster": RoleConfig(publish=everything, limits=RoleLimitsConfig(
            publish_messages_per_second=200, requests_per_second=50, max_violations=1000)),
        "reader": RoleConfig(publish=everything, subscribe=everything),
    }
    members = {"enduser": ("user",), "service": ("broadcaster",),
               "both": ("user", "broadcaster"), "reader": ("reader",)}
    tokens = tuple(TokenConfig(sha256=token_hash(ROLE_TOKENS[name]), principal=name,
                               roles=member_of) for name, member_of in members.items())
    return Config(server=ServerConfig(port=0),
                  limits=LimitsConfig(publish_messages_per_second=5, requests_per_second=1),
                  auth=AuthConfig(mode="token", roles=roles, tokens=tokens))


async def test_the_welcome_tells_each_session_its_own_limits() -> None:
    """Sessions of one broker are told their principal's limits: its roles' (combined, for a
    principal with two), or [limits] for one whose roles set none."""
    told: dict[str, dict[str, Any]] = {}
    async with running_broker(role_limited()) as broker:
        for name, token in ROLE_TOKENS.items():
            async with session_of(broker.url, token) as (_, welcome):
                assert isinstance(welcome, Welcome)
                told[name] = welcome.limits
    rate = {name: (limits["publish_messages_per_second"], limits["publish_messages_burst"],
                   limits["requests_per_second"]) for name, limits in told.items()}
    assert rate == {"enduser": (20.0, 20.0, 1.0), "service": (200.0, 200.0, 50.0),
                    "both": (200.0, 200.0, 50.0), "reader": (5.0, 5.0, 1.0)}
    assert told["enduser"]["max_violations"] == 1000 and told["reader"]["max_violations"] == 10
    assert told["enduser"]["max_frame_bytes"] == told["reader"]["max_frame_bytes"]


async def test_two_principals_flooding_side_by_side_are_each_limited_at_their_own_rate(
        ) -> None:
    """An end user (20/s) and a broadcast service (200/s) flood at once, four frames of 400
    acknowledged publishes each, a quarter of a second apart: each gets its burst plus its
    own rate over the time between its first and last frame, never more."""
    rounds, per_frame, pause = 4, 400, 0.25
    acked: dict[str, int] = {}
    spans: dict[str, float] = {}

    async def flood(url: str, name: str) -> None:
        async with session_of(url, ROLE_TOKENS[name]) as (session, welcome):
            assert isinstance(welcome, Welcome)
            started = trio.current_time()
            replies: list[Any] = []
            for frame in range(rounds):
                if frame:
                    await trio.sleep(pause)
                await session.send(*(Publish(topic=f"t/{name}", payload=n, id=n)
                                     for n in range(frame * per_frame, (frame + 1) * per_frame)))
                replies += await drain(session, per_frame)
            spans[name] = trio.current_time() - started
        assert len(rate_limited(replies)) + sum(isinstance(r, PubAck) for r in replies) == len(
            replies)
        acked[name] = sum(isinstance(r, PubAck) for r in replies)

    async with running_broker(role_limited()) as broker, trio.open_nursery() as nursery:
        nursery.start_soon(flood, broker.url, "enduser")
        nursery.start_soon(flood, broker.url, "service")
    for name, rate in [("enduser", 20), ("service", 200)]:
        # At least what refilled between the first frame (handled before the first pause)
        # and the last; at most the burst and what refilled over the whole run.
        least = rate + rate * pause * (rounds - 1)
        assert least - 1 <= acked[name] <= rate + rate * spans[name] + 1, (name, acked, spans)


async def test_the_frame_that_closes_a_session_delivers_nothing_it_does_not_acknowledge() -> None:
    """A run of publishes whose refusal is the last violation allowed: the session closes at
    once, answering nothing more, so the publish admitted before the refusal in that run is
    not carried out either (it was delivered to subscribers without a puback: the publisher
    could not tell it had been published)."""
    config = limited(publish_messages_per_second=1, publish_messages_burst=1, max_violations=1)
    async with running_broker(config) as broker, \
            raw_session(broker.url) as watcher, raw_session(broker.url) as flooder:
        await watcher.send(Subscribe(id=1, filter="flood"))
        assert await watcher.next_event() == SubAck(id=1)
        await flooder.send(Publish(topic="flood", payload=1, id=1),
                           Publish(topic="flood", payload=2, id=2))
        replies, code = await until_closed(flooder)
        assert code == CloseCode.RATE_LIMITED
        assert not [r for r in replies if isinstance(r, PubAck)]
        await watcher.send(Ping(id=9))
        assert await watcher.next_event() == Pong(id=9)  # nothing was delivered before it
