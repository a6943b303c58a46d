"""The payload rule (docs/protocol.md, "Payloads"), at the codec: a publish's payload is either
refused with its documented code, or it reaches a JSON and a msgpack subscriber as the same
value. Each case of issue 8 (items 1-5 and 9) is pinned here; a hypothesis suite covers the rest.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqbroker.message import InvalidEventId, Message, Position
from mqbroker.protocol import (
    Delivery,
    Dropped,
    EncodedMessage,
    Error,
    ErrorCode,
    Format,
    HandshakeFailed,
    Publish,
    Rejected,
    ServerConnection,
)
from mqbroker.protocol.codec import CLIENT_SPECS, MAX_DEPTH, SERVER_SPECS, decode
from tests.payload_strategies import json_text, parses, payload_values

MSGPACK, JSON = Format.MSGPACK, Format.JSON


def packed(value: Any) -> bytes:
    frame: bytes = msgpack.packb(value, use_bin_type=True)
    return frame


def publish_frame(payload_text: str) -> str:
    """A JSON publish frame with the payload written as raw JSON text."""
    return '{"op":"publish","topic":"t","id":7,"payload":' + payload_text + "}"


def msgpack_publish(payload: Any) -> bytes:
    return packed({"op": "publish", "topic": "t", "id": 7, "payload": payload})


def refused(frame: str | bytes, code: ErrorCode = ErrorCode.BAD_EVENT,
            ref: str | None = "publish") -> Rejected:
    """The frame's one item is refused with `code`; a bad_event carries the id and the op."""
    [item] = decode(frame, CLIENT_SPECS)
    assert isinstance(item, Rejected), item
    assert item.code is code, item
    if code is ErrorCode.BAD_EVENT:
        assert (item.id, item.ref) == (7, ref), item
    return item


def accepted(frame: str | bytes) -> Any:
    [item] = decode(frame, CLIENT_SPECS)
    assert isinstance(item, Publish), item
    return item.payload


def delivered(payload: Any, fmt: Format) -> Any:
    """The payload as a subscriber of format `fmt` decodes it from its delivery."""
    message = Message(topic="t", payload=payload, published_at=1.0, position=Position("e", 1))
    fragment = EncodedMessage(message).fragment(fmt, (1,))
    if isinstance(fragment, str):
        fragment.encode("utf-8")  # what the WebSocket layer does with a text frame
    [event] = decode(fragment, SERVER_SPECS)
    assert isinstance(event, Delivery), event
    return event.payload


# --- 1. lone surrogates ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    pytest.param(r'"\ud800"', id="string"),
    pytest.param(r'"ok\udfff"', id="lone-low"),
    pytest.param(r'{"\ud800": 1}', id="map-key"),
    pytest.param(r'[1, {"a": ["\udbff x"]}]', id="nested"),
])
def test_a_lone_surrogate_in_a_json_payload_is_refused(payload: str) -> None:
    """A JSON string may spell a lone surrogate (valid JSON), but it is not Unicode text and no
    msgpack session could receive it: the publish is refused with bad_event."""
    refused(publish_frame(payload))


def test_a_surrogate_pair_is_an_ordinary_character() -> None:
    """An escaped pair is one character (U+1F600 here), accepted and delivered as such."""
    assert accepted(publish_frame(r'"\ud83d\ude00"')) == "\U0001f600"


@pytest.mark.parametrize("frame", [
    pytest.param(r'{"op":"publish","topic":"a\ud800","id":7}', id="topic"),
    pytest.param(r'{"op":"publish","topic":"a","msg_id":"\ud800","id":7}', id="msg_id"),
    pytest.param(r'{"op":"publish","topic":"a","id":7,"x\ud800":1}', id="ignored-key"),
])
def test_a_lone_surrogate_anywhere_in_an_event_refuses_it(frame: str) -> None:
    """Not only payloads: a topic or key that is not Unicode text could not be delivered,
    logged or stored either."""
    refused(frame)


def test_an_op_with_a_lone_surrogate_gets_an_encodable_error() -> None:
    """The error answering an `op` that is not Unicode text does not echo it in `ref`, and the
    error frame encodes in both formats."""
    item = refused(r'{"op":"pub\ud800","id":7}', ErrorCode.BAD_EVENT, ref=None)
    for fmt in Format:
        server = ServerConnection(format=fmt)
        frame = server.error(item)
        if isinstance(frame, str):
            frame.encode("utf-8")


def test_a_hello_whose_client_is_not_text_fails_the_handshake() -> None:
    """The `client` name goes to the broker's logs: a lone surrogate in it refuses the hello
    with bad_event (then a 4000 close), like any ill-typed hello field."""
    with pytest.raises(HandshakeFailed) as failed:
        ServerConnection().receive(r'{"op":"hello","version":1,"client":"py\udc80"}')
    assert failed.value.error.code == ErrorCode.BAD_EVENT


def test_client_strings_echoed_in_errors_are_made_safe() -> None:
    """Whatever an Error carries, its frame is encodable and short: client text echoed in
    `ref` or `message` loses lone surrogates and is cut to a bounded length."""
    server = ServerConnection(format=JSON)
    frame = server.encode(Error(code="unknown_op", message="op \ud800" + "x" * 100_000,
                                ref="\udc00" + "y" * 100_000))
    assert isinstance(frame, str)
    frame.encode("utf-8")
    assert len(frame) < 2000
    msgpack_frame = ServerConnection(format=MSGPACK).encode(Error(code="x", message="\ud800"))
    assert msgpack.unpackb(msgpack_frame)["message"] == "\ufffd"


# --- 2. NaN and infinities -------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    pytest.param(msgpack_publish(math.nan), id="msgpack-float64-nan"),
    pytest.param(msgpack_publish(math.inf), id="msgpack-float64-inf"),
    pytest.param(msgpack_publish([-math.inf]), id="msgpack-nested-minus-inf"),
    pytest.param(msgpack_publish({"a": math.nan}), id="msgpack-in-map"),
    pytest.param(b"\x84\xa2op\xa7publish\xa5topic\xa1t\xa2id\x07\xa7payload\xca"
                 + struct.pack(">f", math.nan), id="msgpack-float32-nan"),
    pytest.param(b"\x84\xa2op\xa7publish\xa5topic\xa1t\xa2id\x07\xa7payload\xca"
                 + struct.pack(">f", math.inf), id="msgpack-float32-inf"),
    pytest.param(publish_frame("1e400"), id="json-1e400"),
    pytest.param(publish_frame("[-1e400]"), id="json-nested-minus-1e400"),
])
def test_nan_and_infinities_are_refused(frame: str | bytes) -> None:
    """JSON has no NaN or infinity: a payload holding one (a msgpack float, or a JSON number
    beyond a double) is refused with bad_event, whichever format it came in."""
    refused(frame)


def test_the_json_nan_token_is_not_json() -> None:
    """`NaN` is not a JSON token: the frame does not parse (bad_frame)."""
    refused(publish_frame("NaN"), ErrorCode.BAD_FRAME)


def test_tiny_numbers_round_to_a_double() -> None:
    """A JSON number below the smallest double is read as 0.0 (not refused) and travels so."""
    assert accepted(publish_frame("[1e-400, -0.0, 5e-324]")) == [0.0, -0.0, 5e-324]


def test_msgpack_float32_reaches_subscribers_as_float64() -> None:
    """Documented: a float 32 is carried as the same value in a float 64."""
    frame = b"\x84\xa2op\xa7publish\xa5topic\xa1t\xa2id\x07\xa7payload\xca" + struct.pack(
        ">f", 1.5)
    payload = accepted(frame)
    assert payload == 1.5
    message = Message(topic="t", payload=payload, published_at=1.0, position=Position("e", 1))
    assert b"\xa7payload\xcb" + struct.pack(">d", 1.5) in EncodedMessage(message).fragment(
        MSGPACK, (1,))


# --- 3. extension types ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    pytest.param(msgpack.ExtType(5, b"x"), id="type-5"),
    pytest.param(msgpack.Timestamp(1, 0), id="timestamp"),
    pytest.param([1, {"at": msgpack.Timestamp(1_700_000_000, 5)}], id="nested-timestamp"),
])
def test_msgpack_extension_types_are_refused(payload: Any) -> None:
    """No extension type is part of the protocol, the timestamp (-1) included: bad_event."""
    refused(msgpack_publish(payload))


def test_a_reserved_extension_type_is_refused() -> None:
    """Type -5 (reserved by msgpack for future use; msgpack-python cannot even build it)."""
    refused(b"\x84\xa2op\xa7publish\xa5topic\xa1t\xa2id\x07\xa7payload\xd4\xfbx")


def test_an_extension_in_an_ignored_key_is_ignored() -> None:
    """Keys an event does not define are ignored, whatever they hold."""
    frame = packed({"op": "ping", "id": 3, "future": msgpack.Timestamp(1, 0)})
    [item] = decode(frame, CLIENT_SPECS)
    assert not isinstance(item, Rejected), item


# --- 4. $base64 ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["!!!!", "AAEC\n/w==", "AAEC!/w==", "AAEC/w==AAEC", "abc",
                                  "AB==", "AAEC/w", "AAEC/w=", " AAEC/w==", "AAEC-_8="])
def test_only_canonical_base64_is_binary(text: str) -> None:
    """`$base64` holds standard base64 with padding, exactly as an encoder writes it (RFC 4648
    section 4): anything else is refused with bad_event, never read leniently."""
    refused(publish_frame(json.dumps({"$base64": text})))


@pytest.mark.parametrize(("text", "data"), [("", b""), ("AA==", b"\x00"),
                                            ("AAEC/w==", b"\x00\x01\x02\xff")])
def test_canonical_base64_is_binary(text: str, data: bytes) -> None:
    assert accepted(publish_frame(json.dumps({"$base64": text}))) == data


def test_a_msgpack_base64_map_is_refused() -> None:
    """A msgpack map of exactly one string `$base64` would reach JSON sessions as binary and
    msgpack sessions as a map: it is refused (binary travels in msgpack as bin)."""
    refused(msgpack_publish({"$base64": "AAE="}))
    refused(msgpack_publish([{"$base64": "!!!!"}]))
    assert accepted(msgpack_publish({"$base64": "AAE=", "x": 1})) == {"$base64": "AAE=", "x": 1}


# --- depth, integers, keys ---------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("fmt", list(Format))
def test_nesting_is_bounded(fmt: Format) -> None:
    """MAX_DEPTH (64) nested arrays or maps are carried; one more is refused with bad_event."""
    assert MAX_DEPTH == 64
    for depth, ok in ((MAX_DEPTH, True), (MAX_DEPTH + 1, False)):
        frame = (publish_frame(json.dumps(nested(depth))) if fmt is JSON
                 else msgpack_publish(nested(depth)))
        if ok:
            assert accepted(frame) == nested(depth)
            assert delivered(nested(depth), JSON) == delivered(nested(depth), MSGPACK)
        else:
            refused(frame)


def test_json_nested_a_thousand_levels_is_a_bad_frame() -> None:
    """Too deep to parse at all: bad_frame, not a RecursionError."""
    refused(publish_frame("[" * 1000 + "]" * 1000), ErrorCode.BAD_FRAME)
    refused(publish_frame("[" * 100_000 + "]" * 100_000), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize(("number", "ok"), [(2**64 - 1, True), (2**64, False),
                                            (-(2**63), True), (-(2**63) - 1, False)])
def test_integers_are_those_msgpack_carries(number: int, ok: bool) -> None:
    frame = publish_frame(f"[{number}]")
    if ok:
        assert accepted(frame) == [number]
        assert delivered([number], JSON) == delivered([number], MSGPACK) == [number]
    else:
        refused(frame)


def test_a_binary_map_key_is_refused() -> None:
    refused(msgpack_publish({b"k": 1}))


def test_an_integer_map_key_does_not_parse() -> None:
    """msgpack maps are read with string (or binary) keys only, which also keeps the decoder
    safe from hash flooding: any other key type makes the frame bad_frame."""
    refused(msgpack_publish({1: 1}), ErrorCode.BAD_FRAME)


# --- 5. since ----------------------------------------------------------------------------------


@pytest.mark.parametrize("since", ["ab-\u00b2", "ab-\u0661", "\u00e9-1", "ab-" + "1" * 5000,
                                   "ab-" + "9" * 30])
def test_event_ids_are_ascii_and_bounded(since: str) -> None:
    """Unicode digits or letters, or an offset of absurd length, never name a position."""
    with pytest.raises(InvalidEventId):
        Position.parse(since)


def test_a_long_since_is_cut_in_the_error_message() -> None:
    with pytest.raises(InvalidEventId) as raised:
        Position.parse("ab-" + "1" * 5000)
    assert len(str(raised.value)) < 200


# --- defence in depth: a message that cannot be encoded --------------------------------------


@pytest.mark.parametrize("payload", ["\ud800", {"a": math.nan}, msgpack.Timestamp(1, 0)])
def test_an_unencodable_message_becomes_dropped(payload: Any) -> None:
    """Were a message that a format cannot carry ever to reach a session (the payload rule
    refuses it at publish), its delivery is replaced by `dropped` with count 1, and the
    encoded message records why, instead of raising into the deliverer."""
    message = Message(topic="t", payload=payload, published_at=1.0, position=Position("e", 1))
    encoded = EncodedMessage(message)
    outcomes = []
    for fmt in Format:
        fragment = encoded.fragment(fmt, (1,))
        if isinstance(fragment, str):
            fragment.encode("utf-8")
        [event] = decode(fragment, SERVER_SPECS)
        outcomes.append(event)
    assert Dropped(count=1) in outcomes
    assert encoded.problem is not None


# --- the property: refused, or the same value for every subscriber ---------------------------


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payload_values, fmt=st.sampled_from(list(Format)))
def test_every_payload_is_refused_or_reaches_both_formats_alike(payload: Any,
                                                                fmt: Format) -> None:
    """Decoded as a publish from either format: either refused with its documented code
    (bad_event; bad_frame only for a JSON frame that does not parse), or the payload encodes
    for a JSON and a msgpack subscriber, each decodes the same value, and encoding it again
    (a replay) gives the same frames."""
    if fmt is JSON:
        frame: str | bytes = publish_frame(json_text(payload))
    else:
        try:
            frame = msgpack_publish(payload)
        except (OverflowError, UnicodeEncodeError, ValueError):
            return  # not even msgpack: no msgpack client can send it
    [item] = decode(frame, CLIENT_SPECS)
    if isinstance(item, Rejected):
        frame_level = isinstance(frame, str) and not parses(frame)
        assert item.code is (ErrorCode.BAD_FRAME if frame_level else ErrorCode.BAD_EVENT), item
        if item.code is ErrorCode.BAD_EVENT:
            assert (item.id, item.ref) == (7, "publish")
        return
    assert isinstance(item, Publish)
    as_json, as_msgpack = delivered(item.payload, JSON), delivered(item.payload, MSGPACK)
    assert as_json == as_msgpack == item.payload
    assert _same_types(as_json, as_msgpack)
    message = Message(topic="t", payload=item.payload, published_at=1.0,
                      position=Position("e", 1))
    for fmt_out in Format:
        first = EncodedMessage(message).fragment(fmt_out, (1,))
        again = EncodedMessage(message).fragment(fmt_out, (1,))
        assert first == again


def _same_types(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    return True


def test_the_document_states_the_rule_the_codec_enforces() -> None:
    """docs/protocol.md's payload rule names the code, the depth and the integer range that
    the codec uses, and its error example is the codec's own answer."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
    rule = doc.split("#### The payload rule", 1)[1].split("**The `$base64` convention**", 1)[0]
    assert "**`bad_event`**" in rule
    assert f"more than {MAX_DEPTH} nested arrays and maps" in rule
    assert "-2^63 .. 2^64-1" in rule
    example = rule.split("```json\n")[1].split("```")[0]
    answer = json.loads(rule.split("```json\n")[2].split("```")[0])
    [item] = decode(example, CLIENT_SPECS)
    assert isinstance(item, Rejected)
    assert (item.code, item.id, item.ref, item.message) == (
        answer["code"], answer["id"], answer["ref"], answer["message"])
