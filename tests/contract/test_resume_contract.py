"""Resuming with `since` under concurrent publishers, through a real broker, on every backend.

The broker's switch from history to live must give each message once whatever the backend:
the memory fan-out delivers in the publisher's task, but Redis pub/sub delivers later, from
another thread, possibly after the history read has already returned the same message
(issue 9, item 4: on Redis 18 of 300 resumes delivered a message twice).
"""

from __future__ import annotations

import trio

from mqbroker.client import Message, connect
from mqbroker.config import HistoryConfig, ServerConfig
from tests.contract.backends import Backend
from tests.harness import running_broker

TOPIC = "mcp/session/s1/message"  # recorded by the default [history] record filters
PUBLISHERS = 4
RESUMES = 60
#: How long each resumer reads: its replay, then live messages.
WINDOW = 0.05


async def test_resumes_under_concurrent_publishers_give_each_message_once(
        backend: Backend) -> None:
    """While publishers keep publishing, subscribers resume one after another from the newest
    event another subscriber has seen (the riskiest place: the live copies of what follows it
    may still be on their way): each gets every message after its `since` once, in order."""
    config = backend.broker_config(backend.broker_plugins(),
                                   HistoryConfig(max_messages=100_000), ServerConfig(port=0))
    async with running_broker(config) as broker, connect(broker.url) as watcher:
        watching = await watcher.subscribe(TOPIC)  # keeps the topic watched on the instance
        last_seen = [await watcher.publish(TOPIC, "mark")]

        async def publish_forever(n: int) -> None:
            async with connect(broker.url) as publisher:
                for i in range(1_000_000):
                    await publisher.publish(TOPIC, [n, i], ack=i % 10 == 9)

        async def follow() -> None:
            async for item in watching:
                assert isinstance(item, Message)
                last_seen.append(item.event_id)

        async def resume_once() -> tuple[str, list[Message]]:
            async with connect(broker.url) as resumer:
                since = last_seen[-1]
                subscription = await resumer.subscribe(TOPIC, since=since)
                assert subscription.ack is not None and subscription.ack.recovered
                received: list[Message] = []
                with trio.move_on_after(WINDOW):
                    async for item in subscription:
                        assert isinstance(item, Message), item
                        received.append(item)
                return since, received

        outcomes: list[tuple[str, list[Message]]] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                for n in range(PUBLISHERS):
                    nursery.start_soon(publish_forever, n)
                for _ in range(RESUMES):
                    outcomes.append(await resume_once())
                nursery.cancel_scope.cancel()

    doubled = [since for since, received in outcomes
               if len({m.event_id for m in received}) != len(received)
               or since in [m.event_id for m in received]]
    assert doubled == [], f"{len(doubled)} of {RESUMES} resumes delivered a message twice"
    for since, received in outcomes:
        offsets = [int(m.event_id.rsplit("-", 1)[1]) for m in received]
        first = int(since.rsplit("-", 1)[1]) + 1
        assert offsets == list(range(first, first + len(offsets)))  # none lost, in order
