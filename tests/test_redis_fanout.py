"""The Redis fan-out across instances: exactly once, one order, only what an instance watches.

Every test runs real broker-instance parts (RedisHistory + RedisFanout) against a private
redis-server. "Exactly once" is checked up to a barrier: a topic's order is kept, so once a
barrier published after the messages arrived, everything before it did too, duplicates
included.
"""

from __future__ import annotations

from functools import partial

import redis
import trio

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext
from mqbroker.message import Message
from mqbroker_plugins.memory import open_memory_history
from mqbroker_plugins.redis import RedisSettings, open_redis_fanout
from tests.redis_fixtures import (
    Inbox,
    Instance,
    draft,
    open_instance,
    redis_server,
    redis_settings,
)
from tests.redis_server import RedisServer

__all__ = ["redis_server", "redis_settings"]  # fixtures used by name below


async def settle(publisher: Instance, *receivers: Instance, topics: tuple[str, ...]) -> None:
    """Publish a barrier on each topic and wait until every receiver has them all."""
    barriers = await publisher.publish(*(draft(topic, "barrier") for topic in topics))
    for receiver in receivers:
        await receiver.inbox.wait_until(partial(has_all, receiver.inbox, barriers))


def has_all(inbox: Inbox, messages: list[Message]) -> bool:
    return all(message in inbox.messages for message in messages)


def without_barriers(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.payload != "barrier"]


async def test_cross_instance_delivery_is_exactly_once_and_in_one_order(
    redis_settings: RedisSettings,
) -> None:
    """Two instances publishing to one topic at once: both receive every message exactly once,
    in the same order, and that order is the history's for the recorded ones."""
    async with (
        open_instance(redis_settings, "a") as a,
        open_instance(redis_settings, "b") as b,
    ):
        await a.watch("mcp/broadcast/#")
        await b.watch("mcp/broadcast/all")
        [mark] = await a.publish(draft("mcp/broadcast/all", "mark", record=True))
        await b.inbox.wait_for(mark)

        async def burst(instance: Instance, name: str) -> None:
            for n in range(40):
                await instance.publish(draft("mcp/broadcast/all", [name, n], record=n % 3 != 0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, a, "a")
            nursery.start_soon(burst, b, "b")
        await settle(a, a, b, topics=("mcp/broadcast/all",))
        replay = await a.history.read("mcp/broadcast/all", mark.position)

    seen_by_a = without_barriers(a.inbox.messages)[1:]
    seen_by_b = without_barriers(b.inbox.messages)[1:]
    assert len(seen_by_a) == 80
    assert seen_by_a == seen_by_b
    assert sorted(m.payload for m in seen_by_a) == sorted(
        [name, n] for name in "ab" for n in range(40)
    )
    assert list(replay.messages) == [m for m in seen_by_a if m.payload[1] % 3 != 0]


async def test_overlapping_wildcards_deliver_each_message_once(
    redis_settings: RedisSettings,
) -> None:
    """However many of an instance's filters match a topic (patterns and an exact channel,
    several patterns with one glob), each message reaches it once."""
    topics = ("a/b", "a/c", "x/b", "a", "a/b/c", "$sys/b")
    async with (
        open_instance(redis_settings, "pub") as publisher,
        open_instance(redis_settings, "sub") as subscriber,
    ):
        await subscriber.watch("#", "+", "a/#", "a/+", "+/b", "a/b", "a/+/c", "+/+")
        published = await publisher.publish(*(draft(t, t) for t in topics for _ in range(3)))
        await settle(publisher, subscriber, topics=topics)
        stats = subscriber.fanout.stats()

    assert without_barriers(subscriber.inbox.messages) == published
    assert stats["copies_dropped"] > 0


async def test_a_watch_change_keeps_every_message_exactly_once(
    redis_settings: RedisSettings,
) -> None:
    """Adding and removing an exact watch and a smaller pattern while messages flow loses
    none and doubles none: each copy is judged by what Redis had confirmed when it sent it."""
    async with (
        open_instance(redis_settings, "pub") as publisher,
        open_instance(redis_settings, "sub") as subscriber,
    ):
        await subscriber.watch("k/#")
        published: list[Message] = []

        async def stream() -> None:
            for n in range(200):
                published.extend(await publisher.publish(draft("k/t", n)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            for _ in range(5):
                await subscriber.watch("k/t")
                await subscriber.watch("k/+")
                await subscriber.fanout.unwatch("k/t")
                await subscriber.fanout.unwatch("k/+")
        await settle(publisher, subscriber, topics=("k/t",))

    assert without_barriers(subscriber.inbox.messages) == published


async def test_an_instance_receives_only_the_channels_it_watches(
    redis_settings: RedisSettings,
) -> None:
    """Per-session traffic is not copied to every instance: B, watching its own session's
    topic only, receives nothing of the messages A publishes to its sessions."""
    async with (
        open_instance(redis_settings, "a") as a,
        open_instance(redis_settings, "b") as b,
    ):
        await a.watch(*(f"mcp/session/a{n}/message" for n in range(20)))
        await b.watch("mcp/session/b1/message")
        for n in range(200):
            await a.publish(draft(f"mcp/session/a{n % 20}/message", n, record=True))
        [mine] = await a.publish(draft("mcp/session/b1/message", "for b", record=True))
        await b.inbox.wait_for(mine)
        await a.inbox.wait_until(lambda: len(a.inbox.messages) == 200)
        received_by_b = b.fanout.stats()["pubsub_received"]

    # Redis keeps a connection's order, so A's 200 would have reached B before `mine`.
    assert received_by_b == 1
    assert b.inbox.messages == [mine]


async def test_a_run_of_one_batch_to_one_topic_is_one_pubsub_message(
    redis_settings: RedisSettings,
) -> None:
    """One batch's consecutive drafts to one topic travel as one PUBLISH: B receives three
    pub/sub messages for runs a, b, a (the b run longer than 15, the a run with a repeat of
    a msg_id, answered with the original and not delivered again), and delivers every message
    once, in the batch's order."""
    async with (
        open_instance(redis_settings, "a") as a,
        open_instance(redis_settings, "b") as b,
    ):
        await b.watch("g/a", "g/b")
        batch = [
            *(draft("g/a", n, record=True) for n in range(3)),
            *(draft("g/b", n, record=n % 2 == 0) for n in range(20)),
            draft("g/a", "first", msg_id="x", record=True),
            draft("g/a", "repeat", msg_id="x", record=True),
            draft("g/a", "last", record=True),
        ]
        published = await a.publish(*batch)
        await b.inbox.wait_until(lambda: len(b.inbox.messages) >= len(published) - 1)
        await settle(a, b, topics=("g/a", "g/b"))
        received_by_b = b.fanout.stats()["pubsub_received"]

    assert published[-2] == published[-3]
    assert without_barriers(b.inbox.messages) == published[:-2] + published[-1:]
    # The three runs, then settle's barriers: one batch, two runs (g/a, then g/b).
    assert received_by_b == 3 + 2


async def test_a_repeat_from_another_instance_is_not_delivered_again(
    redis_settings: RedisSettings,
) -> None:
    """Dedup is shared: B repeating (topic, msg_id) that A published gets A's position back,
    and no instance delivers it twice."""
    async with (
        open_instance(redis_settings, "a") as a,
        open_instance(redis_settings, "b") as b,
    ):
        await a.watch("d/t")
        await b.watch("d/#")
        [original] = await a.publish(draft("d/t", "first", msg_id="k1", record=True))
        [repeat] = await b.publish(draft("d/t", "second", msg_id="k1", record=True))
        [other] = await b.publish(draft("d/t", "other", msg_id="k2", record=True))
        await settle(b, a, b, topics=("d/t",))
        stats = b.fanout.stats()

    assert (repeat.position, repeat.topic, repeat.msg_id) == (original.position, "d/t", "k1")
    assert without_barriers(a.inbox.messages) == [original, other]
    assert without_barriers(b.inbox.messages) == [original, other]
    assert stats["duplicates"] == 1


async def test_the_dedup_key_keeps_the_position_not_the_payload(
    redis_server: RedisServer, redis_settings: RedisSettings
) -> None:
    """What Redis remembers for a (topic, msg_id) is the first publish's position: a few bytes,
    however large the payload (a 256 KiB payload once stayed in Redis for the whole window)."""
    payload = b"x" * (256 * 1024)
    async with open_instance(redis_settings, "a") as a:
        [original] = await a.publish(draft("d/big", payload, msg_id="k", record=True))
        [repeat] = await a.publish(draft("d/big", payload, msg_id="k", record=True))
    assert repeat.event_id == original.event_id
    with redis.Redis.from_url(redis_server.url) as client:
        [key] = client.keys(f"{redis_settings.key_prefix}d:*")
        assert client.strlen(key) < 100
        assert 0 < client.pttl(key) <= 60_000


async def test_watch_returns_only_once_redis_confirmed_it(redis_settings: RedisSettings) -> None:
    """A message another instance publishes right after `watch` returned is delivered."""
    async with (
        open_instance(redis_settings, "a") as a,
        open_instance(redis_settings, "b") as b,
    ):
        for n in range(30):
            topic = f"w/{n}"
            await b.watch([topic, f"w/{n}/#", "+/+"][n % 3])
            [message] = await a.publish(draft(topic, n))
            await b.inbox.wait_for(message)


async def test_another_history_store_records_before_the_publish(
    redis_settings: RedisSettings,
) -> None:
    """With a history that is not this Redis (here the memory store), recorded drafts take
    that store's positions and are readable there; Redis only carries them."""
    inbox = Inbox()
    async with open_memory_history(None, HistoryConfig()) as history:
        context = FanoutContext(
            instance_id="m", history=history, deliver=inbox.deliver, dedup_window=5.0
        )
        async with open_redis_fanout(redis_settings, context) as fanout:
            with trio.fail_after(10):
                await fanout.watch("h/t")
                [mark] = await fanout.publish([draft("h/t", "mark", record=True)])
                sent = await fanout.publish(
                    [draft("h/t", 1, record=True), draft("h/t", 2), draft("h/t", 3, record=True)]
                )
                replay = await history.read("h/t", mark.position)
            await inbox.wait_until(lambda: len(inbox.messages) == 4)

    assert inbox.messages == [mark, *sent]
    assert list(replay.messages) == [sent[0], sent[2]]
    assert sent[1].position.epoch != mark.position.epoch
