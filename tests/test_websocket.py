"""The server's sans-IO WebSocket layer (RFC 6455): the opening handshake and the framing.

Frames are built here by hand (`frame()` below), independently of the module under test, so
the rules of RFC 6455 sections 5 and 7 are checked against the RFC rather than against the code;
wsproto, a separate implementation, plays the real client where interoperability is the point.
"""

from __future__ import annotations

import base64
import itertools
import struct
from collections.abc import Sequence

import h11
import pytest
import wsproto
import wsproto.events as ws_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import ConnectionType

from mqbroker.protocol.websocket import (
    CloseReceived,
    Handshake,
    HandshakeRejected,
    Ping,
    Pong,
    ProtocolViolation,
    Request,
    ServerWebSocket,
    WebSocketEvent,
)

MAX = 1 << 20
MASK = b"\x37\xfa\x21\x3d"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# --- A client's frames, built by hand -------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True,
          rsv: int = 0, mask: bytes = MASK, length_bytes: int | None = None) -> bytes:
    """One frame as a client sends it. `length_bytes` forces the length's encoding: 0 for the
    7-bit form, 2 for 16 bits, 8 for 64 bits (None: the minimal one)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    if length_bytes == 0:
        head = bytes((first, n | (0x80 if masked else 0)))
    elif length_bytes == 2:
        head = bytes((first, 126 | (0x80 if masked else 0))) + struct.pack("!H", n)
    else:
        head = bytes((first, 127 | (0x80 if masked else 0))) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def receive(data: bytes, max_message_bytes: int = MAX) -> list[WebSocketEvent]:
    return ServerWebSocket(max_message_bytes).receive_data(data)


def violation(data: bytes, max_message_bytes: int = MAX) -> ProtocolViolation:
    """The violation `data` raises, fed in one piece and fed a byte at a time (same code)."""
    with pytest.raises(ProtocolViolation) as whole:
        ServerWebSocket(max_message_bytes).receive_data(data)
    ws = ServerWebSocket(max_message_bytes)
    with pytest.raises(ProtocolViolation) as bytewise:
        for i in range(len(data)):
            ws.receive_data(data[i:i + 1])
    assert bytewise.value.code == whole.value.code
    reason = whole.value.reason.encode("utf-8")
    assert reason.isascii() and len(reason) <= 123
    return whole.value


# --- A real client: wsproto -----------------------------------------------------------------


def handshake_with_wsproto() -> tuple[wsproto.WSConnection, ServerWebSocket]:
    client = wsproto.WSConnection(ConnectionType.CLIENT)
    request = Handshake().receive_data(client.send(ws_events.Request(host="h", target="/ws")))
    assert request is not None
    client.receive_data(request.accept())
    assert isinstance(next(client.events()), ws_events.AcceptConnection)
    return client, ServerWebSocket(MAX)


def client_events(client: wsproto.WSConnection, data: bytes) -> list[ws_events.Event]:
    client.receive_data(data)
    return list(client.events())


# --- The opening handshake -------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(*, method: str = "GET", path: str = "/ws", version: str = "HTTP/1.1",
                    headers: Sequence[tuple[str, str]] | None = None, drop: Sequence[str] = (),
                    extra: Sequence[tuple[str, str]] = ()) -> bytes:
    fields = list(headers if headers is not None else [
        ("Host", "localhost"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")])
    fields = [(name, value) for name, value in fields if name not in drop] + list(extra)
    lines = [f"{method} {path} {version}"] + [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def rejection(data: bytes, max_request_bytes: int = 8192) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as rejected:
        Handshake(max_request_bytes).receive_data(data)
    return rejected.value


def test_the_accept_value_is_rfc_6455s_example() -> None:
    """RFC 6455 section 1.3: the key dGhlIHNhbXBsZSBub25jZQ== is answered with
    s3pPLMBiTxaQ9kYGzzhZRbK+xOo=."""
    request = Handshake().receive_data(upgrade_request())
    assert request is not None
    response = request.accept()
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"\r\nUpgrade: websocket\r\n" in response
    assert b"\r\nConnection: Upgrade\r\n" in response
    assert response.endswith(b"\r\n\r\n")


def test_a_real_client_completes_the_handshake_and_exchanges_frames() -> None:
    client, ws = handshake_with_wsproto()
    data = (client.send(ws_events.BytesMessage(b"\x00\x01" * 100))
            + client.send(ws_events.TextMessage("h\u00e9llo \u20ac"))
            + client.send(ws_events.Ping(b"p")))
    assert ws.receive_data(data) == [b"\x00\x01" * 100, "h\u00e9llo \u20ac", Ping(b"p")]
    received = client_events(client, ws.send(b"abc") + ws.send("\u00e9" * 100) + ws.pong(b"p"))
    assert received == [ws_events.BytesMessage(b"abc"), ws_events.TextMessage("\u00e9" * 100),
                        ws_events.Pong(b"p")]


def test_the_request_keeps_its_path_and_headers() -> None:
    data = upgrade_request(path="/ws?x=1", extra=[("X-Forwarded-For", "10.0.0.1"),
                                                  ("x-forwarded-for", "10.0.0.2")])
    request = Handshake().receive_data(data)
    assert request == Request(path="/ws?x=1", key=KEY, headers=(
        ("host", "localhost"), ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-key", KEY), ("sec-websocket-version", "13"),
        ("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")))
    assert request.header("Host") == "localhost"
    assert request.header("X-FORWARDED-FOR") == "10.0.0.1, 10.0.0.2"
    assert request.header("cookie") is None


def test_upgrade_and_connection_are_token_lists_in_any_case() -> None:
    """Browsers send `Connection: keep-alive, Upgrade`; tokens are case-insensitive."""
    data = upgrade_request(headers=[("Upgrade", "WebSocket"), ("Connection", "keep-alive, UPGRADE"),
                                    ("sec-websocket-key", KEY), ("Sec-WebSocket-Version", " 13 ")])
    assert Handshake().receive_data(data) is not None


def test_a_request_fed_a_byte_at_a_time_completes_on_its_last_byte() -> None:
    data = upgrade_request()
    handshake = Handshake()
    assert all(handshake.receive_data(data[i:i + 1]) is None for i in range(len(data) - 1))
    assert handshake.receive_data(data[-1:]) is not None
    assert handshake.leftover == b""


def test_bytes_behind_the_request_are_left_over_for_the_framing() -> None:
    """A client may send its first frame right behind the request, in the same packet."""
    first = frame(BINARY, b"hello")
    handshake = Handshake()
    request = handshake.receive_data(upgrade_request() + first[:3])
    assert request is not None
    assert handshake.leftover == first[:3]
    assert handshake.receive_data(first[3:]) is request  # later bytes join the leftover
    assert handshake.leftover == first
    assert ServerWebSocket(MAX).receive_data(handshake.leftover) == [b"hello"]


@pytest.mark.parametrize(("data", "status"), [
    pytest.param(upgrade_request(method="POST"), 405, id="POST"),
    pytest.param(upgrade_request(method="get"), 405, id="lower-case get"),
    pytest.param(upgrade_request(version="HTTP/1.0"), 400, id="HTTP/1.0"),
    pytest.param(upgrade_request(version="HTTP/2.0"), 400, id="HTTP/2.0"),
    pytest.param(upgrade_request(drop=["Upgrade"]), 426, id="no Upgrade"),
    pytest.param(upgrade_request(drop=["Upgrade"], extra=[("Upgrade", "h2c")]), 426,
                 id="Upgrade h2c"),
    pytest.param(upgrade_request(drop=["Connection"]), 400, id="no Connection"),
    pytest.param(upgrade_request(drop=["Connection"], extra=[("Connection", "keep-alive")]),
                 400, id="Connection without Upgrade"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Key"]), 400, id="no key"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Key"], extra=[
        ("Sec-WebSocket-Key", base64.b64encode(b"x" * 15).decode())]), 400, id="15-byte key"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Key"], extra=[
        ("Sec-WebSocket-Key", base64.b64encode(b"x" * 17).decode())]), 400, id="17-byte key"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Key"], extra=[
        ("Sec-WebSocket-Key", "not base64 at all!!!!!!!")]), 400, id="key not base64"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Key"], extra=[
        ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Key", KEY)]), 400, id="two keys"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Version"]), 426, id="no version"),
    pytest.param(upgrade_request(drop=["Sec-WebSocket-Version"], extra=[
        ("Sec-WebSocket-Version", "8")]), 426, id="version 8"),
    pytest.param(upgrade_request(extra=[("Content-Length", "5")]), 400, id="a body"),
    pytest.param(upgrade_request(extra=[("Transfer-Encoding", "chunked")]), 400, id="chunked"),
    pytest.param(upgrade_request().replace(b"Host:", b"Host :"), 400, id="space before colon"),
    pytest.param(upgrade_request().replace(b"Host: localhost", b"Host: local\r\n host"), 400,
                 id="obsolete line folding"),
    pytest.param(upgrade_request().replace(b"Host: localhost", b"Host: local\x00host"), 400,
                 id="NUL in a value"),
    pytest.param(upgrade_request().replace(b"Host: localhost", b"Host"), 400, id="no colon"),
    pytest.param(b"\r\n\r\n", 400, id="empty"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="binary"),
    pytest.param(b"GET /ws\r\n\r\n", 400, id="HTTP/0.9"),
    pytest.param(b"GET  /ws HTTP/1.1\r\n\r\n", 400, id="two spaces"),
])
def test_anything_but_a_valid_upgrade_is_rejected(data: bytes, status: int) -> None:
    assert rejection(data).status == status


def test_a_request_over_the_size_limit_is_rejected_with_431() -> None:
    data = upgrade_request(extra=[("Cookie", "c" * 200)])
    assert Handshake(len(data)).receive_data(data) is not None  # exactly at the limit
    assert rejection(data, max_request_bytes=len(data) - 1).status == 431


def test_an_endless_header_is_rejected_once_the_limit_is_passed_without_buffering_more() -> None:
    handshake = Handshake(max_request_bytes=1024)
    assert handshake.receive_data(b"GET /ws HTTP/1.1\r\nCookie: ") is None
    with pytest.raises(HandshakeRejected) as rejected:
        for _ in range(1024):
            handshake.receive_data(b"c")
    assert rejected.value.status == 431


def test_garbage_is_rejected_as_soon_as_its_first_line_ends() -> None:
    handshake = Handshake()
    assert handshake.receive_data(b"\x00\xff garbage") is None
    with pytest.raises(HandshakeRejected) as rejected:
        handshake.receive_data(b"\r\n")
    assert rejected.value.status == 400


def test_a_rejected_handshake_stays_rejected() -> None:
    handshake = Handshake()
    with pytest.raises(HandshakeRejected) as first:
        handshake.receive_data(upgrade_request(method="PUT"))
    with pytest.raises(HandshakeRejected) as again:
        handshake.receive_data(upgrade_request())
    assert again.value is first.value


@pytest.mark.parametrize(("status", "extra"), [
    (400, {}), (405, {b"allow": b"GET"}), (431, {}),
    (426, {b"sec-websocket-version": b"13", b"upgrade": b"websocket"}),
])
def test_a_rejection_is_a_complete_http_response_that_closes(
        status: int, extra: dict[bytes, bytes]) -> None:
    rejected = HandshakeRejected(status, "why it was refused")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/ws", headers=[("Host", "h")]))
    client.receive_data(rejected.response())
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert all(headers[name] == value for name, value in extra.items())
    body = client.next_event()
    assert isinstance(body, h11.Data) and body.data == b"why it was refused\n"
    assert isinstance(client.next_event(), h11.EndOfMessage)


VALID_REQUEST = upgrade_request()


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    # A valid request with a few bytes changed, dropped or inserted: close to the real thing.
    st.lists(st.tuples(st.integers(0, len(VALID_REQUEST)), st.integers(0, 2),
                       st.binary(min_size=0, max_size=3)), max_size=4).map(
        lambda edits: _edit(VALID_REQUEST, edits)),
), st.integers(1, 64))
def test_any_bytes_give_a_request_none_or_a_rejection_and_nothing_else(
        data: bytes, chunk: int) -> None:
    handshake = Handshake(max_request_bytes=256)
    try:
        for i in range(0, len(data), chunk):
            result = handshake.receive_data(data[i:i + chunk])
            assert result is None or isinstance(result, Request)
    except HandshakeRejected as rejected:
        assert rejected.status in (400, 405, 426, 431)
        assert rejected.response().startswith(f"HTTP/1.1 {rejected.status} ".encode())


def _edit(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for at, remove, insert in edits:
        data = data[:at] + insert + data[at + remove:]
    return data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(VALID_REQUEST) + 10), max_size=8))
def test_any_chunking_of_a_request_gives_the_same_request_and_leftover(cuts: list[int]) -> None:
    data = VALID_REQUEST + b"0123456789"
    points = sorted({0, len(data), *cuts})
    handshake = Handshake()
    results = [handshake.receive_data(data[a:b]) for a, b in itertools.pairwise(points)]
    assert results[-1] == Handshake().receive_data(VALID_REQUEST)
    assert handshake.leftover == b"0123456789"


# --- Data frames -----------------------------------------------------------------------------


def test_a_masked_binary_frame_is_a_bytes_message_and_text_a_str() -> None:
    assert receive(frame(BINARY, b"\x00\xffpayload")) == [b"\x00\xffpayload"]
    assert receive(frame(TEXT, "h\u00e9llo \U0001f600".encode())) == ["h\u00e9llo \U0001f600"]


def test_an_all_zero_mask_and_any_mask_unmask_alike() -> None:
    payload = bytes(range(256)) * 3
    for mask in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", MASK):
        assert receive(frame(BINARY, payload, mask=mask)) == [payload]


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 127, 511, 512, 513, 515, 65535, 65536,
                                  1 << 20])
def test_every_length_encoding_round_trips(size: int) -> None:
    """7-bit lengths up to 125, 16-bit up to 65535, 64-bit above; unmasking at every size
    (including those not a multiple of the 4-byte mask)."""
    payload = bytes(i % 251 for i in range(size))
    assert receive(frame(BINARY, payload)) == [payload]


def test_empty_frames_and_zero_length_payloads() -> None:
    data = (frame(BINARY) + frame(TEXT) + frame(PING) + frame(PONG)
            + frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"a")
            + frame(BINARY, b"", fin=False) + frame(CONT, b""))
    assert receive(data) == [b"", "", Ping(b""), Pong(b""), "a", b""]


def test_an_unmasked_client_frame_is_a_protocol_error() -> None:
    assert violation(frame(BINARY, b"x", masked=False)).code == 1002


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits_without_an_extension_are_a_protocol_error(rsv: int) -> None:
    assert violation(frame(BINARY, b"x", rsv=rsv)).code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_a_protocol_error(opcode: int) -> None:
    assert violation(frame(opcode, b"x")).code == 1002


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_control_frames_over_125_bytes_are_a_protocol_error(opcode: int) -> None:
    assert receive(frame(opcode, close_payload(1000, b"r" * 123)))  # 125: fine
    too_long = frame(opcode, close_payload(1000, b"r" * 124))
    assert violation(too_long).code == 1002
    with pytest.raises(ProtocolViolation):  # refused on the first two bytes, which declare it
        ServerWebSocket(MAX).receive_data(too_long[:2])


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frames_are_a_protocol_error(opcode: int) -> None:
    assert violation(frame(opcode, b"", fin=False)).code == 1002


def test_a_continuation_without_a_message_is_a_protocol_error() -> None:
    assert violation(frame(CONT, b"x")).code == 1002
    assert violation(frame(CONT, b"x", fin=False)).code == 1002
    # Nor after a message has ended.
    assert violation(frame(TEXT, b"a", fin=False) + frame(CONT, b"b") + frame(CONT, b"c")).code \
        == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(opcode: int, fin: bool) -> None:
    data = frame(BINARY, b"a", fin=False) + frame(opcode, b"b", fin=fin)
    assert violation(data).code == 1002


def test_fragments_assemble_with_control_frames_between_them() -> None:
    data = (frame(BINARY, b"ab", fin=False) + frame(PING, b"1") + frame(CONT, b"cd", fin=False)
            + frame(PONG, b"2") + frame(CONT, b"ef")
            + frame(TEXT, "\u20ac".encode()[:1], fin=False) + frame(PING)
            + frame(CONT, "\u20ac".encode()[1:]))
    assert receive(data) == [Ping(b"1"), Pong(b"2"), b"abcdef", Ping(b""), "\u20ac"]


def test_a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() -> None:
    header = bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63) + MASK
    assert violation(header).code == 1002


@pytest.mark.parametrize(("size", "length_bytes"), [(0, 2), (125, 2), (125, 8), (65535, 8)])
def test_a_length_not_minimally_encoded_is_a_protocol_error(size: int, length_bytes: int) -> None:
    """RFC 6455 section 5.2: "the minimal number of bytes MUST be used to encode the length".
    Refused (1002) rather than tolerated: no real client does it."""
    assert violation(frame(BINARY, b"x" * size, length_bytes=length_bytes)).code == 1002


def test_a_message_over_the_limit_is_refused_as_soon_as_its_header_declares_it() -> None:
    """Only the header of a 1 GiB frame is sent: 1009 comes at once, nothing is buffered."""
    ws = ServerWebSocket(max_message_bytes=1000)
    header = bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 30)
    with pytest.raises(ProtocolViolation) as raised:
        ws.receive_data(header)  # not even the mask yet
    assert raised.value.code == 1009
    assert violation(frame(TEXT, b"x" * 1001), max_message_bytes=1000).code == 1009
    assert receive(frame(TEXT, b"x" * 1000), max_message_bytes=1000) == ["x" * 1000]


def test_a_fragmented_message_over_the_limit_is_refused_at_the_fragment_that_passes_it() -> None:
    ws = ServerWebSocket(max_message_bytes=1000)
    assert ws.receive_data(frame(BINARY, b"x" * 600, fin=False)) == []
    with pytest.raises(ProtocolViolation) as raised:
        ws.receive_data(frame(CONT, b"x" * 401)[:4])
    assert raised.value.code == 1009
    ok = frame(BINARY, b"x" * 600, fin=False) + frame(PING, b"p" * 100) + frame(CONT, b"x" * 400)
    assert receive(ok, max_message_bytes=1000) == [Ping(b"p" * 100), b"x" * 1000]


@pytest.mark.parametrize("payload", [
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"abc\x80", b"\xe2\x82",
], ids=["0xff", "overlong", "surrogate", "above U+10FFFF", "lone continuation", "truncated"])
def test_a_text_message_that_is_not_utf8_is_invalid_data(payload: bytes) -> None:
    assert violation(frame(TEXT, payload)).code == 1007
    # The same bytes split over fragments, behind valid text.
    data = frame(TEXT, b"ok", fin=False) + frame(CONT, payload[:1], fin=False) \
        + frame(CONT, payload[1:])
    assert violation(data).code == 1007


def test_invalid_utf8_is_refused_at_its_fragment_not_at_the_messages_end() -> None:
    ws = ServerWebSocket(MAX)
    assert ws.receive_data(frame(TEXT, b"ok", fin=False)) == []
    with pytest.raises(ProtocolViolation) as raised:
        ws.receive_data(frame(CONT, b"\xff", fin=False))
    assert raised.value.code == 1007


def test_a_character_split_across_fragments_is_valid() -> None:
    text = "\U0001f600".encode()
    data = b"".join(frame(TEXT if i == 0 else CONT, text[i:i + 1], fin=i == 3) for i in range(4))
    assert receive(data) == ["\U0001f600"]


# --- Control frames and the closing handshake -------------------------------------------------


def test_pings_and_pongs_are_events_and_a_pong_echoes_the_ping() -> None:
    ws = ServerWebSocket(MAX)
    assert ws.receive_data(frame(PING, b"abc") + frame(PONG, b"def")) == [Ping(b"abc"),
                                                                          Pong(b"def")]
    assert ws.pong(b"abc") == b"\x8a\x03abc"


def test_a_close_frame_gives_its_code_and_reason_and_nothing_after_it_is_processed() -> None:
    ws = ServerWebSocket(MAX)
    data = frame(BINARY, b"a") + frame(CLOSE, close_payload(1001, "bye \u00e9".encode())) \
        + frame(BINARY, b"b") + b"\x00garbage"
    assert ws.receive_data(data) == [b"a", CloseReceived(code=1001, reason="bye \u00e9")]
    assert ws.close_received and not ws.open and not ws.close_sent
    assert ws.receive_data(frame(BINARY, b"c") + b"\x00more garbage") == []


def test_a_close_frame_without_payload_has_no_code() -> None:
    assert receive(frame(CLOSE)) == [CloseReceived(code=None, reason="")]


def test_a_close_payload_of_one_byte_is_a_protocol_error() -> None:
    raised = violation(frame(CLOSE, b"\x03"))
    assert raised.code == 1002
    assert "1-byte" in raised.reason  # refused as such, not as the code 3 it would spell


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_codes_that_may_not_be_sent_are_a_protocol_error(code: int) -> None:
    assert violation(frame(CLOSE, close_payload(code))).code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 1014, 3000, 3999, 4000, 4008, 4999])
def test_close_codes_that_may_be_sent_are_accepted(code: int) -> None:
    assert receive(frame(CLOSE, close_payload(code))) == [CloseReceived(code=code, reason="")]


def test_a_close_reason_that_is_not_utf8_is_invalid_data() -> None:
    assert violation(frame(CLOSE, close_payload(1000, b"\xff"))).code == 1007


def test_after_our_close_data_is_discarded_pings_still_come_but_are_not_answered() -> None:
    ws = ServerWebSocket(MAX)
    assert ws.close(1008, "policy") == b"\x88\x08\x03\xf0policy"
    assert ws.close_sent and not ws.open and not ws.close_received
    data = frame(BINARY, b"a") + frame(TEXT, b"b", fin=False) + frame(PING, b"p") \
        + frame(CONT, b"c") + frame(CLOSE, close_payload(1000))
    assert ws.receive_data(data) == [Ping(b"p"), CloseReceived(code=1000, reason="")]
    assert ws.pong(b"p") == b""
    assert ws.close(1000) == b""  # one close only


def test_after_a_received_close_no_pong_is_sent() -> None:
    ws = ServerWebSocket(MAX)
    ws.receive_data(frame(PING, b"p") + frame(CLOSE))
    assert ws.pong(b"p") == b""
    assert ws.close(1000) == b"\x88\x02\x03\xe8"  # but our close answers theirs


def test_a_violation_is_raised_again_on_every_later_call() -> None:
    ws = ServerWebSocket(MAX)
    with pytest.raises(ProtocolViolation) as first:
        ws.receive_data(frame(BINARY, b"a", masked=False))
    with pytest.raises(ProtocolViolation) as again:
        ws.receive_data(frame(BINARY, b"b"))
    assert again.value is first.value


def test_a_close_reason_is_cut_to_fit_a_control_frame_without_splitting_a_character() -> None:
    ws = ServerWebSocket(MAX)
    data = ws.close(1000, "\u00e9" * 100)  # 200 bytes of UTF-8
    assert data[0] == 0x88 and data[1] == len(data) - 2 <= 125
    assert data[2:4] == b"\x03\xe8"
    assert data[4:].decode("utf-8") == "\u00e9" * 61  # 122 bytes: 123 would split one


# --- Sending ---------------------------------------------------------------------------------


def test_send_makes_one_unmasked_frame_binary_for_bytes_and_text_for_str() -> None:
    ws = ServerWebSocket(MAX)
    assert ws.send(b"abc") == b"\x82\x03abc"
    assert ws.send("\u00e9") == b"\x81\x02\xc3\xa9"
    assert ws.send(b"") == b"\x82\x00"
    assert ws.send(b"x" * 125)[:2] == b"\x82\x7d"
    assert ws.send(b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert ws.send(b"x" * 65535)[:4] == b"\x82\x7e\xff\xff"
    assert ws.send(b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 1 << 20])
def test_a_real_client_reads_what_send_makes(size: int) -> None:
    client, ws = handshake_with_wsproto()
    payload = bytes(i % 256 for i in range(size))
    assert client_events(client, ws.send(payload) + ws.send(payload.hex()[:size])) == [
        ws_events.BytesMessage(payload), ws_events.TextMessage(payload.hex()[:size])]


def test_a_real_client_reads_our_close() -> None:
    client, ws = handshake_with_wsproto()
    assert client_events(client, ws.close(4008, "slow")) == [
        ws_events.CloseConnection(code=4008, reason="slow")]


# --- Any chunking, any bytes ----------------------------------------------------------------

STREAM = (frame(BINARY, b"first") + frame(TEXT, "\u20ac".encode()[:2], fin=False)
          + frame(PING, b"ping") + frame(CONT, "\u20ac".encode()[2:] + b"!")
          + frame(BINARY, b"y" * 300) + frame(PONG) + frame(BINARY, b"z" * 70000)
          + frame(BINARY) + frame(CLOSE, close_payload(1000, b"done")))
STREAM_EVENTS: list[WebSocketEvent] = [b"first", Ping(b"ping"), "\u20ac!", b"y" * 300, Pong(b""),
                                       b"z" * 70000, b"", CloseReceived(1000, "done")]


def feed_in_pieces(data: bytes, cuts: Sequence[int]) -> list[WebSocketEvent]:
    ws = ServerWebSocket(MAX)
    points = sorted({0, len(data), *cuts})
    events: list[WebSocketEvent] = []
    for start, end in itertools.pairwise(points):
        events += ws.receive_data(data[start:end])
    return events


def test_a_stream_split_at_every_byte_boundary_gives_the_same_events() -> None:
    """Two pieces, cut at each position of the first frames (the long frames' payloads are
    cut every 97 bytes: the boundaries that matter are the headers')."""
    assert receive(STREAM) == STREAM_EVENTS
    header_zone = len(STREAM) - 70000 - 40
    for cut in [*range(header_zone), *range(header_zone, len(STREAM), 97)]:
        assert feed_in_pieces(STREAM, [cut]) == STREAM_EVENTS


def test_a_stream_fed_a_byte_at_a_time_gives_the_same_events() -> None:
    small = STREAM.replace(frame(BINARY, b"z" * 70000), b"")
    expected = [event for event in STREAM_EVENTS if event != b"z" * 70000]
    assert feed_in_pieces(small, range(len(small))) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=30))
def test_any_chunking_of_a_valid_stream_gives_the_same_events(cuts: list[int]) -> None:
    assert feed_in_pieces(STREAM, cuts) == STREAM_EVENTS


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[WebSocketEvent]]:
    """A random valid client stream (fragmented messages, pings between fragments, any mask)
    and the events it must give."""
    data, events = b"", []
    for _ in range(draw(st.integers(0, 6))):
        text = draw(st.booleans())
        payload = draw(st.text(max_size=300)).encode() if text else draw(st.binary(max_size=300))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            opcode = (TEXT if text else BINARY) if i == 0 else CONT
            mask = draw(st.binary(min_size=4, max_size=4))
            data += frame(opcode, piece, fin=i == len(pieces) - 1, mask=mask)
            if i == len(pieces) - 1:
                events.append(payload.decode() if text else payload)
            if draw(st.booleans()):
                ping = draw(st.binary(max_size=125))
                data += frame(PING, ping, mask=mask)
                events.append(Ping(ping))
    return data, events


@settings(max_examples=300, deadline=None)
@given(messages(), st.lists(st.integers(0, 4000), max_size=10))
def test_random_valid_streams_give_their_events_in_any_chunking(
        stream: tuple[bytes, list[WebSocketEvent]], cuts: list[int]) -> None:
    data, events = stream
    assert receive(data) == events
    assert feed_in_pieces(data, [cut for cut in cuts if cut < len(data)]) == events


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """Frames with random header bits (mostly masked, so parsing goes past the first check),
    random lengths in every encoding, random payloads."""
    first = draw(st.integers(0, 255))
    masked = draw(st.integers(0, 9)) > 0
    length = draw(st.sampled_from([0, 1, 2, 5, 125, 126, 127, 200, 65535, 65536]))
    payload = draw(st.binary(max_size=200))
    encoding = draw(st.sampled_from([0, 2, 8, None]))
    header = frame(first & 0x0F, payload, fin=bool(first & 0x80), rsv=(first >> 4) & 7,
                   masked=masked, length_bytes=encoding)
    if draw(st.booleans()):  # a declared length that does not match the payload
        header = header[:1] + bytes((header[1] & 0x80 | min(length, 127),)) + header[2:]
    return header


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=500),
                 st.lists(st.one_of(hostile_frames(), st.binary(max_size=10)), max_size=8).map(
                     b"".join)),
       st.integers(1, 50), st.sampled_from([10, 1000, MAX]))
def test_any_bytes_raise_nothing_but_a_protocol_violation(
        data: bytes, chunk: int, max_message_bytes: int) -> None:
    ws = ServerWebSocket(max_message_bytes)
    try:
        for i in range(0, len(data), chunk):
            for event in ws.receive_data(data[i:i + chunk]):
                assert isinstance(event, bytes | str | Ping | Pong | CloseReceived)
    except ProtocolViolation as raised:
        assert raised.code in (1002, 1007, 1009)
        reason = raised.reason.encode("utf-8")
        assert reason.isascii() and len(reason) <= 123
