"""What a resume after `forget` reports (docs/protocol.md, `forget`): from the topic's last
message before the forget nothing was lost (recovered: true, and what came after the forget is
replayed); from an older one the messages between were dropped (trimmed)."""

from __future__ import annotations

from mqbroker.protocol import Delivery, Forget, Forgot, PubAck, Publish, SubAck, Subscribe
from tests.harness import RunningBroker, raw_session

TOPIC = "mcp/broadcast/forgotten"  # recorded by the default [history] record filters


async def test_resume_after_forget(broker: RunningBroker) -> None:
    async with raw_session(broker.url) as session:
        events = []
        for n in range(2):
            await session.send(Publish(topic=TOPIC, payload=n, id=n))
            ack = await session.next_event()
            assert isinstance(ack, PubAck)
            events.append(ack.event)
        await session.send(Forget(id=10, filter="mcp/broadcast/#"))
        assert await session.next_event() == Forgot(id=10, topics=1)
        await session.send(Publish(topic=TOPIC, payload="after", id=11))
        after = await session.next_event()
        assert isinstance(after, PubAck)

        await session.send(Subscribe(id=1, filter=TOPIC, since=events[1]))
        assert await session.next_event() == SubAck(id=1, recovered=True, last=after.event)
        replayed = await session.next_event()
        assert isinstance(replayed, Delivery) and replayed.payload == "after"

        await session.send(Subscribe(id=2, filter=TOPIC, since=events[0]))
        assert await session.next_event() == SubAck(id=2, recovered=False, reason="trimmed",
                                                    last=after.event)
