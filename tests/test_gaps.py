"""The `gap` event: when the fan-out says live delivery of some filters may have been
interrupted, every subscription on them is told, in order with its deliveries (issue 9)."""

from __future__ import annotations

import trio

from mqbroker.client import Gap, Message, connect
from mqbroker.protocol import Delivery, GapNotice, Hello, SubAck, Subscribe
from tests.harness import raw_session, running_broker


async def next_item(subscription: object) -> Message | Gap:
    with trio.fail_after(5):
        return await subscription.__anext__()  # type: ignore[attr-defined,no-any-return]


async def test_an_interruption_is_a_gap_in_each_affected_stream_between_its_messages() -> None:
    """Each subscription on an interrupted filter gets a Gap after the messages delivered before
    and before those delivered after; a subscription on another filter gets none."""
    async with running_broker() as broker, connect(broker.url) as client:
        exact = await client.subscribe("a/b")
        wildcard = await client.subscribe("a/+")
        other = await client.subscribe("c/d")
        await client.publish("a/b", 1)
        for subscription in (exact, wildcard):
            before = await next_item(subscription)
            assert isinstance(before, Message) and before.payload == 1
        broker.broker.interrupted(["a/+", "c/d"])
        await client.publish("a/b", 2)
        assert isinstance(await next_item(wildcard), Gap)
        after = await next_item(wildcard)
        assert isinstance(after, Message) and after.payload == 2
        assert (await next_item(exact)).payload == 2  # type: ignore[union-attr]
        assert await next_item(other) == Gap(reason="unavailable")
    assert broker.broker.counters["gaps"] == 2


async def test_the_gap_event_names_every_affected_subscription_once() -> None:
    """On the wire: one `gap` per interruption listing the session's affected subscriptions,
    ascending, after the deliveries queued before it."""
    async with running_broker() as broker, raw_session(broker.url, hello=False) as raw:
        await raw.send(Hello(version=1), Subscribe(id=1, filter="x/+"),
                       Subscribe(id=2, filter="y"), Subscribe(id=3, filter="x/1"))
        seen: list[object] = []
        with trio.fail_after(5):
            while sum(isinstance(e, SubAck) for e in seen) < 3:
                seen.append(await raw.next_event())
        broker.broker.interrupted(["x/1", "x/+"])
        with trio.fail_after(5):
            event = await raw.next_event()
        assert event == GapNotice(subs=(1, 3), reason="unavailable")
        assert not any(isinstance(e, Delivery) for e in seen)
