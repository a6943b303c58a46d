"""The broker without sockets: sessions are mqbroker.testing.MemorySession objects, so these
tests see exactly what the broker queues for each session and when it flushes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.protocol import Delivery, Error, ErrorCode, PubAck, Publish, SubAck, Subscribe
from mqbroker.testing import MemorySession, watching


@asynccontextmanager
async def broker(**server: object) -> AsyncIterator[Broker]:
    config = Config(server=ServerConfig(port=0, **server),  # type: ignore[arg-type]
                    history=HistoryConfig(record=("rec/#",)))
    async with open_broker(config, "test") as opened:
        yield opened


async def test_a_publish_reaches_each_matching_session_once_with_all_its_subscriptions() -> None:
    async with broker() as b:
        both = await watching(b, "a/+", "a/b")
        other = await watching(b, "x")
        publisher = await watching(b)
        await b.publish(publisher, [Publish(topic="a/b", payload=1, id=7)])
        publisher.flush()
        (delivery,) = both.take_events()
        assert isinstance(delivery, Delivery) and sorted(delivery.subs) == [1, 2]
        assert other.take_events() == []
        (ack,) = publisher.take_events()
        assert isinstance(ack, PubAck) and ack.id == 7 and ack.event == delivery.event


async def test_a_batch_is_flushed_once_per_session() -> None:
    """One write per session for a whole batch: the deliveries of a frame's publishes coalesce."""
    async with broker() as b:
        subscriber = await watching(b, "t/#")
        publisher = await watching(b)
        await b.publish(publisher, [Publish(topic=f"t/{n}", payload=n) for n in range(50)])
        assert len(subscriber.frames) == 1
        assert [e.payload for e in subscriber.take_events()] == list(range(50))


async def test_refusals_are_replies_and_the_rest_of_the_batch_goes_on() -> None:
    async with broker() as b:
        subscriber = await watching(b, "ok")
        publisher = await watching(b)
        await b.publish(publisher, [Publish(topic="bad/+", payload=0, id=1),
                                    Publish(topic="ok", payload=1, id=2)])
        publisher.flush()
        error, ack = publisher.take_events()
        assert isinstance(error, Error) and error.code == ErrorCode.INVALID_TOPIC
        assert isinstance(ack, PubAck) and ack.id == 2
        assert [e.payload for e in subscriber.take_events()] == [1]


async def test_resume_replays_then_goes_live_without_duplicates() -> None:
    async with broker() as b:
        publisher = await watching(b)
        await b.publish(publisher, [Publish(topic="rec/t", payload=n, id=n) for n in range(5)])
        publisher.flush()
        acks = [e.event for e in publisher.take_events()]
        resumer = MemorySession()
        b.attach(resumer)
        await b.subscribe(resumer, Subscribe(id=1, filter="rec/t", since=acks[1]))
        await b.publish(publisher, [Publish(topic="rec/t", payload=5)])
        resumer.flush()
        suback, *deliveries = resumer.take_events()
        assert isinstance(suback, SubAck) and suback.recovered
        assert [d.payload for d in deliveries] == [2, 3, 4, 5]


async def test_detach_forgets_the_session() -> None:
    async with broker() as b:
        session = await watching(b, "t")
        await b.detach(session)
        publisher = await watching(b)
        await b.publish(publisher, [Publish(topic="t", payload=1)])
        assert session.frames == [] and session.queued == []
        assert b.counters["sessions_closed"] == 1
