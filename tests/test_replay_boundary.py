"""The replay boundary: after `subscribe` with `since`, where the replay ends and live begins.

The suback names the last replayed message (`last`); the clients turn it into
`subscription.replay()`, which yields the replayed items and stops there, with no timeout,
while live messages keep flowing to the subscription afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from mqbroker.broker import Broker, open_broker
from mqbroker.client import Gap, Message, connect
from mqbroker.client import aio as aio_client
from mqbroker.client.core import ClientCore, Deliver, Live
from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.protocol import (
    Delivery,
    Format,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Welcome,
    join,
)
from mqbroker.protocol.codec import encode
from mqbroker.testing import MemorySession
from tests.harness import running_broker

TOPIC = "mcp/session/s1/message"


@asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(record=("rec/#",)))
    async with open_broker(config, "test") as opened:
        yield opened


async def published(b: Broker, topic: str, count: int) -> list[str]:
    publisher = MemorySession()
    b.attach(publisher)
    await b.publish(publisher, [Publish(topic=topic, payload=n, id=n) for n in range(count)])
    publisher.flush()
    return [e.event for e in publisher.take_events() if isinstance(e, PubAck)]


async def subscribed(b: Broker, filter: str, since: str | None) -> list[Any]:
    session = MemorySession()
    b.attach(session)
    await b.subscribe(session, Subscribe(id=1, filter=filter, since=since))
    session.flush()
    return session.take_events()


# --- the wire: suback.last -------------------------------------------------------------------


async def test_the_suback_names_the_last_replayed_message() -> None:
    """`last` is the event id of the last message of the replay, which follows the suback."""
    async with broker() as b:
        ids = await published(b, "rec/t", 5)
        suback, *replayed = await subscribed(b, "rec/t", ids[1])
        assert isinstance(suback, SubAck) and suback.recovered
        assert [d.event for d in replayed] == ids[2:]
        assert suback.last == ids[-1] == replayed[-1].event


async def test_an_empty_replay_has_no_last() -> None:
    """Resuming from the newest message: nothing to replay, so no `last` (live begins at once)."""
    async with broker() as b:
        ids = await published(b, "rec/t", 3)
        (suback,) = await subscribed(b, "rec/t", ids[-1])
        assert isinstance(suback, SubAck) and suback.recovered and suback.last is None


async def test_a_subscribe_without_since_has_no_last() -> None:
    async with broker() as b:
        await published(b, "rec/t", 3)
        (suback,) = await subscribed(b, "rec/t", None)
        assert isinstance(suback, SubAck) and suback.recovered is None and suback.last is None


async def test_a_gap_still_names_the_last_message_it_replays() -> None:
    """`unknown_epoch` replays the current history: `last` names its last message."""
    async with broker() as b:
        ids = await published(b, "rec/t", 3)
        foreign = "0000000000000000-5"
        suback, *replayed = await subscribed(b, "rec/t", foreign)
        assert (suback.recovered, suback.reason) == (False, "unknown_epoch")
        assert [d.event for d in replayed] == ids and suback.last == ids[-1]


# --- the sans-IO core: one Live marker, moved by a reconnect -----------------------------------


def _frame(*events: Any) -> bytes:
    """One frame from the broker: an event, or a batch of them."""
    return bytes(join([encode(e, Format.MSGPACK) for e in events], Format.MSGPACK))


def _batch(events: tuple[Any, ...]) -> bytes:
    return _frame(*events)


def _opened(core: ClientCore) -> None:
    core.open_connection()
    core.receive(_frame(Welcome(version=1, instance="i", session="s")))


def _delivery(sub: int, event: str) -> Delivery:
    return Delivery(subs=(sub,), topic="t", event=event, time=0.0, payload=None)


def _stream(outcomes: list[Any], sub: int) -> list[Any]:
    return [o.item for o in outcomes if isinstance(o, Deliver) and o.sub == sub]


def test_the_core_puts_one_live_marker_after_the_last_replayed_message() -> None:
    core = ClientCore()
    _opened(core)
    sub = core.subscribe("t", since="e-1").id
    out = core.receive(_frame(SubAck(id=sub, recovered=True, last="e-3")))
    out += core.receive(_batch((_delivery(sub, "e-2"), _delivery(sub, "e-3"),
                                _delivery(sub, "e-4"))))
    items = _stream(out, sub)
    assert [type(i).__name__ for i in items] == ["Message", "Message", "Live", "Message"]


def test_an_empty_replay_marks_live_right_after_the_suback_and_its_gap() -> None:
    core = ClientCore()
    _opened(core)
    sub = core.subscribe("t", since="e-1").id
    out = core.receive(_frame(SubAck(id=sub, recovered=False, reason="not_recorded")))
    assert _stream(out, sub) == [Gap(reason="not_recorded"), Live()]


def test_a_reconnect_during_the_replay_moves_the_boundary_to_the_new_suback() -> None:
    """Cut after the first replayed message: the resumed subscribe's suback names the new last
    message, and the marker comes after it (once), not after the first suback's last."""
    core = ClientCore()
    _opened(core)
    sub = core.subscribe("t", since="e-1").id
    out = core.receive(_frame(SubAck(id=sub, recovered=True, last="e-3")))
    out += core.receive(_frame(_delivery(sub, "e-2")))
    _opened(core)
    events, _ = core.resume()
    assert events == [Subscribe(id=sub, filter="t", since="e-2")]
    out += core.receive(_frame(SubAck(id=sub, recovered=True, last="e-5")))
    out += core.receive(_batch(tuple(_delivery(sub, f"e-{n}") for n in (3, 4, 5, 6))))
    kinds = [i.event_id if isinstance(i, Message) else type(i).__name__
             for i in _stream(out, sub)]
    assert kinds == ["e-2", "e-3", "e-4", "e-5", "Live", "e-6"]


def test_a_reconnect_once_live_adds_no_marker() -> None:
    core = ClientCore()
    _opened(core)
    sub = core.subscribe("t", since="e-1").id
    out = core.receive(_frame(SubAck(id=sub, recovered=True)))
    _opened(core)
    core.resume()
    out += core.receive(_frame(SubAck(id=sub, recovered=True, last="e-9")))
    out += core.receive(_frame(_delivery(sub, "e-9")))
    assert [type(i).__name__ for i in _stream(out, sub)] == ["Live", "Message"]


def test_a_resubscription_s_gap_comes_before_deliveries_ahead_of_its_suback() -> None:
    """A wildcard subscription re-established after a reconnect reports a Gap (what was
    published meanwhile is not replayed) before anything delivered to it, even when the broker
    delivers to it ahead of its suback (docs/protocol.md allows that). Put at the suback only,
    the Gap came after such a delivery, and the messages missed looked delivered in order.
    Once, not again at the suback."""
    core = ClientCore()
    _opened(core)
    sub = core.subscribe("t/+").id
    out = core.receive(_frame(SubAck(id=sub)))
    out += core.receive(_frame(_delivery(sub, "e-1")))
    _opened(core)
    core.resume()
    out += core.receive(_frame(_delivery(sub, "e-7")))
    out += core.receive(_frame(SubAck(id=sub)))
    out += core.receive(_frame(_delivery(sub, "e-8")))
    kinds = [i.event_id if isinstance(i, Message) else i for i in _stream(out, sub)]
    assert kinds == ["e-1", Gap(reason="not_resumable"), "e-7", "e-8"]


# --- both clients: subscription.replay() stops at the boundary, live goes on --------------------


async def _replay_then_live_trio(url: str, since: str) -> tuple[list[Any], list[Any]]:
    async with connect(url) as client, trio.open_nursery() as nursery:
        subscription = await client.subscribe(TOPIC, since=since)

        async def keep_publishing() -> None:
            async with connect(url) as publisher:
                for n in range(100, 110):
                    await publisher.publish(TOPIC, n)

        nursery.start_soon(keep_publishing)
        with trio.fail_after(10):
            replayed = [item async for item in subscription.replay()]
            live = []
            async for item in subscription:
                live.append(item)
                if len(live) == 10:
                    break
        return replayed, live


async def test_trio_replay_yields_the_replay_then_stops_while_live_goes_on() -> None:
    async with running_broker() as running, connect(running.url) as client:
        ids = [await client.publish(TOPIC, n) for n in range(6)]
        replayed, live = await _replay_then_live_trio(running.url, ids[1])
        assert [m.payload for m in replayed] == [2, 3, 4, 5]
        assert [m.payload for m in live] == list(range(100, 110))


async def test_trio_replay_of_nothing_returns_at_once_and_a_gap_is_yielded() -> None:
    async with running_broker() as running, connect(running.url) as client:
        newest = await client.publish(TOPIC, 1)
        subscription = await client.subscribe(TOPIC, since=newest)
        with trio.fail_after(5):
            assert [item async for item in subscription.replay()] == []
        other = await client.publish("not/recorded", 1)
        subscription = await client.subscribe("not/recorded", since=other)
        with trio.fail_after(5):
            assert [item async for item in subscription.replay()] == [Gap(reason="not_recorded")]
        plain = await client.subscribe(TOPIC)
        with trio.fail_after(5):
            assert [item async for item in plain.replay()] == []  # no since: nothing to replay


def _in_asyncio(body: Callable[[], Any]) -> Any:
    return trio.to_thread.run_sync(asyncio.run, body())


async def test_asyncio_replay_yields_the_replay_then_stops_while_live_goes_on() -> None:
    async with running_broker() as running, connect(running.url) as client:
        ids = [await client.publish(TOPIC, n) for n in range(6)]
        url = running.url

        async def body() -> tuple[list[Any], list[Any], list[Any]]:
            async with aio_client.connect(url) as aclient:
                subscription = await aclient.subscribe(TOPIC, since=ids[1])
                async with asyncio.timeout(10):
                    replayed = [item async for item in subscription.replay()]
                    for n in range(100, 103):
                        await aclient.publish(TOPIC, n)
                    live = []
                    async for item in subscription:
                        live.append(item)
                        if len(live) == 3:
                            break
                empty = await aclient.subscribe(TOPIC, since=live[-1].event_id)
                async with asyncio.timeout(5):
                    nothing = [item async for item in empty.replay()]
                return replayed, live, nothing

        replayed, live, nothing = await _in_asyncio(body)
        assert [m.payload for m in replayed] == [2, 3, 4, 5]
        assert [m.payload for m in live] == [100, 101, 102]
        assert nothing == []
