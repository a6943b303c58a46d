"""Hostile input through a real broker (issue 8): a payload one format cannot carry never
poisons a topic, malformed requests get their documented errors instead of a 1011 close, and a
hypothesis fuzz over every request field leaves each session usable, with no error logged."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from mqbroker.config import Config, FanoutConfig, HistoryConfig, ServerConfig
from mqbroker.message import Draft
from mqbroker.protocol import (
    Delivery,
    Dropped,
    Error,
    ErrorCode,
    Format,
    Ping,
    Pong,
    PubAck,
    Publish,
    Rejected,
    SubAck,
    Subscribe,
)
from mqbroker.protocol.codec import CLIENT_SPECS, MAX_ID, decode
from tests.harness import RawSession, RunningBroker, raw_session, running_broker
from tests.payload_strategies import json_text, payload_values

MSGPACK, JSON = Format.MSGPACK, Format.JSON
#: A recorded topic (the default `[history] record` has mcp/broadcast/#).
TOPIC = "mcp/broadcast/hostile"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def any_broker(request: pytest.FixtureRequest) -> AsyncIterator[RunningBroker]:
    """A broker on the memory plugins, or on the Redis plugins with a private redis-server."""
    config = Config(server=ServerConfig(port=0))
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        config = Config(server=ServerConfig(port=0), fanout=FanoutConfig(plugin="redis"),
                        history=HistoryConfig(plugin="redis"),
                        plugins={"redis": {"url": server.url}})
    async with running_broker(config) as running:
        yield running


def error_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["log_level"] in ("error", "critical")]


async def answered(session: RawSession, ping_id: int) -> list[Any]:
    """Ping and read until the pong: every event received before it (the session is usable)."""
    await session.send(Ping(id=ping_id))
    events = []
    while True:
        event = await session.next_event()
        if event == Pong(id=ping_id):
            return events
        events.append(event)


async def next_delivery(session: RawSession) -> Delivery:
    event = await session.next_event()
    assert isinstance(event, Delivery), event
    return event


# --- a poisoned payload --------------------------------------------------------------------


def _float32_publish(value: float, request_id: int) -> bytes:
    return (b"\x84\xa2op\xa7publish\xa5topic" + msgpack.packb(TOPIC) + b"\xa2id"
            + msgpack.packb(request_id) + b"\xa7payload\xca" + struct.pack(">f", value))


def _json_publish(request_id: int, payload: str) -> str:
    return f'{{"op":"publish","topic":"{TOPIC}","id":{request_id},"payload":{payload}}}'


#: (format, frame, request id) of each poisoned publish of issue 8, items 1-4.
POISON: list[tuple[Format, str | bytes, int]] = [
    (JSON, _json_publish(10, '"\\ud800"'), 10),
    (JSON, _json_publish(11, '{"\\udc00":[1]}'), 11),
    (JSON, _json_publish(12, "[1e400]"), 12),
    (JSON, _json_publish(13, '{"$base64":"!!!!"}'), 13),
    (JSON, _json_publish(14, '{"$base64":"AAEC/w==AAEC"}'), 14),
    (MSGPACK, msgpack.packb({"op": "publish", "topic": TOPIC, "id": 15, "payload": math.nan}),
     15),
    (MSGPACK, _float32_publish(math.inf, 16), 16),
    (MSGPACK, msgpack.packb({"op": "publish", "topic": TOPIC, "id": 17,
                             "payload": msgpack.Timestamp(1, 0)}), 17),
    (MSGPACK, msgpack.packb({"op": "publish", "topic": TOPIC, "id": 18,
                             "payload": [msgpack.ExtType(5, b"x")]}), 18),
]


async def test_a_poisoned_payload_is_refused_and_never_reaches_a_history(
        any_broker: RunningBroker) -> None:
    """Each poisoned publish is refused with bad_event and its id, its publisher carries on;
    a JSON and a msgpack subscriber receive exactly the good messages live, and a resume with
    `since` over the topic, in either format, replays them (recovered: true). With the memory
    plugins and with Redis."""
    broker = any_broker
    with capture_logs() as logs:
        async with raw_session(broker.url, fmt=JSON) as json_pub, \
                raw_session(broker.url) as msgpack_pub, \
                raw_session(broker.url, fmt=JSON) as json_sub, \
                raw_session(broker.url) as msgpack_sub:
            publishers = {JSON: json_pub, MSGPACK: msgpack_pub}
            for subscriber in (json_sub, msgpack_sub):
                await subscriber.send(Subscribe(id=1, filter=TOPIC))
                assert isinstance(await subscriber.next_event(), SubAck)
            await json_pub.send(Publish(topic=TOPIC, payload="first", id=1))
            first = await json_pub.next_event()
            assert isinstance(first, PubAck)
            good = ["first"]
            for n, (fmt, frame, request_id) in enumerate(POISON):
                await publishers[fmt].send_frame(frame)
                error = await publishers[fmt].next_event()
                assert isinstance(error, Error), (frame, error)
                assert (error.code, error.id, error.ref) == ("bad_event", request_id,
                                                             "publish"), error
                await publishers[fmt].send(Publish(topic=TOPIC, payload=f"good {n}", id=100 + n))
                assert isinstance(await publishers[fmt].next_event(), PubAck)
                good.append(f"good {n}")
            for subscriber in (json_sub, msgpack_sub):
                assert [(await next_delivery(subscriber)).payload for _ in good] == good
                assert await answered(subscriber, 1) == []
            for fmt in Format:
                async with raw_session(broker.url, fmt=fmt) as resumer:
                    await resumer.send(Subscribe(id=2, filter=TOPIC, since=first.event))
                    suback = await resumer.next_event()
                    assert attrs.evolve(suback, last=None) == SubAck(id=2, recovered=True)
                    replayed = [(await next_delivery(resumer)).payload for _ in good[1:]]
                    assert replayed == good[1:]
                    assert await answered(resumer, 3) == []
    assert error_logs(logs) == []


async def test_an_unencodable_message_reaches_every_target_as_dropped(
        broker: RunningBroker) -> None:
    """Defence in depth: a message no format can carry, handed to the fan-out behind the
    codec's back, reaches each matching session as `dropped` (count 1), every target is
    served, the next message arrives normally, and one error line says what happened."""
    with capture_logs() as logs:
        async with raw_session(broker.url, fmt=JSON) as json_sub, \
                raw_session(broker.url) as msgpack_sub:
            for subscriber in (json_sub, msgpack_sub):
                await subscriber.send(Subscribe(id=1, filter="x/#"))
                assert isinstance(await subscriber.next_event(), SubAck)
            now = time.time()
            await broker.broker.fanout.publish([
                Draft(topic="x/1", payload="\ud800", published_at=now),
                Draft(topic="x/1", payload="after", published_at=now)])
            for subscriber in (json_sub, msgpack_sub):
                assert await subscriber.next_event() == Dropped(count=1)
                assert (await next_delivery(subscriber)).payload == "after"
    [line] = error_logs(logs)
    assert line["event"] == "message.unencodable"


# --- requests that used to close the session with 1011 ----------------------------------------


@pytest.mark.parametrize(("fmt", "frame", "code"), [
    pytest.param(JSON, '{"op":"publish","topic":"t","payload":' + "[" * 1000 + "]" * 1000
                 + "}", ErrorCode.BAD_FRAME, id="json-nested-1000"),
    pytest.param(JSON, '{"op":"subscribe","id":4,"filter":"t","since":"ab-\u00b2"}',
                 ErrorCode.BAD_EVENT_ID, id="since-unicode-digit"),
    pytest.param(MSGPACK, msgpack.packb({"op": "subscribe", "id": 4, "filter": "t",
                                         "since": "ab-" + "1" * 5000}),
                 ErrorCode.BAD_EVENT_ID, id="since-5000-digits"),
    pytest.param(JSON, '{"op":"launch\\ud800","id":4}', ErrorCode.BAD_EVENT,
                 id="op-lone-surrogate"),
    pytest.param(JSON, '{"op":"' + "x" * 100_000 + '","id":4}', ErrorCode.UNKNOWN_OP,
                 id="op-huge"),
])
async def test_malformed_requests_get_errors_not_1011(broker: RunningBroker, fmt: Format,
                                                      frame: str | bytes,
                                                      code: ErrorCode) -> None:
    """Each is answered with its documented error, the session stays usable, nothing is
    logged at error level."""
    with capture_logs() as logs:
        async with raw_session(broker.url, fmt=fmt) as session:
            await session.send_frame(frame)
            error = await session.next_event()
            assert isinstance(error, Error) and error.code == code, error
            assert error.ref is None or len(error.ref) <= 100
            assert len(error.message) <= 1100
            assert await answered(session, 5) == []
    assert error_logs(logs) == []


# --- the request fuzz ------------------------------------------------------------------------

FENCE = MAX_ID - 7  # the id of the ping that ends each example; no generated id equals it
FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("version", "client"),
    "subscribe": ("id", "filter", "since"),
    "unsubscribe": ("id",),
    "publish": ("topic", "payload", "id", "msg_id"),
    "forget": ("id", "filter"),
    "ping": ("id",),
}
#: The codes each operation may be answered with (docs/protocol.md), besides its success.
CODES: dict[str, set[str]] = {
    "hello": {"bad_event", "already_hello"},
    "subscribe": {"bad_event", "duplicate_subscription", "too_many_subscriptions",
                  "invalid_filter", "since_unsupported", "bad_event_id", "unavailable"},
    "unsubscribe": {"bad_event", "unknown_subscription"},
    "publish": {"bad_event", "invalid_topic", "message_too_large", "unavailable"},
    "forget": {"bad_event", "invalid_filter", "unavailable"},
    "ping": {"bad_event"},
}
SUCCESS = {"subscribe": "suback", "unsubscribe": "unsuback", "publish": "puback",
           "forget": "forgot", "ping": "pong"}

weird_text = st.text(max_size=6) | st.sampled_from([
    "\ud800", "a\udfff", "ab-\u00b2", "ab-\u0661", "ab-" + "1" * 5000, "x" * 3000, "fz/+",
    "fz/#", "a/#/b", "", "\x00", "$SYS/x", "fz/\U0001f600"])
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1).filter(lambda v: v != FENCE)
junk_scalars = (st.none() | st.booleans() | ints | st.floats() | weird_text
                | st.binary(max_size=4)
                | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2))
                | st.just(msgpack.Timestamp(1, 0))
                | st.sampled_from(["!!!!", "AAE=", "AB=="]).map(lambda s: {"$base64": s}))
junk = st.recursive(junk_scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3) | st.sampled_from(["\ud800"]),
                                      inner, max_size=3), max_leaves=6)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(0, 40),
    "version": st.sampled_from([1, 2]),
    "client": weird_text,
    "filter": st.sampled_from(["fz/a", "fz/+", "fz/#", "fz/b/c", "a/#/b", "fz/a+", ""]),
    "since": st.sampled_from(["zz-1", "ab-\u00b2", "zz-" + "9" * 25, "nope", "-1"]),
    "topic": st.sampled_from(["fz/a", "fz/b/c", "fz/+", "", "fz/\ud800"]),
    "payload": junk,
    "msg_id": weird_text,
}


@st.composite
def requests(draw: st.DrawFn) -> Any:
    """A request map with each field absent, plausible or junk; sometimes not a map at all."""
    if draw(st.integers(0, 15)) == 0:
        return draw(junk_scalars)
    op = draw(st.sampled_from(list(FIELDS)) | st.sampled_from(["launch", "message"])
              | junk_scalars)
    item: dict[Any, Any] = {"op": op}
    for name in FIELDS.get(op, ("id",)) if type(op) is str else ("id",):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            continue
        item[name] = draw(junk) if choice == 1 else draw(GOOD[name])
    if draw(st.integers(0, 7)) == 0:
        item[draw(st.sampled_from(["future", "x\ud800"]))] = draw(junk)
    return item


def _jsonable(value: Any) -> Any:
    """The value as a JSON client holds it: bytes as {"$base64": ...}, extension values (which
    JSON lacks; ExtType is a tuple) as strings."""
    if isinstance(value, msgpack.ExtType | msgpack.Timestamp):
        return repr(value)
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _json_frame(value: Any) -> str:
    return json.dumps(_jsonable(value))  # NaN, infinities as tokens; surrogates as \u escapes


def _frame(batch: list[Any], single: bool, fmt: Format) -> tuple[str | bytes, bool]:
    """The frame, and whether it is expected to be refused whole with one bad_frame."""
    value = batch[0] if single else batch
    if fmt is JSON:
        frame = _json_frame(value)
        batch[:] = [_jsonable(item) for item in batch]  # what the broker will see
        try:
            json.loads(frame, parse_constant=_refuse)
        except ValueError:
            return frame, True
        return frame, False
    try:
        return msgpack.packb(value, use_bin_type=True), False
    except UnicodeEncodeError:  # invalid UTF-8 in a str: a msgpack frame that does not parse
        return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass"), True


def _refuse(token: str) -> Any:
    raise ValueError(token)


def _valid_id(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_ID else None


def _is_event_map(item: Any, fmt: Format) -> bool:
    # In JSON an object of exactly one string `$base64` is binary data, not a map.
    return type(item) is dict and not (fmt is JSON and len(item) == 1
                                       and type(item.get("$base64")) is str)


def _check_replies(batch: list[Any], replies: list[Any], fmt: Format) -> None:
    """Replies in request order, each with a documented code and the request's id and op."""
    pending = list(replies)
    for item in batch:
        if not _is_event_map(item, fmt):
            error = pending.pop(0)
            assert isinstance(error, Error) and error.code == "bad_frame", (item, error)
            continue
        op = item.get("op")
        request_id = _valid_id(item.get("id"))
        if type(op) is not str or op not in FIELDS:
            error = pending.pop(0)
            assert isinstance(error, Error) and error.code in ("unknown_op", "bad_event"), error
            assert error.id == request_id, (item, error)
            continue
        if op == "publish" and request_id is None:
            # Fire and forget: an error only when refused.
            if pending and isinstance(pending[0], Error) and pending[0].ref == "publish" \
                    and pending[0].id is None:
                assert pending.pop(0).code in CODES[op]
            continue
        reply = pending.pop(0)
        if isinstance(reply, Error):
            assert reply.code in CODES[op], (item, reply)
            assert reply.ref in (op, None), (item, reply)
            if reply.ref is not None:
                assert reply.id == (None if op == "hello" else request_id), (item, reply)
        else:
            assert reply.OP == SUCCESS[op], (item, reply)
            assert getattr(reply, "id", None) == request_id, (item, reply)
    assert pending == [], pending


async def _exchange(session: RawSession, frame: str | bytes) -> list[Any]:
    """Send a frame, then a ping: the replies before the pong (deliveries set aside)."""
    await session.send_frame(frame)
    events = await answered(session, FENCE)
    for event in events:
        assert not isinstance(event, Rejected | Dropped), event
    return [event for event in events if not isinstance(event, Delivery)]


async def test_fuzzed_requests_get_documented_errors_and_never_break_the_session(
        broker: RunningBroker) -> None:
    """1000 frames of fuzzed requests (every op, batches, random types and values in every
    field) to a JSON and a msgpack session of one broker: every item is answered in order with
    its success or a documented error carrying its id, each session answers a ping after every
    frame (it is never closed), deliveries always decode, and nothing is logged at error
    level."""
    with capture_logs() as logs:
        async with raw_session(broker.url) as msgpack_session, \
                raw_session(broker.url, fmt=JSON) as json_session:
            sessions = {MSGPACK: msgpack_session, JSON: json_session}

            @settings(max_examples=1000, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(batch=st.lists(requests(), min_size=1, max_size=3), single=st.booleans(),
                   fmt=st.sampled_from(list(Format)))
            def fuzz(batch: list[Any], single: bool, fmt: Format) -> None:
                try:
                    frame, whole = _frame(batch, single and len(batch) == 1, fmt)
                except (OverflowError, ValueError):
                    assume(False)  # not expressible in this format at all
                    return
                replies = trio.from_thread.run(_exchange, sessions[fmt], frame)
                if whole:
                    [error] = replies
                    assert isinstance(error, Error) and error.code == "bad_frame", error
                else:
                    _check_replies(batch, replies, fmt)

            await trio.to_thread.run_sync(fuzz)
    assert error_logs(logs) == []


# --- generated payloads, end to end ----------------------------------------------------------

GENERATED = "mcp/broadcast/generated"


def _publish_frame(payload: Any, fmt: Format, request_id: int) -> str | bytes | None:
    if fmt is JSON:
        return (f'{{"op":"publish","topic":"{GENERATED}","id":{request_id},'
                f'"payload":{json_text(payload)}}}')
    try:
        frame: bytes = msgpack.packb({"op": "publish", "topic": GENERATED, "id": request_id,
                                      "payload": payload}, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, ValueError):
        return None  # no msgpack client could send it
    return frame


async def _publish_and_deliver(publisher: RawSession, frame: str | bytes,
                               subscribers: list[RawSession]) -> tuple[Any, list[Any]]:
    """The publisher's answer, and what each subscriber received (None when refused)."""
    await publisher.send_frame(frame)
    answer = await publisher.next_event()
    if not isinstance(answer, PubAck):
        return answer, []
    return answer, [(await next_delivery(subscriber)).payload for subscriber in subscribers]


async def test_generated_payloads_through_a_broker(broker: RunningBroker) -> None:
    """200 generated payloads, published from a JSON or a msgpack session to a recorded topic:
    each is acknowledged exactly when the codec accepts it (else refused with the codec's code
    and the publish's id), a JSON and a msgpack subscriber both receive each accepted payload
    as the value the publisher meant, and a resume with `since` in either format replays
    exactly those, in order, with recovered: true. Nothing is logged at error level."""
    with capture_logs() as logs:
        async with raw_session(broker.url, fmt=JSON) as json_pub, \
                raw_session(broker.url) as msgpack_pub, \
                raw_session(broker.url, fmt=JSON) as json_sub, \
                raw_session(broker.url) as msgpack_sub:
            publishers = {JSON: json_pub, MSGPACK: msgpack_pub}
            subscribers = [json_sub, msgpack_sub]
            for subscriber in subscribers:
                await subscriber.send(Subscribe(id=1, filter=GENERATED))
                assert isinstance(await subscriber.next_event(), SubAck)
            await json_pub.send(Publish(topic=GENERATED, payload="start", id=0))
            start = await json_pub.next_event()
            assert isinstance(start, PubAck)
            for subscriber in subscribers:
                assert (await next_delivery(subscriber)).payload == "start"
            accepted: list[Any] = []
            request_ids = iter(range(1, 10**6))

            @settings(max_examples=200, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(payload=payload_values, fmt=st.sampled_from(list(Format)))
            def publish_one(payload: Any, fmt: Format) -> None:
                request_id = next(request_ids)
                frame = _publish_frame(payload, fmt, request_id)
                assume(frame is not None)
                assert frame is not None
                [verdict] = decode(frame, CLIENT_SPECS)
                answer, received = trio.from_thread.run(
                    _publish_and_deliver, publishers[fmt], frame, subscribers)
                if isinstance(verdict, Rejected):
                    assert isinstance(answer, Error), (verdict, answer)
                    assert (answer.code, answer.id) == (verdict.code, verdict.id), answer
                    return
                assert answer == PubAck(id=request_id, event=answer.event), answer
                assert received == [verdict.payload, verdict.payload]
                accepted.append(verdict.payload)

            await trio.to_thread.run_sync(publish_one)
            assert accepted, "some generated payloads are accepted"
            for fmt in Format:
                async with raw_session(broker.url, fmt=fmt) as resumer:
                    await resumer.send(Subscribe(id=2, filter=GENERATED, since=start.event))
                    suback = await resumer.next_event()
                    assert attrs.evolve(suback, last=None) == SubAck(id=2, recovered=True)
                    replayed = [(await next_delivery(resumer)).payload for _ in accepted]
                    assert replayed == accepted
                    assert await answered(resumer, 3) == []
    assert error_logs(logs) == []
