"""What a request's answer means to the client: `outcome_unknown` as a typed error that says how
to retry safely, automatic retries that reuse the msg_id, and the sans-IO core's bookkeeping for
cancelled and oversized requests (shared by the trio and asyncio clients)."""

from __future__ import annotations

from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

import mqbroker.client
import mqbroker.client.aio
from mqbroker.client import Message, OutcomeUnknown, Subscription, connect
from mqbroker.client.core import ClientCore, Failed, Send
from mqbroker.client.errors import MessageTooLarge, error_from_event
from mqbroker.protocol import (
    Error,
    ErrorCode,
    Format,
    Publish,
    SubAck,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from mqbroker.protocol.codec import encode
from tests.harness import running_broker
from tests.test_client_faults import FAST, _welcome, fake_broker, front, read_until


def test_outcome_unknown_is_a_typed_error_of_both_clients() -> None:
    error = error_from_event(Error(code="outcome_unknown", message="maybe", ref="publish"))
    assert isinstance(error, OutcomeUnknown) and error.code == ErrorCode.OUTCOME_UNKNOWN
    assert mqbroker.client.aio.OutcomeUnknown is OutcomeUnknown
    assert "OutcomeUnknown" in mqbroker.client.__all__
    assert "OutcomeUnknown" in mqbroker.client.aio.__all__


async def test_outcome_unknown_carries_the_msg_id_a_retry_must_reuse() -> None:
    """The broker answers `outcome_unknown`: the publish raises OutcomeUnknown carrying the
    msg_id it was sent with, and a retry with that msg_id is sent with it."""
    msg_ids: list[str] = []

    async def unsure_broker(request: WebSocketRequest) -> None:
        ws = await _welcome(request)
        try:
            while True:
                frame = msgpack.unpackb(await ws.get_message())
                for event in frame if isinstance(frame, list) else [frame]:
                    if event.get("op") != "publish":
                        continue
                    msg_ids.append(event["msg_id"])
                    answer: dict[str, Any] = (
                        {"op": "error", "code": "outcome_unknown", "message": "maybe",
                         "id": event["id"], "ref": "publish"}
                        if len(msg_ids) == 1 else
                        {"op": "puback", "id": event["id"], "event": "e1"})
                    await ws.send_message(msgpack.packb(answer))
        except ConnectionClosed:
            pass

    async with fake_broker(unsure_broker) as url, connect(url) as client:
        with trio.fail_after(5):
            try:
                await client.publish("t", "hello")
                raise AssertionError("no OutcomeUnknown")
            except OutcomeUnknown as e:
                assert e.msg_id is not None
                assert await client.publish("t", "hello", msg_id=e.msg_id) == "e1"
    assert len(msg_ids) == 2 and msg_ids[0] == msg_ids[1]


async def test_a_publish_resent_after_a_reconnect_is_delivered_once() -> None:
    """The broker published a message but its puback was lost with the connection: the client
    resends the publish with the same msg_id, the broker recognises it, and subscribers get it
    once; the publish returns the event id they saw."""
    async with running_broker() as broker, front(broker.listener.port) as proxy, \
            connect(proxy.url, reconnect=FAST) as publisher, \
            connect(broker.url) as subscriber_client:
        subscription: Subscription = await subscriber_client.subscribe("t")
        proxy.hold()  # the puback will not get through
        async with trio.open_nursery() as nursery:
            returned: list[str] = []

            async def publish() -> None:
                event_id = await publisher.publish("t", "once")
                assert event_id is not None
                returned.append(event_id)

            nursery.start_soon(publish)
            with trio.fail_after(5):
                delivered = await subscription.__anext__()
            await proxy.cut()  # the connection drops with the puback held
            proxy.release()
        await publisher.publish("t", "end")
        items = await read_until(subscription, "end")
    assert isinstance(delivered, Message) and delivered.payload == "once"
    assert [m.payload for m in items if isinstance(m, Message)] == ["end"]
    assert returned == [delivered.event_id]


# --- the core's bookkeeping ------------------------------------------------------------------


def welcomed(**limits: Any) -> ClientCore:
    core = ClientCore()
    core.open_connection()
    core.receive(encode(Welcome(version=1, instance="i", session="s", limits=limits),
                        Format.MSGPACK))
    return core


def test_a_subscribe_abandoned_is_unsubscribed_when_its_suback_arrives() -> None:
    """When the unsubscribe undoing a cancelled subscribe could not be queued, it is sent once
    the broker answers the subscribe; a failed subscribe or a new connection needs none."""
    core = welcomed()
    first, second, third = (core.subscribe(f"f/{n}") for n in range(3))
    for event in (first, second, third):
        core.unsubscribe(event.id)
        core.abandon(event.id)
    assert core.pending == {}
    outcomes = core.receive(encode(SubAck(id=first.id), Format.MSGPACK))
    assert outcomes == [Send(Unsubscribe(id=first.id))]
    assert core.pending == {("unsubscribe", first.id): Unsubscribe(id=first.id)}
    refused = Error(code="invalid_filter", message="no", id=second.id, ref="subscribe")
    assert core.receive(encode(refused, Format.MSGPACK)) == []
    core.open_connection()
    events, _ = core.resume()
    assert events == [] and core.pending == {}
    assert core.receive(encode(Welcome(version=1, instance="i", session="s2"),
                               Format.MSGPACK)) == []


def test_a_withdrawn_request_is_not_encoded() -> None:
    core = welcomed()
    kept = core.publish("t", 1, ack=True, msg_id=None)
    withdrawn = core.publish("t", 2, ack=True, msg_id=None)
    core.withdraw(("publish", withdrawn.id))
    queue = [withdrawn]
    frame, outcomes = core.encode_queued(kept, lambda: queue.pop() if queue else None)
    assert outcomes == [] and frame == encode(kept, Format.MSGPACK)
    assert core.encode_queued(withdrawn, lambda: None) == (None, [])


def test_frames_never_exceed_the_frame_limit() -> None:
    """Events are packed into frames within max_frame_bytes, in order; an event fitting in no
    frame fails with MessageTooLarge instead of being sent."""
    core = welcomed(max_frame_bytes=10_000, max_message_bytes=9_000)
    events: list[Any] = [core.publish("t", bytes([n]) * 4_000, ack=True, msg_id=None)
                         for n in range(5)]
    too_big = core.publish("t", b"x" * 9_500, ack=True, msg_id=None)
    events.insert(2, too_big)
    events.append(Subscribe(id=99, filter="f"))
    frames, outcomes = core.frames(events)
    assert all(len(frame) <= 10_000 for frame in frames)
    decoded = []
    for frame in frames:
        unpacked = msgpack.unpackb(frame)
        decoded += unpacked if isinstance(unpacked, list) else [unpacked]
    assert [e.get("id") for e in decoded] == [e.id for e in events if e is not too_big]
    [failed] = outcomes
    assert isinstance(failed, Failed) and failed.key == ("publish", too_big.id)
    assert isinstance(failed.error, MessageTooLarge) and failed.error.msg_id == too_big.msg_id


def test_a_1009_fails_the_requests_of_the_largest_frame() -> None:
    core = welcomed()
    small = core.publish("t", 1, ack=True, msg_id=None)
    large = core.publish("t", b"x" * 5_000, ack=True, msg_id=None)
    for event in (small, large):
        core.encode_queued(event, lambda: None)
    outcomes = core.refused_as_too_large()
    assert [o.key for o in outcomes if isinstance(o, Failed)] == [("publish", large.id)]
    assert ("publish", small.id) in core.pending and ("publish", large.id) not in core.pending
    assert core.refused_as_too_large() == []  # each 1009 fails what it found, once


def test_a_1009_on_a_frame_of_resubscriptions_makes_frames_smaller() -> None:
    """Nothing in the refused frame can be failed (established subscriptions, resent on every
    connection): later frames are capped at half its size, so reconnecting cannot loop."""
    core = welcomed()
    subscribes = [core.subscribe(f"filter/{n:04}") for n in range(200)]
    for event in subscribes:
        core.receive(encode(SubAck(id=event.id), Format.MSGPACK))
    core.open_connection()
    events, _ = core.resume()
    [frame], _ = core.frames(events)
    assert core.refused_as_too_large() == []
    frames, _ = core.frames(events)
    assert len(frames) > 1 and all(len(f) <= len(frame) // 2 for f in frames)


def test_resent_publishes_keep_their_msg_id() -> None:
    core = welcomed()
    publish = core.publish("t", 1, ack=True, msg_id=None)
    core.open_connection()
    events, _ = core.resume()
    assert events == [publish] and isinstance(events[0], Publish)
    assert events[0].msg_id == publish.msg_id is not None
