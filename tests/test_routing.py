"""End-to-end routing over real WebSocket sessions: what reaches whom, exactly once, in order."""

from __future__ import annotations

import trio

from mqbroker.client import connect
from mqbroker.protocol import Delivery, Format, PubAck, Publish, SubAck, Subscribe
from tests.harness import RunningBroker, raw_session


async def test_one_copy_lists_every_matching_subscription(broker: RunningBroker) -> None:
    """A session subscribed to `mcp/session/+/message` and `#` gets one copy naming both ids."""
    async with raw_session(broker.url) as subscriber, raw_session(broker.url) as publisher:
        await subscriber.send(Subscribe(id=1, filter="mcp/session/+/message"),
                              Subscribe(id=2, filter="#"))
        assert {type(e) for e in [await subscriber.next_event() for _ in range(2)]} == {SubAck}
        await publisher.send(Publish(topic="mcp/session/s1/message", payload="hi", id=7))
        ack = await publisher.next_event()
        assert isinstance(ack, PubAck)
        delivery = await subscriber.next_event()
        assert isinstance(delivery, Delivery)
        assert delivery.subs == (1, 2)
        assert (delivery.topic, delivery.payload, delivery.event) == (
            "mcp/session/s1/message", "hi", ack.event)


async def test_dollar_topics_do_not_match_leading_wildcards(broker: RunningBroker) -> None:
    """MQTT-4.7.2-1: `$SYS/x` is not delivered to `#` or `+/x`, but is to `$SYS/#`."""
    async with connect(broker.url) as client:
        everything = await client.subscribe("#")
        plus = await client.subscribe("+/x")
        system = await client.subscribe("$SYS/#")
        await client.publish("$SYS/x", 1)
        await client.publish("after/x", 2)
        with trio.fail_after(5):
            assert (await system.__anext__()).topic == "$SYS/x"
            assert (await everything.__anext__()).topic == "after/x"
            assert (await plus.__anext__()).topic == "after/x"


async def test_messages_arrive_in_publish_order(broker: RunningBroker) -> None:
    """One publisher's messages on one topic arrive in the order published, none lost."""
    async with connect(broker.url) as subscriber, connect(broker.url) as publisher:
        subscription = await subscriber.subscribe("orders/+")
        for n in range(500):
            await publisher.publish("orders/1", n, ack=False)
        await publisher.publish("orders/1", "end")
        received = []
        with trio.fail_after(10):
            async for message in subscription:
                received.append(message.payload)
                if message.payload == "end":
                    break
        assert received == [*range(500), "end"]


async def test_unsubscribe_stops_delivery(broker: RunningBroker) -> None:
    """After unsuback, the session no longer receives messages for that subscription."""
    async with connect(broker.url) as client:
        gone = await client.subscribe("a/b")
        kept = await client.subscribe("a/+")
        await gone.unsubscribe()
        await client.publish("a/b", 1)
        with trio.fail_after(5):
            message = await kept.__anext__()
        assert message.payload == 1
        assert broker.broker.index.filters_of(next(iter(broker.broker.sessions))) == {
            kept.id: "a/+"}


async def test_json_and_msgpack_sessions_interoperate(broker: RunningBroker) -> None:
    """A JSON session receives a msgpack publisher's bytes payload as {"$base64": ...} and back."""
    async with raw_session(broker.url, fmt=Format.JSON) as browser, \
            connect(broker.url) as publisher:
        await browser.send(Subscribe(id=1, filter="bin"))
        await browser.next_event()
        await publisher.publish("bin", b"\x00\xff")
        raw = await browser.ws.get_message()
        assert isinstance(raw, str) and '"payload":{"$base64":"AP8="}' in raw
        subscription = await publisher.subscribe("back")
        await browser.send(Publish(topic="back", payload=b"\x01"))
        with trio.fail_after(5):
            assert (await subscription.__anext__()).payload == b"\x01"


async def test_batches_in_both_directions(broker: RunningBroker) -> None:
    """A frame may carry a batch: each event is answered, and queued deliveries coalesce."""
    async with raw_session(broker.url) as session:
        await session.send(Subscribe(id=1, filter="t"),
                           *[Publish(topic="t", payload=n, id=100 + n) for n in range(50)])
        events = []
        frames = 0
        def count(kind: type) -> int:
            return sum(isinstance(e, kind) for e in events)

        while count(Delivery) < 50 or count(PubAck) < 50:
            events += await session.receive()
            frames += 1
        assert [e.payload for e in events if isinstance(e, Delivery)] == list(range(50))
        assert sorted(e.id for e in events if isinstance(e, PubAck)) == [100 + n for n in range(50)]
        assert frames < 50  # coalesced: fewer frames than messages


async def test_closed_sessions_are_counted_by_close_code(broker: RunningBroker) -> None:
    """Every session close is counted, by its code: the client's normal close as `normal`."""
    async with connect(broker.url):
        pass
    await broker.wait_sessions(0)
    counters = broker.broker.counters
    assert (counters["sessions_closed"], counters["sessions_closed_normal"]) == (1, 1)
