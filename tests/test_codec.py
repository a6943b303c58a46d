"""The sans-IO protocol without an event loop: a client and a server connection object passing
frames to each other (h11's style), codec round trips over every event in both formats, batches,
shared delivery encodings, per-item rejection, the JSON `$base64` convention and the handshake."""

from __future__ import annotations

import base64
import json
import typing
from collections.abc import Sequence
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqbroker.message import Message, Position
from mqbroker.protocol import (
    CLIENT_EVENTS,
    PROTOCOL_VERSION,
    SERVER_EVENTS,
    ClientConnection,
    ClientEvent,
    Delivery,
    EncodedMessage,
    Error,
    ErrorCode,
    Event,
    Forget,
    Format,
    Frame,
    HandshakeFailed,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    Rejected,
    ServerConnection,
    ServerEvent,
    State,
    SubAck,
    Subscribe,
    Unsubscribe,
    Welcome,
    join,
)
from mqbroker.protocol.codec import (
    CLIENT_SPECS,
    MAX_ID,
    SERVER_SPECS,
    decode,
    encode,
    event_map,
)
from mqbroker.protocol.connection import safe_error

FORMATS = list(Format)
WELCOME = Welcome(version=PROTOCOL_VERSION, instance="i1", session="s1",
                  limits={"max_frame_bytes": 1024})


# --- strategies ------------------------------------------------------------------------------

ids = st.integers(min_value=0, max_value=MAX_ID)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)


def _is_base64_map(value: dict[str, Any]) -> bool:
    # A JSON object of exactly one string `$base64` is binary by definition (docs/protocol.md,
    # "Payloads"); such maps cannot round-trip through JSON and are pinned separately below.
    return len(value) == 1 and isinstance(value.get("$base64"), str)


def _maps(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=8), values, max_size=4).filter(
        lambda d: not _is_base64_map(d))


#: Every payload of the protocol's data model: the intersection of msgpack's and JSON's.
payloads: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | finite_floats | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | _maps(children),
    max_leaves=12,
)

_BY_TYPE: dict[Any, st.SearchStrategy[Any]] = {
    int: ids,
    str: st.text(),
    float: finite_floats,
    bool: st.booleans(),
    dict[str, Any]: _maps(payloads),
    tuple[int, ...]: st.lists(ids, max_size=20).map(tuple),
    tuple[str, ...]: st.lists(st.text(), max_size=20).map(tuple),
    tuple[dict[str, Any] | None, ...]: st.lists(st.none() | _maps(payloads),
                                                max_size=5).map(tuple),
    Any: payloads,
}


def _field_strategy(hint: Any, required: bool) -> st.SearchStrategy[Any]:
    args = typing.get_args(hint)
    if type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return st.none() | _BY_TYPE[inner]
    strategy = _BY_TYPE[hint]
    if required and hint is Any:
        # A required payload (a delivery's) that is null is the known defect pinned by
        # test_a_delivery_with_a_null_payload_decodes.
        strategy = strategy.filter(lambda value: value is not None)
    return strategy


def event_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Any valid instance of an event class, built from its field annotations."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: _field_strategy(hints[f.name], f.default is attrs.NOTHING)
              for f in attrs.fields(cls)}
    return st.builds(cls, **fields)


client_events = st.one_of([event_strategy(cls) for cls in CLIENT_EVENTS])
server_events = st.one_of([event_strategy(cls) for cls in SERVER_EVENTS])
any_events = client_events | server_events


def specs_of(event: Event) -> Any:
    return CLIENT_SPECS if type(event) in CLIENT_EVENTS else SERVER_SPECS


# --- two connection objects talking ----------------------------------------------------------


def open_pair(fmt: Format) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server connection through the handshake, frames passed by hand."""
    client, server = ClientConnection(format=fmt), ServerConnection()
    assert server.receive(client.hello("test-client")) == []
    assert client.receive(server.encode(WELCOME)) == [WELCOME]
    return client, server


def to_server(client: ClientConnection, server: ServerConnection,
              *events: ClientEvent) -> list[ClientEvent | Rejected]:
    return server.receive(client.encode_batch(events))


def to_client(server: ServerConnection, client: ClientConnection,
              *events: ServerEvent) -> list[ServerEvent | Rejected]:
    return client.receive(join([server.encode(e) for e in events], server.format))


def frame_of(value: Any, fmt: Format) -> Frame:
    """A raw value as a frame, bypassing the codec (to send what the codec would not)."""
    if fmt is Format.JSON:
        return json.dumps(value)
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


# --- a conversation --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_whole_conversation_between_connection_objects(fmt: Format) -> None:
    """Hello, welcome, requests and their answers travel as frames of the session's format and
    arrive as the same events, batches included."""
    client, server = open_pair(fmt)
    assert (server.state, client.state) == (State.OPEN, State.OPEN)
    assert server.format is fmt and server.client == "test-client"
    assert client.welcome == WELCOME

    requests: list[ClientEvent] = [
        Subscribe(id=1, filter="chat/+"),
        Publish(topic="chat/a", payload=b"\x00", id=2, msg_id="m"),
        Ping(id=3),
    ]
    assert to_server(client, server, *requests) == requests
    answers: list[ServerEvent] = [
        SubAck(id=1),
        PubAck(id=2, event="e-1"),
        Pong(id=3),
        Delivery(subs=(1,), topic="chat/a", event="e-1", payload=b"\x00", time=1.5),
    ]
    assert to_client(server, client, *answers) == answers
    frame = server.encode(Pong(id=4))
    assert isinstance(frame, str if fmt is Format.JSON else bytes)


# --- round trips -----------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(event=any_events, fmt=st.sampled_from(FORMATS))
def test_every_event_round_trips_through_the_codec(event: Event, fmt: Format) -> None:
    """Any valid event of either direction, encoded in either format, decodes into an equal
    event, and re-encodes into the very same frame (so no value changes type on the way)."""
    frame = encode(event, fmt)
    assert decode(frame, specs_of(event)) == [event]
    assert encode(decode(frame, specs_of(event))[0], fmt) == frame


@settings(max_examples=500, deadline=None)
@given(events=st.lists(client_events.filter(lambda e: not isinstance(e, Hello)), min_size=1,
                       max_size=5),
       replies=st.lists(server_events, min_size=1, max_size=5), fmt=st.sampled_from(FORMATS))
def test_events_round_trip_between_connection_objects(events: list[ClientEvent],
                                                      replies: list[ServerEvent],
                                                      fmt: Format) -> None:
    """After the handshake, whatever the client sends the server receives, and the other way
    round, one event or a batch (errors as the broker sends them: what they echo of a client's
    text is cut to a bounded length)."""
    client, server = open_pair(fmt)
    assert to_server(client, server, *events) == events
    sent = [safe_error(r) if isinstance(r, Error) else r for r in replies]
    assert to_client(server, client, *replies) == sent


# --- batches ---------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(events=st.lists(server_events, min_size=1, max_size=40))
def test_a_joined_batch_is_the_array_of_its_events(events: list[ServerEvent]) -> None:
    """`join` makes one frame of encoded events: in msgpack exactly the bytes of the array of
    their maps (array headers included), in JSON the array; one event stays a bare map."""
    packed = join([encode(e, Format.MSGPACK) for e in events], Format.MSGPACK)
    text = join([encode(e, Format.JSON) for e in events], Format.JSON)
    maps = [event_map(e) for e in events]
    if len(events) == 1:
        assert packed == msgpack.packb(maps[0], use_bin_type=True)
    else:
        assert packed == msgpack.packb(maps, use_bin_type=True)
    for frame in (packed, text):
        assert decode(frame, SERVER_SPECS) == events


@pytest.mark.parametrize("count", [15, 16, 65535, 65536])
def test_batch_array_headers_at_their_boundaries(count: int) -> None:
    """Fixarray, array 16 and array 32 headers are chosen at the right sizes: the joined frame
    is byte for byte the msgpack array of the events' maps."""
    events = [Pong(id=i) for i in range(count)]
    frame = join([encode(e, Format.MSGPACK) for e in events], Format.MSGPACK)
    assert frame == msgpack.packb([event_map(e) for e in events])
    assert decode(frame, SERVER_SPECS) == [Pong(id=i) for i in range(count)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_batch_is_a_bad_frame(fmt: Format) -> None:
    """An empty array is not a batch: it is answered with bad_frame."""
    [item] = decode(frame_of([], fmt), CLIENT_SPECS)
    assert isinstance(item, Rejected) and item.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_bad_item_of_a_batch_is_rejected_alone(fmt: Format) -> None:
    """Inside a batch every item is checked on its own: the bad ones become Rejected values
    carrying their id and op, the good ones around them decode, in frame order; the server turns
    each rejection into an error event the client decodes."""
    client, server = open_pair(fmt)
    batch = [
        {"op": "publish", "topic": "t", "payload": 1},
        {"op": "launch", "id": 5},
        {"op": "subscribe", "id": 2},
        7,
        {"op": "publish", "topic": 3, "id": MAX_ID + 1},
        {"op": "ping", "id": 9},
    ]
    items = server.receive(frame_of(batch, fmt))
    assert items[0] == Publish(topic="t", payload=1)
    assert items[5] == Ping(id=9)
    expected = [(ErrorCode.UNKNOWN_OP, 5, "launch"), (ErrorCode.BAD_EVENT, 2, "subscribe"),
                (ErrorCode.BAD_FRAME, None, None), (ErrorCode.BAD_EVENT, None, "publish")]
    rejected = items[1:5]
    assert [(r.code, r.id, r.ref) for r in rejected if isinstance(r, Rejected)] == expected
    errors = client.receive(join([server.error(r) for r in rejected if isinstance(r, Rejected)],
                                 fmt))
    assert [(e.code, e.id, e.ref) for e in errors if isinstance(e, Error)] == expected
    assert all(isinstance(e, Error) and e.message for e in errors)


# --- field checks ----------------------------------------------------------------------------

FIELD_CASES = [
    pytest.param({"op": "subscribe", "id": MAX_ID, "filter": "a"},
                 Subscribe(id=MAX_ID, filter="a"), id="largest-id"),
    pytest.param({"op": "subscribe", "id": MAX_ID + 1, "filter": "a"}, ErrorCode.BAD_EVENT,
                 id="id-too-large"),
    pytest.param({"op": "subscribe", "id": -1, "filter": "a"}, ErrorCode.BAD_EVENT,
                 id="negative-id"),
    pytest.param({"op": "subscribe", "id": True, "filter": "a"}, ErrorCode.BAD_EVENT,
                 id="bool-id"),
    pytest.param({"op": "subscribe", "id": 1.0, "filter": "a"}, ErrorCode.BAD_EVENT,
                 id="float-id"),
    pytest.param({"op": "subscribe", "id": 1, "filter": None}, ErrorCode.BAD_EVENT,
                 id="null-required"),
    pytest.param({"op": "subscribe", "id": 1, "filter": "a", "since": None},
                 Subscribe(id=1, filter="a"), id="null-optional-is-absent"),
    pytest.param({"op": "ping", "id": 1, "future": {"x": 1}}, Ping(id=1),
                 id="unknown-field-ignored"),
    pytest.param({"op": "forget", "id": 1, "filter": b"a"}, ErrorCode.BAD_EVENT,
                 id="binary-for-string"),
    pytest.param({"id": 4}, ErrorCode.UNKNOWN_OP, id="no-op"),
    pytest.param({"op": 4}, ErrorCode.UNKNOWN_OP, id="op-not-a-string"),
    pytest.param({"op": "message"}, ErrorCode.UNKNOWN_OP, id="server-op-from-client"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("value", "expected"), FIELD_CASES)
def test_field_checks(value: dict[str, Any], expected: Any, fmt: Format) -> None:
    """Ids are integers from 0 to 2^53-1 (never booleans or floats), null is absence, unknown
    fields are ignored, and each failure has its code."""
    if fmt is Format.JSON and any(isinstance(v, bytes) for v in value.values()):
        value = {k: {"$base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v
                 for k, v in value.items()}
    [item] = decode(frame_of(value, fmt), CLIENT_SPECS)
    if isinstance(expected, ErrorCode):
        assert isinstance(item, Rejected) and item.code is expected, item
    else:
        assert item == expected


def test_time_accepts_an_integer() -> None:
    """A number field takes integers too, as JSON writers may drop a zero fraction."""
    frame = '{"op":"message","subs":[1],"topic":"t","event":"e","payload":0,"time":17}'
    [item] = decode(frame, SERVER_SPECS)
    assert isinstance(item, Delivery) and item.time == 17.0 and type(item.time) is float


@pytest.mark.parametrize("frame", [b"\xc1", b"\x81\x01\x02", b"\x92\x01", "{", '{"op": "ping"} x',
                                   b"\x81\xa2op\xa4ping\x00"])
def test_frames_that_do_not_parse_are_bad_frames(frame: Frame) -> None:
    """Malformed msgpack (a reserved byte, an integer map key, a truncated array, trailing
    bytes) and malformed JSON all come back as one bad_frame rejection."""
    [item] = decode(frame, CLIENT_SPECS)
    assert isinstance(item, Rejected) and item.code is ErrorCode.BAD_FRAME


# --- shared delivery encodings ---------------------------------------------------------------

epochs = st.text(alphabet="0123456789abcdef", min_size=1, max_size=12)
messages = st.builds(
    Message, topic=st.text(min_size=1), payload=payloads.filter(lambda p: p is not None),
    published_at=finite_floats,
    position=st.builds(Position, epoch=epochs, offset=st.integers(min_value=0, max_value=MAX_ID)),
)
subs_lists = st.lists(ids, min_size=1, max_size=20, unique=True).map(lambda s: tuple(sorted(s)))


def _delivery(message: Message, subs: tuple[int, ...]) -> Delivery:
    return Delivery(subs=subs, topic=message.topic, event=message.event_id,
                    payload=message.payload, time=message.published_at)


def _parsed(frame: Frame) -> Any:
    if isinstance(frame, str):
        return json.loads(frame)
    return msgpack.unpackb(frame, raw=False)


@settings(max_examples=500, deadline=None)
@given(message=messages, subs=st.lists(subs_lists, min_size=1, max_size=3),
       fmt=st.sampled_from(FORMATS))
def test_encoded_message_fragments_are_the_full_delivery(message: Message,
                                                         subs: list[tuple[int, ...]],
                                                         fmt: Format) -> None:
    """One EncodedMessage serves many sessions: each fragment is the same map as encoding the
    whole Delivery event for those subs, and decodes into that event, alone or in a batch."""
    encoded = EncodedMessage(message)
    fragments = [encoded.fragment(fmt, s) for s in subs]
    for fragment, s in zip(fragments, subs, strict=True):
        assert _parsed(fragment) == _parsed(encode(_delivery(message, s), fmt))
        assert decode(fragment, SERVER_SPECS) == [_delivery(message, s)]
    expected = [_delivery(message, s) for s in subs]
    assert decode(join(fragments, fmt), SERVER_SPECS) == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_delivery_with_a_null_payload_decodes(fmt: Format) -> None:
    """A message published without a payload reaches subscribers as a delivery with payload
    None (docs/protocol.md, `message`: the key is always sent, null when there is none)."""
    message = Message(topic="t", payload=None, published_at=1.0, position=Position("ab", 1))
    assert decode(EncodedMessage(message).fragment(fmt, (1,)), SERVER_SPECS) == [
        _delivery(message, (1,))]


# --- JSON binary convention ------------------------------------------------------------------


def test_binary_payloads_travel_in_json_as_base64_maps() -> None:
    """Bytes anywhere in a payload are written as {"$base64": ...} in JSON, and read back."""
    event = Publish(topic="t", payload={"raw": b"\x00\x01\x02\xff", "list": [b"x"]})
    frame = encode(event, Format.JSON)
    assert json.loads(frame)["payload"] == {"raw": {"$base64": "AAEC/w=="},
                                            "list": [{"$base64": "eA=="}]}
    assert decode(frame, CLIENT_SPECS) == [event]


@pytest.mark.parametrize(("payload", "expected"), [
    pytest.param({"$base64": "AAEC/w=="}, b"\x00\x01\x02\xff", id="binary"),
    pytest.param([{"$base64": ""}], [b""], id="nested-empty"),
    pytest.param({"$base64": "AA==", "x": 1}, {"$base64": "AA==", "x": 1}, id="extra-key"),
    pytest.param({"$base64": 5}, {"$base64": 5}, id="not-a-string"),
])
def test_json_base64_maps_are_read_as_binary(payload: Any, expected: Any) -> None:
    """Only an object of exactly one string `$base64` is binary; other objects stay objects."""
    frame = json.dumps({"op": "publish", "topic": "t", "payload": payload})
    assert decode(frame, CLIENT_SPECS) == [Publish(topic="t", payload=expected)]


def test_invalid_base64_spoils_a_broker_frame() -> None:
    """In a frame from the broker, a `$base64` string that is not base64 makes the frame a
    bad_frame (a client's publish holding one is refused alone: tests/test_payload_rule.py)."""
    frame = '{"op":"message","subs":[1],"topic":"t","event":"e-1","time":1.0,' \
            '"payload":{"$base64":"abc"}}'
    [item] = decode(frame, SERVER_SPECS)
    assert isinstance(item, Rejected) and item.code is ErrorCode.BAD_FRAME


# --- the handshake ---------------------------------------------------------------------------


def _failed(server: ServerConnection, frame: Frame) -> Error:
    with pytest.raises(HandshakeFailed) as raised:
        server.receive(frame)
    assert server.state is State.AWAITING_HELLO
    return raised.value.error


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("first", [Subscribe(id=1, filter="a"), Unsubscribe(id=1),
                                   Publish(topic="a"), Forget(id=1, filter="a"), Ping()],
                         ids=lambda e: e.OP)
def test_the_first_event_must_be_hello(first: ClientEvent, fmt: Format) -> None:
    """Any other operation first fails the handshake with hello_required, naming its op, and
    the error is encoded in the format of the offending frame."""
    server = ServerConnection()
    error = _failed(server, encode(first, fmt))
    assert (error.code, error.ref) == (ErrorCode.HELLO_REQUIRED, first.OP)
    assert isinstance(server.encode(error), str if fmt is Format.JSON else bytes)


@pytest.mark.parametrize(("frame", "code"), [
    pytest.param(b"\xc1", ErrorCode.BAD_FRAME, id="malformed"),
    pytest.param(frame_of([], Format.MSGPACK), ErrorCode.BAD_FRAME, id="empty-batch"),
    pytest.param(frame_of({"op": "launch"}, Format.MSGPACK), ErrorCode.UNKNOWN_OP,
                 id="unknown-op"),
    pytest.param(frame_of({"op": "hello"}, Format.JSON), ErrorCode.BAD_EVENT, id="no-version"),
    pytest.param(frame_of({"op": "hello", "version": 2}, Format.JSON),
                 ErrorCode.UNSUPPORTED_VERSION, id="version-2"),
    pytest.param(frame_of([{"op": "ping"}, {"op": "hello", "version": 1}], Format.MSGPACK),
                 ErrorCode.HELLO_REQUIRED, id="hello-second-in-batch"),
])
def test_a_bad_first_frame_fails_the_handshake(frame: Frame, code: ErrorCode) -> None:
    """Whatever is wrong with the first frame fails the handshake with its code."""
    assert _failed(ServerConnection(), frame).code is code


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_hello_is_rejected_and_the_session_stays_open(fmt: Format) -> None:
    """After the handshake a hello is an already_hello rejection, not a new handshake."""
    client, server = open_pair(fmt)
    [item] = server.receive(client.hello())
    assert isinstance(item, Rejected)
    assert (item.code, item.ref) == (ErrorCode.ALREADY_HELLO, "hello")
    assert server.state is State.OPEN
    assert to_server(client, server, Ping(id=1)) == [Ping(id=1)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_events_after_hello_in_the_first_frame_are_received(fmt: Format) -> None:
    """A first frame [hello, subscribe] opens the session and yields the subscribe."""
    client, server = ClientConnection(format=fmt), ServerConnection()
    frame = client.encode_batch([Hello(version=PROTOCOL_VERSION), Subscribe(id=1, filter="a")])
    assert server.receive(frame) == [Subscribe(id=1, filter="a")]
    assert server.state is State.OPEN and server.format is fmt


def test_the_hello_frame_type_sets_the_session_format() -> None:
    """A text hello makes a JSON session, a binary one a msgpack session; the client's hello
    carries the protocol version and its name."""
    for fmt, kind in ((Format.JSON, str), (Format.MSGPACK, bytes)):
        client, server = ClientConnection(format=fmt), ServerConnection()
        hello = client.hello("me")
        assert isinstance(hello, kind) and Format.of(hello) is fmt
        assert decode(hello, CLIENT_SPECS) == [Hello(version=PROTOCOL_VERSION, client="me")]
        server.receive(hello)
        assert server.format is fmt and isinstance(server.encode(WELCOME), kind)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_client_expects_welcome_first(fmt: Format) -> None:
    """A client connection fails its handshake on anything but welcome first: an error is
    handed over as it came, another event (or garbage) as bad_event."""
    refusal = Error(code=ErrorCode.UNSUPPORTED_VERSION, message="no", ref="hello")
    with pytest.raises(HandshakeFailed) as raised:
        ClientConnection(format=fmt).receive(encode(refusal, fmt))
    assert raised.value.error == refusal
    for first in (encode(Pong(), fmt), frame_of({"op": "nonsense"}, fmt)):
        client = ClientConnection(format=fmt)
        with pytest.raises(HandshakeFailed) as raised:
            client.receive(first)
        assert raised.value.error.code == ErrorCode.BAD_EVENT
        assert client.state is State.AWAITING_HELLO and client.welcome is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_welcome_may_share_its_frame(fmt: Format) -> None:
    """The broker coalesces: a welcome followed by replies in one frame opens the client side
    and yields every event."""
    client = ClientConnection(format=fmt)
    events: Sequence[ServerEvent] = [WELCOME, SubAck(id=1, recovered=True)]
    assert client.receive(join([encode(e, fmt) for e in events], fmt)) == events
    assert client.state is State.OPEN and client.welcome == WELCOME


def test_an_oversized_batch_is_refused_before_its_items_are_read() -> None:
    """The item cap bounds the work done for one frame: a msgpack batch announcing more than
    `max_items` events is refused from its array header alone. The proof: what follows the
    header is not even valid msgpack, and the refusal names the count, not the syntax."""
    for header in (b"\xdc\x03\xe9", b"\xdd\x00\x00\x03\xe9"):  # array 16 and array 32 of 1001
        (refusal,) = decode(header + b"\xc1" * 100, CLIENT_SPECS, max_items=1000)
        assert refusal.code == ErrorCode.BAD_FRAME
        assert "at most 1000 events, not 1001" in refusal.message
    # Within the cap, the items are read as before (and a broken one is reported as such).
    (refusal,) = decode(b"\x91\xc1", CLIENT_SPECS, max_items=1000)
    assert "not valid msgpack" in refusal.message
