"""The Fanout contract (mqbroker.fanout), checked against every backend."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
from attrs import define, field
from trio.testing import MockClock

from mqbroker.config import HistoryConfig
from mqbroker.fanout import Health
from mqbroker.message import Draft, Message

from .backends import Backend, FanoutUnderTest

DEDUP_WINDOW = 1.0


def draft(topic: str, payload: object, *, msg_id: str | None = None, record: bool = True) -> Draft:
    return Draft(
        topic=topic, payload=payload, published_at=1_700_000_000.0, msg_id=msg_id, record=record
    )


@define
class Inbox:
    """What a fan-out delivers to this instance, in delivery order."""

    _send: trio.MemorySendChannel[Message]
    _receive: trio.MemoryReceiveChannel[Message]
    #: How many times `deliver` was called with an empty batch (it never should be).
    empty_batches: int = field(default=0, init=False)

    @classmethod
    def open(cls) -> Inbox:
        send, receive = trio.open_memory_channel[Message](math.inf)
        return cls(send, receive)

    def deliver(self, messages: Sequence[Message]) -> None:
        self.empty_batches += not messages
        for message in messages:
            self._send.send_nowait(message)

    async def receive(self) -> Message:
        return await self._receive.receive()


@define
class Rig:
    """A fan-out under test, watching everything, and what it delivered."""

    under_test: FanoutUnderTest
    inbox: Inbox

    async def publish(self, *drafts: Draft) -> list[Message]:
        with trio.fail_after(10):
            return list(await self.under_test.fanout.publish(drafts))

    async def settle(self, *topics: str) -> list[Message]:
        """Everything delivered so far on `topics`, exactly: taken up to a barrier on each.

        A fan-out keeps each topic's order, so once every barrier has arrived, every message
        published before it has arrived too, duplicates included.
        """
        barriers = list(await self.publish(*(draft(t, "barrier", record=False) for t in topics)))
        delivered: list[Message] = []
        with trio.fail_after(10):
            while barriers:
                message = await self.inbox.receive()
                if message in barriers:
                    barriers.remove(message)
                else:
                    delivered.append(message)
        return delivered


@asynccontextmanager
async def open_rig(backend: Backend, dedup_window: float = DEDUP_WINDOW) -> AsyncIterator[Rig]:
    inbox = Inbox.open()
    async with backend.open_fanout(inbox.deliver, dedup_window, HistoryConfig()) as under_test:
        with trio.fail_after(10):
            await under_test.fanout.watch("#")
        yield Rig(under_test, inbox)
        assert inbox.empty_batches == 0


def on(topic: str, messages: Sequence[Message]) -> list[Message]:
    return [m for m in messages if m.topic == topic]


async def test_publish_returns_positioned_messages_in_draft_order(backend: Backend) -> None:
    """publish hands back one message per draft, in draft order, with the draft's fields."""
    drafts = [draft("p/a", 1), draft("p/b", 2, record=False), draft("p/a", 3, msg_id="m")]
    async with open_rig(backend) as rig:
        messages = await rig.publish(*drafts)
    assert [(m.topic, m.payload, m.published_at, m.msg_id) for m in messages] == [
        (d.topic, d.payload, d.published_at, d.msg_id) for d in drafts
    ]
    assert len({m.position for m in messages}) == len(drafts)


async def test_each_published_message_is_delivered_once_in_order(backend: Backend) -> None:
    """deliver sees every published message exactly once, each topic in publish order."""
    async with open_rig(backend) as rig:
        first = await rig.publish(draft("q/a", 1), draft("q/b", 2, record=False), draft("q/a", 3))
        second = await rig.publish(draft("q/b", 4, record=False), draft("q/a", 5))
        delivered = await rig.settle("q/a", "q/b")
    published = [*first, *second]
    assert sorted(delivered, key=published.index) == published
    for topic in ("q/a", "q/b"):
        assert on(topic, delivered) == on(topic, published)
        positions = [m.position for m in on(topic, delivered)]
        assert positions == sorted(positions)


async def test_recorded_drafts_are_readable_at_their_positions(backend: Backend) -> None:
    """What a publish recorded, the history replays after the same positions."""
    async with open_rig(backend) as rig:
        [mark] = await rig.publish(draft("r/t", "mark"))
        messages = await rig.publish(*(draft("r/t", n) for n in range(5)))
        with trio.fail_after(10):
            replay = await rig.under_test.history.read("r/t", mark.position)
            tail = await rig.under_test.history.read("r/t", messages[1].position)
    assert (list(replay.messages), replay.gap) == (messages, None)
    assert (list(tail.messages), tail.gap) == (messages[2:], None)


async def test_concurrent_publishes_agree_with_the_history_order(backend: Backend) -> None:
    """Publishes racing on one topic are delivered in the order the history replays them."""
    async with open_rig(backend) as rig:
        [mark] = await rig.publish(draft("s/t", "mark"))
        assert await rig.settle("s/t") == [mark]
        async with trio.open_nursery() as nursery:
            for task in range(10):
                for n in range(3):
                    nursery.start_soon(rig.publish, draft("s/t", [task, n]))
        delivered = await rig.settle("s/t")
        with trio.fail_after(10):
            replay = await rig.under_test.history.read("s/t", mark.position)
    assert len(delivered) == 30
    assert list(replay.messages) == delivered


async def test_a_repeated_msg_id_returns_the_original_and_is_not_delivered(
    backend: Backend,
) -> None:
    """Within the window, a repeat of (topic, msg_id) answers with the first message's position
    (a backend need not keep its payload), and is not delivered."""
    async with open_rig(backend) as rig:
        [original] = await rig.publish(draft("u/t", "first", msg_id="k"))
        assert await rig.settle("u/t") == [original]
        repeats = await rig.publish(draft("u/t", "again", msg_id="k"), draft("u/t", 3, msg_id="k"))
        assert [(m.position, m.topic, m.msg_id) for m in repeats] == [
            (original.position, "u/t", "k")] * 2
        assert await rig.settle("u/t") == []
        with trio.fail_after(10):
            replay = await rig.under_test.history.read("u/t", original.position)
        assert list(replay.messages) == []


async def test_a_msg_id_repeated_within_one_publish_is_delivered_once(backend: Backend) -> None:
    """Two drafts of one publish with the same (topic, msg_id) are one message."""
    async with open_rig(backend) as rig:
        messages = await rig.publish(
            draft("v/t", "one", msg_id="k"),
            draft("v/t", "two", msg_id="k"),
            draft("v/u", 3, msg_id="k"),
        )
        assert messages[1] == messages[0] and messages[0].payload == "one"
        assert messages[2].topic == "v/u"
        assert await rig.settle("v/t", "v/u") == [messages[0], messages[2]]


async def test_a_repeat_after_the_window_is_delivered_again(
    backend: Backend, backend_clock: MockClock | None
) -> None:
    """Once dedup_window has passed, the same (topic, msg_id) is a new message."""
    async with open_rig(backend) as rig:
        [original] = await rig.publish(draft("w/t", "first", msg_id="k"))
        await trio.sleep(DEDUP_WINDOW * 1.5)
        [again] = await rig.publish(draft("w/t", "second", msg_id="k"))
        assert again.event_id != original.event_id and again.payload == "second"
        assert await rig.settle("w/t") == [original, again]


async def test_watches_are_counted(backend: Backend) -> None:
    """Two watches of one filter need two unwatches: after one, delivery goes on."""
    async with open_rig(backend) as rig:
        fanout = rig.under_test.fanout
        with trio.fail_after(10):
            await fanout.watch("x/+")
            await fanout.watch("x/+")
            await fanout.unwatch("x/+")
        [message] = await rig.publish(draft("x/1", "still watched", record=False))
        assert await rig.settle("x/1") == [message]


async def test_health_and_stats(backend: Backend) -> None:
    """A freshly opened fan-out is healthy, and its stats are integer counts."""
    async with open_rig(backend) as rig:
        await rig.publish(draft("y/t", 1))
        health = rig.under_test.fanout.health()
        stats = rig.under_test.fanout.stats()
    assert isinstance(health, Health) and health.ok
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())
