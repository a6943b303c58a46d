"""Resumable subscriptions end to end: replay then live, gaps said plainly, a client that
resumes by itself, idempotent publishes."""

from __future__ import annotations

import trio

from mqbroker.client import Gap, Message, Reconnect, connect
from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.protocol import Delivery, Hello, SubAck, Subscribe
from tests.harness import broker_config, free_port, raw_session, running_broker, tcp_proxy

TOPIC = "mcp/session/s1/message"  # recorded by the default [history] record filters
FAST = Reconnect(initial_delay=0.01, max_delay=0.05)


async def take(subscription: object, count: int) -> list[Message | Gap]:
    items: list[Message | Gap] = []
    with trio.fail_after(10):
        async for item in subscription:  # type: ignore[attr-defined]
            items.append(item)
            if len(items) == count:
                break
    return items


async def test_replay_then_live_under_concurrent_publishers() -> None:
    """A subscriber resuming while 10 publishers are busy gets every message after its id,
    each once, in position order, across the switch from history to live."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(max_messages=100_000))
    async with running_broker(config) as broker, connect(broker.url) as first:
        mark = await first.publish(TOPIC, "mark")
        per_publisher = 300

        async def publish_many(n: int) -> None:
            async with connect(broker.url) as publisher:
                for i in range(per_publisher):
                    await publisher.publish(TOPIC, [n, i], ack=i % 50 == 49)

        received: list[Message] = []
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(publish_many, n)
            await trio.lowlevel.checkpoint()  # let the publishers start before we resume
            async with connect(broker.url) as resumer:
                subscription = await resumer.subscribe(TOPIC, since=mark)
                assert subscription.ack is not None and subscription.ack.recovered
                with trio.fail_after(30):
                    async for item in subscription:
                        assert isinstance(item, Message)
                        received.append(item)
                        if len(received) == 10 * per_publisher:
                            break
        payloads = [tuple(m.payload) for m in received]
        assert len(set(payloads)) == len(payloads) == 10 * per_publisher  # no loss, no duplicate
        for n in range(10):  # each publisher's messages in its own order
            assert [i for (p, i) in payloads if p == n] == list(range(per_publisher))
        offsets = [int(m.event_id.rsplit("-", 1)[1]) for m in received]
        assert offsets == sorted(offsets)  # in position order


async def test_a_trimmed_id_says_recovered_false_and_replays_what_is_left() -> None:
    """When the id fell out of max_messages, the suback says trimmed, and what is retained
    is replayed, then live continues."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(max_messages=5))
    async with running_broker(config) as broker, connect(broker.url) as client:
        old = await client.publish(TOPIC, 0)
        for n in range(1, 11):
            await client.publish(TOPIC, n)
        subscription = await client.subscribe(TOPIC, since=old)
        assert subscription.ack is not None
        assert (subscription.ack.recovered, subscription.ack.reason) == (False, "trimmed")
        items = await take(subscription, 6)
        assert items[0] == Gap(reason="trimmed")
        assert [m.payload for m in items[1:] if isinstance(m, Message)] == [6, 7, 8, 9, 10]


async def test_a_topic_not_recorded_says_not_recorded() -> None:
    """`since` on a topic no [history] record filter matches: recovered false, not_recorded."""
    async with running_broker() as broker, connect(broker.url) as client:
        event = await client.publish("other/topic", 1)
        subscription = await client.subscribe("other/topic", since=event)
        assert subscription.ack is not None
        assert (subscription.ack.recovered, subscription.ack.reason) == (False, "not_recorded")


async def test_a_cut_connection_resumes_by_itself_and_misses_nothing() -> None:
    """The client's connection is cut mid-stream; it reconnects on its own, resubscribes
    from the last event it delivered, and the stream goes on with nothing lost or repeated."""
    async with running_broker() as broker, tcp_proxy(broker.listener.port) as proxy, \
            connect(f"ws://127.0.0.1:{proxy.port}/", reconnect=FAST) as subscriber, \
            connect(broker.url) as publisher:
        subscription = await subscriber.subscribe(TOPIC)
        for n in range(5):
            await publisher.publish(TOPIC, n)
        assert [m.payload for m in await take(subscription, 5)] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
        await proxy.cut()
        for n in range(5, 15):
            await publisher.publish(TOPIC, n)
        items = await take(subscription, 10)
        assert [m.payload for m in items if isinstance(m, Message)] == list(range(5, 15))
        assert not [i for i in items if isinstance(i, Gap)]
        assert proxy.cuts == 1


async def test_a_restarted_broker_is_reported_as_a_gap() -> None:
    """The broker restarts (its memory history is gone): the client resumes on the new one
    and its stream says unknown_epoch, then goes on live."""
    port = free_port()
    config = broker_config()
    config = Config(server=ServerConfig(port=port), history=config.history)
    async with running_broker(config) as broker:
        url = broker.url
        async with connect(url, reconnect=FAST) as client:
            subscription = await client.subscribe(TOPIC)
            await client.publish(TOPIC, "before")
            assert [m.payload for m in await take(subscription, 1)] == ["before"]  # type: ignore[union-attr]
            await broker.listener.shutdown()
            async with running_broker(config):
                await client.publish(TOPIC, "after")
                items = await take(subscription, 2)
    assert items[0] == Gap(reason="unknown_epoch")
    assert isinstance(items[1], Message) and items[1].payload == "after"


async def test_an_idempotent_publish_is_delivered_once_across_a_reconnect() -> None:
    """A publish repeated with the same msg_id (as a client retrying after a lost ack does)
    returns the original event id and is delivered once."""
    async with running_broker() as broker, tcp_proxy(broker.listener.port) as proxy, \
            connect(broker.url) as subscriber, \
            connect(f"ws://127.0.0.1:{proxy.port}/", reconnect=FAST) as publisher:
        subscription = await subscriber.subscribe(TOPIC)
        first = await publisher.publish(TOPIC, "once", msg_id="m-1")
        await proxy.cut()
        again = await publisher.publish(TOPIC, "once", msg_id="m-1")
        after = await publisher.publish(TOPIC, "next")
        assert again == first
        items = await take(subscription, 2)
        assert [(m.payload, m.event_id) for m in items] == [  # type: ignore[union-attr]
            ("once", first), ("next", after)]


async def test_forget_drops_history() -> None:
    """After forget, resuming from an old id reports trimmed and replays nothing."""
    async with running_broker() as broker, connect(broker.url) as client:
        old = await client.publish(TOPIC, 1)
        await client.publish(TOPIC, 2)
        assert await client.forget("mcp/session/+/message") == 1
        subscription = await client.subscribe(TOPIC, since=old)
        assert subscription.ack is not None
        assert (subscription.ack.recovered, subscription.ack.reason) == (False, "trimmed")


async def test_idle_topics_expire_after_max_age() -> None:
    """A recorded topic idle past max_age is dropped by itself: resuming reports trimmed."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(max_age=0.2))
    async with running_broker(config) as broker, connect(broker.url) as client:
        old = await client.publish(TOPIC, 1)
        await client.publish(TOPIC, 2)
        for _ in range(100):  # the expiry sweep runs on the real clock here: poll, bounded
            if not broker.broker.history.stats()["topics"]:
                break
            await trio.sleep(0.05)
        subscription = await client.subscribe(TOPIC, since=old)
        assert subscription.ack is not None and subscription.ack.reason == "trimmed"


async def test_hello_batched_with_a_long_replay() -> None:
    """A first frame holding hello and a subscribe whose replay overfills the outbox works:
    the replay is paced by the session's writer, not refused."""
    config = Config(server=ServerConfig(port=0, outbox_messages=5))
    async with running_broker(config) as broker, connect(broker.url) as client:
        first = await client.publish(TOPIC, 0)
        for n in range(1, 50):
            await client.publish(TOPIC, n)
        async with raw_session(broker.url, hello=False) as session:
            await session.send(Hello(version=1), Subscribe(id=1, filter=TOPIC, since=first))
            events = []
            with trio.fail_after(10):
                while sum(isinstance(e, Delivery) for e in events) < 49:
                    events.append(await session.next_event())
        assert isinstance(events[1], SubAck) and events[1].recovered
        assert [e.payload for e in events if isinstance(e, Delivery)] == list(range(1, 50))
