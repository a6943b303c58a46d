"""The `latest` request: a topic's newest recorded event id, from the history store.

What it answers is a position to resume from: `subscribe(topic, since=latest)` replays nothing
and misses nothing published after it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trio

from mqbroker.broker import Broker
from mqbroker.client import BrokerError, InvalidTopic, connect
from mqbroker.client import aio as aio_client
from mqbroker.protocol import Error, ErrorCode, Latest, LatestAck, PubAck, Publish
from mqbroker.testing import MemorySession
from tests.harness import running_broker
from tests.test_auth import TOKENS, token_config
from tests.test_replay_boundary import broker

TOPIC = "mcp/session/s1/message"


async def ask(b: Broker, topic: str) -> Any:
    session = MemorySession()
    b.attach(session)
    await b.handle(session, Latest(id=7, topic=topic))
    session.flush()
    (answer,) = session.take_events()
    return answer


async def test_latest_answers_the_newest_event_id_of_a_recorded_topic() -> None:
    async with broker() as b:
        assert await ask(b, "rec/t") == LatestAck(id=7)  # nothing recorded yet: no event
        publisher = MemorySession()
        b.attach(publisher)
        await b.publish(publisher, [Publish(topic="rec/t", payload=n, id=n) for n in range(3)])
        await b.publish(publisher, [Publish(topic="rec/other", payload=0, id=9)])
        publisher.flush()
        acks = [e.event for e in publisher.take_events() if isinstance(e, PubAck)]
        assert await ask(b, "rec/t") == LatestAck(id=7, event=acks[2])
        assert await ask(b, "rec/other") == LatestAck(id=7, event=acks[3])


async def test_latest_of_a_topic_not_recorded_has_no_event() -> None:
    async with broker() as b:
        publisher = MemorySession()
        b.attach(publisher)
        await b.publish(publisher, [Publish(topic="live/t", payload=1, id=1)])
        assert await ask(b, "live/t") == LatestAck(id=7)


@pytest.mark.parametrize("topic", ["rec/+", "rec/#", "", "a" * 5000, "bad\x00topic"])
async def test_latest_refuses_what_is_not_a_topic(topic: str) -> None:
    """Wildcards, empty and oversized names are refused with invalid_topic, with the id."""
    async with broker() as b:
        answer = await ask(b, topic)
        assert isinstance(answer, Error) and answer.code == ErrorCode.INVALID_TOPIC
        assert (answer.id, answer.ref) == (7, "latest")


async def test_trio_client_latest_is_a_position_to_resume_from() -> None:
    async with running_broker() as running, connect(running.url) as client:
        assert await client.latest(TOPIC) is None
        ids = [await client.publish(TOPIC, n) for n in range(4)]
        newest = await client.latest(TOPIC)
        assert newest == ids[-1]
        subscription = await client.subscribe(TOPIC, since=newest)
        assert subscription.ack is not None and subscription.ack.recovered
        with trio.fail_after(5):
            assert [item async for item in subscription.replay()] == []
        with pytest.raises(InvalidTopic):
            await client.latest("mcp/session/+/message")


async def test_asyncio_client_latest() -> None:
    async with running_broker() as running:
        url = running.url

        async def body() -> tuple[str | None, str | None, str]:
            async with aio_client.connect(url) as client:
                before = await client.latest(TOPIC)
                event = await client.publish(TOPIC, "x")
                return before, await client.latest(TOPIC), event

        before, after, event = await trio.to_thread.run_sync(asyncio.run, body())
        assert before is None and after == event


async def test_latest_needs_the_replay_right() -> None:
    """Under [auth], `latest` is checked like a resume: the subscribe and replay rights on the
    topic; a caster (subscribe, no replay) is refused with forbidden."""
    async with running_broker(token_config()) as running:
        async with connect(running.url, auth=TOKENS["alice"]) as alice:
            event = await alice.publish("mcp/session/s-alice/message", 1)
            assert await alice.latest("mcp/session/s-alice/message") == event
            with pytest.raises(BrokerError) as refused:
                await alice.latest("mcp/session/s-bob/message")
            assert (refused.value.code, refused.value.ref) == ("forbidden", "latest")
        async with connect(running.url, auth=TOKENS["caster"]) as caster:
            with pytest.raises(BrokerError) as refused:
                await caster.latest("mcp/broadcast/news")
            assert refused.value.code == "forbidden"
