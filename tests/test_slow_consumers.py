"""Slow consumers: the policy applies to the slow session alone, and memory stays bounded."""

from __future__ import annotations

import trio

from mqbroker.client import connect
from mqbroker.protocol import CloseCode, Delivery, Dropped, SubAck, Subscribe
from tests.harness import broker_config, raw_session, running_broker

PAYLOAD = b"x" * 10_000
COUNT = 3000  # 30 MB: far more than the socket buffers and the outbox hold


async def test_disconnect_policy_closes_only_the_slow_session() -> None:
    """A session that stops reading is closed with 4008; a fast one receives everything."""
    config = broker_config(outbox_messages=100, shutdown_grace=2.0)
    async with running_broker(config) as broker, raw_session(broker.url) as slow, \
            connect(broker.url) as fast, connect(broker.url) as publisher:
        await slow.send(Subscribe(id=1, filter="flood"))
        assert isinstance(await slow.next_event(), SubAck)
        subscription = await fast.subscribe("flood")

        # The fast subscriber is fast by construction: the publisher keeps at most 50 messages
        # in flight ahead of it, half its outbox. The slow one reads nothing at all.
        credits_in, credits = trio.open_memory_channel[None](COUNT)
        for _ in range(50):
            credits_in.send_nowait(None)

        async def publish_all() -> None:
            for n in range(COUNT):
                await credits.receive()
                await publisher.publish("flood", PAYLOAD, ack=n % 100 == 99)
                outboxes = [len(s.outbox) for s in broker.broker.sessions]
                assert max(outboxes) <= config.server.outbox_messages  # bounded

        received = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_all)
            with trio.fail_after(60):
                async for _ in subscription:
                    received += 1
                    credits_in.send_nowait(None)
                    if received == COUNT:
                        break
        assert received == COUNT
        # 4008, or an abnormal closure when even the close frame could not get through to a
        # peer that reads nothing within shutdown_grace (docs/protocol.md, "Slow consumers").
        assert await slow.closed_with() in (CloseCode.SLOW_CONSUMER, 1006)
        await broker.wait_sessions(2)
        assert broker.broker.counters["sessions_closed_slow_consumer"] == 1
        assert broker.broker.counters["sessions_opened"] == 3  # nobody else was let go


async def test_drop_oldest_policy_reports_the_gap() -> None:
    """Under drop_oldest, the slow session is kept, told how many it lost, and gets the rest."""
    config = broker_config(outbox_messages=50, slow_consumer="drop_oldest")
    async with running_broker(config) as broker, raw_session(broker.url) as slow, \
            connect(broker.url) as publisher:
        await slow.send(Subscribe(id=1, filter="flood"))
        assert isinstance(await slow.next_event(), SubAck)
        for n in range(COUNT):
            await publisher.publish("flood", n.to_bytes(4, "big") + PAYLOAD, ack=n % 100 == 99)
        await publisher.publish("flood", b"end")
        delivered, dropped, last = 0, 0, -1
        with trio.fail_after(60):
            while True:
                event = await slow.next_event()
                if isinstance(event, Dropped):
                    dropped += event.count
                    continue
                assert isinstance(event, Delivery)
                if event.payload == b"end":
                    break
                n = int.from_bytes(event.payload[:4], "big")
                assert n > last  # what is kept stays in order
                delivered, last = delivered + 1, n
        assert dropped > 0
        assert delivered + dropped == COUNT
        slow_session = next(s for s in broker.broker.sessions if s.protocol.client == "raw")
        assert slow_session.outbox.dropped_total == dropped
