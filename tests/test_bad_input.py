"""Bad input: every kind gets its documented error, the session stays usable where the protocol
says so, and other sessions never notice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgpack
import pytest
import trio

from mqbroker.protocol import (
    CloseCode,
    Delivery,
    Error,
    ErrorCode,
    Format,
    HandshakeFailed,
    Hello,
    Ping,
    Pong,
    Publish,
    SubAck,
    Subscribe,
    Unsubscribe,
)
from tests.harness import RawSession, RunningBroker, broker_config, raw_session, running_broker


@pytest.fixture
async def bystander(broker: RunningBroker) -> AsyncIterator[RawSession]:
    """A well-behaved session subscribed to `watch`, to show it never notices the others."""
    async with raw_session(broker.url) as session:
        await session.send(Subscribe(id=1, filter="watch"))
        assert isinstance(await session.next_event(), SubAck)
        yield session


async def expect_error(session: RawSession, code: ErrorCode) -> Error:
    event = await session.next_event()
    assert isinstance(event, Error), event
    assert event.code == code, event
    assert event.message
    return event


async def still_usable(session: RawSession, bystander: RawSession) -> None:
    """The offender can still publish, and the bystander still receives."""
    await session.send(Publish(topic="watch", payload="ok", id=99))
    assert (await session.next_event()).OP == "puback"
    delivery = await bystander.next_event()
    assert isinstance(delivery, Delivery) and delivery.payload == "ok"


BAD_FRAMES = [
    pytest.param(b"\xc1", ErrorCode.BAD_FRAME, id="malformed-msgpack"),
    pytest.param(msgpack.packb(5), ErrorCode.BAD_FRAME, id="not-a-map"),
    pytest.param(msgpack.packb([]), ErrorCode.BAD_FRAME, id="empty-batch"),
    pytest.param(msgpack.packb({"topic": "x"}), ErrorCode.UNKNOWN_OP, id="no-op"),
    pytest.param(msgpack.packb({"op": "launch"}), ErrorCode.UNKNOWN_OP, id="unknown-op"),
    pytest.param(msgpack.packb({"op": "publish"}), ErrorCode.BAD_EVENT, id="missing-field"),
    pytest.param(msgpack.packb({"op": "publish", "topic": 3}), ErrorCode.BAD_EVENT,
                 id="wrong-type"),
    pytest.param(msgpack.packb({"op": "subscribe", "id": -1, "filter": "a"}),
                 ErrorCode.BAD_EVENT, id="negative-id"),
    pytest.param(msgpack.packb({"op": "subscribe", "id": True, "filter": "a"}),
                 ErrorCode.BAD_EVENT, id="bool-as-id"),
    pytest.param(msgpack.packb({"op": "hello", "version": 1}), ErrorCode.ALREADY_HELLO,
                 id="second-hello"),
    pytest.param(msgpack.packb({"op": "publish", "topic": "watch", "payload": {b"k": 1}}),
                 ErrorCode.BAD_EVENT, id="binary-map-key"),
    pytest.param(msgpack.packb({"op": "publish", "topic": "watch",
                                "payload": msgpack.ExtType(5, b"x")}),
                 ErrorCode.BAD_EVENT, id="extension-type"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frames_get_errors(broker: RunningBroker, bystander: RawSession,
                                     frame: bytes, code: ErrorCode) -> None:
    """Each malformed frame or event is answered with its error code; nothing else happens."""
    async with raw_session(broker.url) as session:
        await session.send_frame(frame)
        await expect_error(session, code)
        await still_usable(session, bystander)


@pytest.mark.parametrize(("frame", "code"), [
    pytest.param('{"op": "publish", ', ErrorCode.BAD_FRAME, id="malformed"),
    pytest.param('{"op": "publish", "topic": "watch", "payload": NaN}', ErrorCode.BAD_FRAME,
                 id="nan"),
    pytest.param('{"op": "publish", "topic": "watch", "payload": [1180591620717411303424]}',
                 ErrorCode.BAD_EVENT, id="integer-beyond-64-bits"),
])
async def test_bad_json_frames_get_errors(broker: RunningBroker, bystander: RawSession,
                                          frame: str, code: ErrorCode) -> None:
    """A text frame that is not JSON, or holds what msgpack sessions could not receive, is
    refused; the bystander (a msgpack session) never sees it."""
    async with raw_session(broker.url, fmt=Format.JSON) as session:
        await session.send_frame(frame)
        await expect_error(session, code)
        await still_usable(session, bystander)


async def test_a_json_subscriber_survives_binary_payloads(broker: RunningBroker) -> None:
    """Binary payloads from msgpack publishers reach JSON subscribers as {"$base64": ...},
    nested ones too; nothing a publisher may send breaks another session's delivery."""
    async with raw_session(broker.url, fmt=Format.JSON) as browser, \
            raw_session(broker.url) as publisher:
        await browser.send(Subscribe(id=1, filter="bin"))
        await browser.next_event()
        await publisher.send(Publish(topic="bin", payload={"a": [b"\x00", {"b": b"\x01"}]}))
        delivery = await browser.next_event()
        assert isinstance(delivery, Delivery)
        assert delivery.payload == {"a": [b"\x00", {"b": b"\x01"}]}


async def test_errors_carry_the_request_id(broker: RunningBroker) -> None:
    """An error answering a request names its id and operation, even for a bad field."""
    async with raw_session(broker.url) as session:
        await session.send_frame(msgpack.packb({"op": "subscribe", "id": 5, "filter": 7}))
        error = await expect_error(session, ErrorCode.BAD_EVENT)
        assert (error.id, error.ref) == (5, "subscribe")


INVALID_REQUESTS = [
    pytest.param(Publish(topic="a/+", payload=1, id=1), ErrorCode.INVALID_TOPIC, id="wildcard"),
    pytest.param(Publish(topic="", payload=1, id=1), ErrorCode.INVALID_TOPIC, id="empty-topic"),
    pytest.param(Publish(topic="a\x00b", payload=1, id=1), ErrorCode.INVALID_TOPIC, id="nul"),
    pytest.param(Publish(topic="x" * 2000, payload=1, id=1), ErrorCode.INVALID_TOPIC,
                 id="too-long"),
    pytest.param(Publish(topic="/".join("x" * 40), payload=1, id=1), ErrorCode.INVALID_TOPIC,
                 id="too-deep"),
    pytest.param(Subscribe(id=1, filter="a/#/b"), ErrorCode.INVALID_FILTER, id="bad-hash"),
    pytest.param(Subscribe(id=1, filter="a+"), ErrorCode.INVALID_FILTER, id="bad-plus"),
    pytest.param(Subscribe(id=1, filter="a/+", since="e-1"), ErrorCode.SINCE_UNSUPPORTED,
                 id="since-on-wildcard"),
    pytest.param(Subscribe(id=1, filter="a", since="not an id"), ErrorCode.BAD_EVENT_ID,
                 id="bad-since"),
    pytest.param(Unsubscribe(id=42), ErrorCode.UNKNOWN_SUBSCRIPTION, id="unknown-sub"),
]


@pytest.mark.parametrize(("event", "code"), INVALID_REQUESTS)
async def test_invalid_requests_get_errors(broker: RunningBroker, bystander: RawSession,
                                           event: Publish | Subscribe | Unsubscribe,
                                           code: ErrorCode) -> None:
    """Invalid topics, filters and ids are refused with their code and the request's id."""
    async with raw_session(broker.url) as session:
        await session.send(event)
        error = await expect_error(session, code)
        assert (error.id, error.ref) == (event.id, event.OP)
        await still_usable(session, bystander)


async def test_duplicate_subscription_id_is_refused(broker: RunningBroker) -> None:
    """A subscription id already in use on the session is refused; the first one stays."""
    async with raw_session(broker.url) as session:
        await session.send(Subscribe(id=1, filter="a"), Subscribe(id=1, filter="b"))
        assert isinstance(await session.next_event(), SubAck)
        await expect_error(session, ErrorCode.DUPLICATE_SUBSCRIPTION)


async def test_too_many_subscriptions() -> None:
    """Past max_subscriptions, a subscribe is refused; the others keep working."""
    async with running_broker(broker_config(max_subscriptions=2)) as broker, \
            raw_session(broker.url) as session:
        await session.send(*[Subscribe(id=n, filter=f"t/{n}") for n in range(3)])
        assert isinstance(await session.next_event(), SubAck)
        assert isinstance(await session.next_event(), SubAck)
        await expect_error(session, ErrorCode.TOO_MANY_SUBSCRIPTIONS)


async def test_too_many_wildcard_subscriptions_in_one_session() -> None:
    """Past max_wildcard_subscriptions, a session's wildcard subscribe is refused with
    too_many_subscriptions; exact filters are still accepted, and so is a wildcard once one of
    its wildcard subscriptions is gone."""
    async with running_broker(broker_config(max_wildcard_subscriptions=2)) as broker, \
            raw_session(broker.url) as session:
        await session.send(Subscribe(id=1, filter="a/+"), Subscribe(id=2, filter="a/#"),
                           Subscribe(id=3, filter="+/b"), Subscribe(id=4, filter="a/b"))
        assert isinstance(await session.next_event(), SubAck)
        assert isinstance(await session.next_event(), SubAck)
        error = await expect_error(session, ErrorCode.TOO_MANY_SUBSCRIPTIONS)
        assert error.id == 3 and "max_wildcard_subscriptions" in error.message
        assert await session.next_event() == SubAck(id=4)
        await session.send(Unsubscribe(id=1), Subscribe(id=5, filter="+/b"))
        assert (await session.next_event()).OP == "unsuback"
        assert await session.next_event() == SubAck(id=5)


async def test_too_many_wildcard_subscriptions_in_all() -> None:
    """Past max_wildcard_filters, counted over every session of the instance, a wildcard
    subscribe is refused with too_many_subscriptions; a session that closes gives its back."""
    config = broker_config(max_wildcard_filters=2)
    async with running_broker(config) as broker, raw_session(broker.url) as second:
        async with raw_session(broker.url) as first:
            await first.send(Subscribe(id=1, filter="a/+"), Subscribe(id=2, filter="a/+"))
            assert isinstance(await first.next_event(), SubAck)
            assert isinstance(await first.next_event(), SubAck)
            await second.send(Subscribe(id=1, filter="b/#"), Subscribe(id=2, filter="b"))
            error = await expect_error(second, ErrorCode.TOO_MANY_SUBSCRIPTIONS)
            assert "max_wildcard_filters" in error.message
            assert await second.next_event() == SubAck(id=2)
        await broker.wait_sessions(1)
        await second.send(Subscribe(id=3, filter="b/#"))
        assert await second.next_event() == SubAck(id=3)


async def test_message_too_large_is_refused() -> None:
    """A payload that would not fit in a delivery frame is refused with message_too_large."""
    async with running_broker(broker_config(max_frame_bytes=4096)) as broker, \
            raw_session(broker.url) as session:
        await session.send(Publish(topic="t", payload=b"x" * 3500, id=1))
        await expect_error(session, ErrorCode.MESSAGE_TOO_LARGE)
        await session.send(Ping(id=2))
        assert await session.next_event() == Pong(id=2)


async def test_oversized_frame_closes_with_1009(bystander: RawSession) -> None:
    """A frame over max_frame_bytes closes that session with 1009; others carry on."""
    async with running_broker(broker_config(max_frame_bytes=4096)) as broker, \
            raw_session(broker.url) as session:
        await session.send(Publish(topic="t", payload=b"x" * 5000))
        assert await session.closed_with() == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("first", [
    pytest.param(Ping(), id="no-hello"),
    pytest.param(Hello(version=99), id="unsupported-version"),
])
async def test_bad_handshake_closes_with_4000(broker: RunningBroker, first: Ping | Hello) -> None:
    """The first event must be a supported hello: else an error, then close 4000."""
    async with raw_session(broker.url, hello=False) as session:
        await session.send(first)
        with pytest.raises(HandshakeFailed) as refused:
            await session.next_event()
        assert refused.value.error.code in (ErrorCode.HELLO_REQUIRED,
                                            ErrorCode.UNSUPPORTED_VERSION)
        assert await session.closed_with() == CloseCode.HANDSHAKE_FAILED


async def test_no_hello_in_time_closes_with_4000() -> None:
    """A connection that never says hello is closed after hello_timeout."""
    async with running_broker(broker_config(hello_timeout=0.2)) as broker, \
            raw_session(broker.url, hello=False) as session:
        assert await session.closed_with() == CloseCode.HANDSHAKE_FAILED


async def test_idle_session_closes_with_4001() -> None:
    """A session that sends nothing for idle_timeout is closed with 4001; pings keep it open."""
    config = broker_config(idle_timeout=0.5, ping_interval=0.1)
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        for n in range(4):
            await trio.sleep(0.2)  # the behaviour under test is the passing of time
            await session.send(Ping(id=n))
            assert await session.next_event() == Pong(id=n)
        assert await session.closed_with() == CloseCode.IDLE_TIMEOUT
