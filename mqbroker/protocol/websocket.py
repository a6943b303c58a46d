"""The server side of WebSocket (RFC 6455), sans-IO: the opening handshake and the framing.

No sockets, no event loop: the server's driver feeds the bytes it reads to a `Handshake`, then
to a `ServerWebSocket`, and writes the bytes these return. Hand-written rather than wsproto
because the framing runs once per frame in each direction and wsproto's generality costs several
times more per frame (docs/performance.md, "The server's WebSocket layer", has the figures).

What is supported is what the broker needs: no extensions (permessage-deflate is declined by not
answering it), no subprotocols, and every rule of RFC 6455 sections 5 and 7 a server must enforce
on what it receives. Every violation raises `ProtocolViolation` carrying the close code to send.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
import struct
from typing import ClassVar

from attrs import frozen

__all__ = [
    "CloseReceived",
    "Handshake",
    "HandshakeRejected",
    "Ping",
    "Pong",
    "ProtocolViolation",
    "Request",
    "ServerWebSocket",
    "WebSocketEvent",
]

#: RFC 6455 section 1.3: appended to the client's key before hashing it for the accept value.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# --- The opening handshake (RFC 6455 section 4.2) -------------------------------------------

_STATUS_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
}
#: RFC 9110 section 5.6.2: the characters of a token (method and field names).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A field value: visible characters, spaces, tabs and obs-text; no CR, LF or other controls.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_REQUEST_LINE = re.compile(r"([^ ]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")


class HandshakeRejected(Exception):
    """The bytes received are not a WebSocket upgrade request we accept.

    The driver writes `response()` and closes the connection.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    def response(self) -> bytes:
        """A complete HTTP/1.1 error response that ends the connection."""
        body = (self.reason + "\n").encode("utf-8")
        lines = [
            f"HTTP/1.1 {self.status} {_STATUS_PHRASES.get(self.status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if self.status == 426:
            # RFC 6455 section 4.4 names the versions we speak; RFC 9110 section 15.5.22 the
            # protocol the client must upgrade to.
            lines += ["Upgrade: websocket", "Sec-WebSocket-Version: 13"]
        elif self.status == 405:
            lines.append("Allow: GET")  # RFC 9110 section 15.5.6: a 405 lists what is allowed
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def accept_value(key: str) -> str:
    """The `Sec-WebSocket-Accept` answer to a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


@frozen
class Request:
    """A valid WebSocket upgrade request."""

    path: str
    #: Every header field in the order sent: names lower-cased, values as sent, without the
    #: optional whitespace around them.
    headers: tuple[tuple[str, str], ...]
    key: str

    def header(self, name: str) -> str | None:
        """The value of header field `name` (any case), None if absent.

        A field sent several times gives its values joined with ", ", as RFC 9110 section 5.3
        says a list-valued field may be combined.
        """
        name = name.lower()
        values = [value for field, value in self.headers if field == name]
        return ", ".join(values) if values else None

    def accept(self) -> bytes:
        """The `101 Switching Protocols` response that completes the handshake."""
        return (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_value(self.key)}\r\n"
            "\r\n"
        ).encode("ascii")


def _tokens(value: str | None) -> set[str]:
    """The lower-cased elements of a comma-separated header value (RFC 9110 section 5.6.1)."""
    if value is None:
        return set()
    return {element.strip().lower() for element in value.split(",")} - {""}


class Handshake:
    """Server side of the opening handshake (RFC 6455 section 4.2), sans-IO."""

    def __init__(self, max_request_bytes: int = 8192) -> None:
        self.max_request_bytes = max_request_bytes
        #: Bytes received after the request's end (a client may send its first frame right
        #: behind the request): to be fed to the `ServerWebSocket`.
        self.leftover = b""
        self._buffer = bytearray()
        self._request: Request | None = None
        self._rejected: HandshakeRejected | None = None
        self._line_checked = False

    def receive_data(self, data: bytes) -> Request | None:
        """Feed received bytes: the request once complete, None while more bytes are needed.

        Raises `HandshakeRejected` for anything that is not a valid WebSocket upgrade, and never
        anything else, whatever the bytes. Once the request is complete, further bytes join
        `leftover` and the same request is returned; once rejected, the same rejection is raised.
        """
        if self._rejected is not None:
            raise self._rejected
        if self._request is not None:
            self.leftover += data
            return self._request
        # Look for the end only where it can newly appear, so feeding a byte at a time stays linear.
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", start, self.max_request_bytes)
        if not self._line_checked:
            self._check_request_line()
        if end < 0:
            # Unterminated within the first max_request_bytes: the request cannot fit any more.
            if len(self._buffer) >= self.max_request_bytes:
                self._reject(431, "request headers too large")
            return None
        head = bytes(self._buffer[:end])
        self.leftover = bytes(self._buffer[end + 4:])
        self._buffer = bytearray()
        try:
            self._request = _parse_request(head.decode("latin-1"))
        except HandshakeRejected as rejected:
            self._rejected = rejected
            raise
        return self._request

    def _check_request_line(self) -> None:
        """Refuse garbage as soon as its first line is in, rather than after 8 KiB of it."""
        line_end = self._buffer.find(b"\r\n", 0, self.max_request_bytes)
        if line_end < 0:
            return
        self._line_checked = True
        try:
            _parse_request_line(self._buffer[:line_end].decode("latin-1"))
        except HandshakeRejected as rejected:
            self._rejected = rejected
            raise

    def _reject(self, status: int, reason: str) -> None:
        self._rejected = HandshakeRejected(status, reason)
        raise self._rejected


def _parse_request(head: str) -> Request:
    """The request of a complete header block (without its final blank line)."""
    request_line, *field_lines = head.split("\r\n")
    path = _parse_request_line(request_line)
    headers = tuple(_parse_field(line) for line in field_lines)
    request = Request(path=path, headers=headers, key="")
    return _validate_upgrade(request)


def _parse_request_line(line: str) -> str:
    """The request target of a valid `GET <target> HTTP/1.1` line."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None or _TOKEN.fullmatch(match[1]) is None:
        raise HandshakeRejected(400, "malformed request line")
    method, path, major, minor = match[1], match[2], int(match[3]), int(match[4])
    if (major, minor) < (1, 1) or major > 1:
        raise HandshakeRejected(400, "WebSocket needs HTTP/1.1")
    if method != "GET":
        raise HandshakeRejected(405, "only GET can open a WebSocket")
    return path


def _parse_field(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    # A name must be a token with no whitespace before the colon (RFC 9112 section 5.1); this
    # also refuses obsolete line folding, whose continuation lines start with whitespace.
    if not colon or _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
        raise HandshakeRejected(400, "malformed header field")
    return name.lower(), value.strip(" \t")


def _validate_upgrade(request: Request) -> Request:
    # A body would be read as WebSocket frames: an upgrade request has none.
    if request.header("transfer-encoding") is not None or (
            request.header("content-length") not in (None, "0")):
        raise HandshakeRejected(400, "an upgrade request has no body")
    if "websocket" not in _tokens(request.header("upgrade")):
        # RFC 9110 section 15.5.22: a server that requires an upgrade answers 426.
        raise HandshakeRejected(426, "this endpoint speaks WebSocket only")
    if "upgrade" not in _tokens(request.header("connection")):
        raise HandshakeRejected(400, "Connection header must include Upgrade")
    if request.header("sec-websocket-version") != "13":
        raise HandshakeRejected(426, "unsupported Sec-WebSocket-Version (13 is spoken)")
    key = request.header("sec-websocket-key")
    if key is None or not _valid_key(key):
        raise HandshakeRejected(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    # Host (RFC 6455 section 4.2.1 item 2) is not required: the broker serves any authority,
    # and refusing a request for lacking it would protect nothing.
    return Request(path=request.path, headers=request.headers, key=key)


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


# --- Framing (RFC 6455 sections 5 and 7) -----------------------------------------------------


class ProtocolViolation(Exception):
    """The peer broke RFC 6455: send `close(code, reason)` and drop the connection."""

    #: 1002 protocol error, 1007 invalid UTF-8, 1009 message too big.
    PROTOCOL_ERROR: ClassVar[int] = 1002
    INVALID_DATA: ClassVar[int] = 1007
    TOO_BIG: ClassVar[int] = 1009

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        #: Short and ASCII, so it always fits a close frame.
        self.reason = reason


@frozen
class Ping:
    payload: bytes


@frozen
class Pong:
    payload: bytes


@frozen
class CloseReceived:
    #: None when the close frame had no payload (what RFC 6455 section 7.1.5 calls 1005).
    code: int | None
    reason: str


WebSocketEvent = bytes | str | Ping | Pong | CloseReceived

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_FIN = 0x80
_MASKED = 0x80
_RSV = 0x70
_MAX_CONTROL_PAYLOAD = 125
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
#: Above this size a payload is unmasked through a memoryview: slicing would copy it first.
_VIEW_THRESHOLD = 4096
#: From this size on, unmasking by translation beats the big-integer XOR (measured, CPU time:
#: XOR 0.56 against 0.90 us at 120 bytes, even at 512, 2.3 against 1.7 us at 1 KiB and 3.0
#: against 1.4 ms at 1 MiB).
_TRANSLATE_THRESHOLD = 512
#: _XOR_TABLES[k] maps each byte to itself XOR k: bytes.translate() then unmasks in C.
_XOR_TABLES = [bytes(value ^ key for value in range(256)) for key in range(256)]


def _unmask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask`, in C rather than a Python loop per byte
    (100 times slower): small payloads as one big-integer XOR, large ones as four strided
    translations (every 4th byte shares a mask byte), which cost less per byte but more to set
    up. Both are linear in the size."""
    length = len(data)
    if length < _TRANSLATE_THRESHOLD:
        key = (mask * ((length >> 2) + 1))[:length]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            length, "little")
    unmasked = bytearray(data)
    for offset in range(4):
        unmasked[offset::4] = unmasked[offset::4].translate(_XOR_TABLES[mask[offset]])
    return bytes(unmasked)


def _valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (RFC 6455 section 7.4, IANA registry):
    1000-1003, 1007-1014 defined; 3000-4999 registered and private use. 1004-1006 and 1015 are
    reserved and must never be on the wire; 1016-2999 are unassigned."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _Fragments:
    """A fragmented message in progress, in one buffer: an object per fragment would make a
    message sent in one-byte fragments cost some fifty times its size. Text is validated
    fragment by fragment, so invalid UTF-8 is refused as soon as it arrives (a character split
    across fragments still passes), and decoded once, whole, at the end."""

    __slots__ = ("data", "decoder", "size")

    def __init__(self, opcode: int) -> None:
        self.size = 0
        self.data = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict") if opcode == _TEXT else None

    def add(self, payload: bytes, fin: bool) -> None:
        self.size += len(payload)
        if self.decoder is not None:
            try:
                self.decoder.decode(payload, final=fin)
            except UnicodeDecodeError:
                raise ProtocolViolation(1007, "text message is not valid UTF-8") from None
        self.data += payload

    def message(self) -> bytes | str:
        return bytes(self.data) if self.decoder is None else self.data.decode("utf-8")


class ServerWebSocket:
    """RFC 6455 framing, server side, after the handshake. No extensions, no subprotocols."""

    # Slots: one of these lives as long as each session, and sessions are many.
    __slots__ = ("_buffer", "_close_received", "_close_sent", "_failed", "_fragments",
                 "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        # Received bytes not yet parsed: only ever the start of one incomplete frame, because
        # each call consumes every complete frame. Deleting a bytearray's prefix is O(1).
        self._buffer = bytearray()
        self._close_sent = False
        self._close_received = False
        self._failed: ProtocolViolation | None = None
        # Made only when a message comes in fragments, which clients rarely do.
        self._fragments: _Fragments | None = None

    @property
    def open(self) -> bool:
        """Neither side has sent or received a close."""
        return not (self._close_sent or self._close_received)

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def close_received(self) -> bool:
        return self._close_received

    def receive_data(self, data: bytes) -> list[WebSocketEvent]:
        """Every complete event in the bytes fed so far: a binary message as bytes, a text
        message as str (validated UTF-8), control frames as events.

        Raises `ProtocolViolation`, after which the caller sends `close(e.code, e.reason)` and
        drops the connection; further calls raise it again. Data frames received after we sent
        a close are discarded; nothing after a received close is processed.
        """
        if self._failed is not None:
            raise self._failed
        if self._close_received:
            return []
        try:
            return self._receive(data)
        except ProtocolViolation as violation:
            self._failed = violation
            self._buffer = bytearray()
            raise

    def _receive(self, data: bytes) -> list[WebSocketEvent]:
        # Parse straight from `data` when nothing is pending: no copy of the common case.
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        else:
            buffer = data
        events: list[WebSocketEvent] = []
        size = len(buffer)
        position = 0
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            opcode = first & 0x0F
            if first & _RSV:
                raise ProtocolViolation(1002, "reserved bits set without an extension")
            if not second & _MASKED:
                raise ProtocolViolation(1002, "client frames must be masked")
            length = second & 0x7F
            header = 6
            if opcode & 0x8:
                self._check_control(opcode, first, length)
            elif opcode > _BINARY:
                raise ProtocolViolation(1002, f"unknown opcode {opcode}")
            elif length >= 126:
                length, header = self._extended_length(buffer, position, length)
                if header == 0:
                    break
            if opcode < _CLOSE and length + (
                    self._fragments.size if self._fragments else 0) > self.max_message_bytes:
                raise ProtocolViolation(1009, "message too big")
            end = position + header + length
            if end > size:
                break
            mask = buffer[end - length - 4:end - length]
            if length > _VIEW_THRESHOLD:
                with memoryview(buffer) as view:
                    payload = _unmask(view[end - length:end], bytes(mask))
            else:
                payload = _unmask(buffer[end - length:end], bytes(mask))
            position = end
            if first == _FIN | _BINARY and self._fragments is None:
                if not self._close_sent:  # data after our close is discarded
                    events.append(payload)
            elif opcode & 0x8:
                event = self._control(opcode, payload)
                events.append(event)
                if opcode == _CLOSE:
                    self._buffer = bytearray()
                    return events
            else:
                message = self._data(opcode, bool(first & _FIN), payload)
                if message is not None and not self._close_sent:
                    events.append(message)
        self._keep(buffer, position)
        return events

    def _keep(self, buffer: bytes | bytearray, position: int) -> None:
        """Keep the unparsed rest of `buffer` (the start of the next frame) for the next call."""
        if buffer is self._buffer:
            del self._buffer[:position]
        elif position < len(buffer):
            self._buffer = bytearray(buffer[position:])

    @staticmethod
    def _check_control(opcode: int, first: int, length: int) -> None:
        if opcode > _PONG:
            raise ProtocolViolation(1002, f"unknown opcode {opcode}")
        if length > _MAX_CONTROL_PAYLOAD:
            raise ProtocolViolation(1002, "control frame payload over 125 bytes")
        if not first & _FIN:
            raise ProtocolViolation(1002, "fragmented control frame")

    @staticmethod
    def _extended_length(buffer: bytes | bytearray, position: int, code: int) -> tuple[int, int]:
        """The 16- or 64-bit payload length and the header's size; (0, 0) if not all here yet.

        A length encoded in more bytes than needed is refused (1002): RFC 6455 section 5.2
        says the minimal number of bytes MUST be used, no real client does otherwise, and
        accepting it would only let odd encodings through to whatever is behind us.
        """
        if code == 126:
            if len(buffer) - position < 4:  # the length itself; the mask is waited for later
                return 0, 0
            (length,) = _LENGTH_16.unpack_from(buffer, position + 2)
            if length < 126:
                raise ProtocolViolation(1002, "payload length not minimally encoded")
            return length, 8
        if len(buffer) - position < 10:
            return 0, 0
        (length,) = _LENGTH_64.unpack_from(buffer, position + 2)
        if length >> 63:
            raise ProtocolViolation(1002, "payload length with the most significant bit set")
        if length <= 0xFFFF:
            raise ProtocolViolation(1002, "payload length not minimally encoded")
        return length, 14

    def _control(self, opcode: int, payload: bytes) -> WebSocketEvent:
        if opcode == _PING:
            return Ping(payload)
        if opcode == _PONG:
            return Pong(payload)
        event = _parse_close(payload)
        self._close_received = True
        return event

    def _data(self, opcode: int, fin: bool, payload: bytes) -> bytes | str | None:
        """Account for one data frame; the complete message when this frame ends it."""
        fragments = self._fragments
        if opcode == _CONTINUATION:
            if fragments is None:
                raise ProtocolViolation(1002, "continuation frame without a message to continue")
        elif fragments is not None:
            raise ProtocolViolation(1002, "new message before the fragmented one ended")
        elif fin:  # a whole message in one frame (binary ones take the fast path before)
            return _decode_text(payload) if opcode == _TEXT else payload
        else:
            fragments = self._fragments = _Fragments(opcode)
        fragments.add(payload, fin)
        if not fin:
            return None
        self._fragments = None
        return fragments.message()

    def send(self, payload: bytes | str) -> bytes:
        """One unmasked data frame: binary for bytes, text for str (UTF-8 encoded here)."""
        if isinstance(payload, str):
            data = payload.encode("utf-8")
            opcode = _FIN | _TEXT
        else:
            data = payload
            opcode = _FIN | _BINARY
        length = len(data)
        if length < 126:
            return bytes((opcode, length)) + data
        if length <= 0xFFFF:
            return _HEADER_16.pack(opcode, 126, length) + data
        return _HEADER_64.pack(opcode, 127, length) + data

    def pong(self, payload: bytes) -> bytes:
        """The pong answering a ping with `payload`; b"" unless open (control replies are only
        sent while open: after a close, RFC 6455 section 5.5.1 lets nothing follow it)."""
        if not self.open:
            return b""
        return _control_frame(_PONG, payload[:_MAX_CONTROL_PAYLOAD])

    def close(self, code: int, reason: str = "") -> bytes:
        """The close frame (code and the UTF-8 reason cut to fit 125 bytes); b"" if a close was
        already sent. After it, send() may still be called but the driver won't."""
        if self._close_sent:
            return b""
        self._close_sent = True
        encoded = reason.encode("utf-8")[:_MAX_CONTROL_PAYLOAD - 2]
        # Cutting may split a character: drop its partial bytes so the reason stays UTF-8.
        encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
        return _control_frame(_CLOSE, code.to_bytes(2, "big") + encoded)


def _control_frame(opcode: int, payload: bytes) -> bytes:
    return bytes((_FIN | opcode, len(payload))) + payload


def _decode_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(1007, "text message is not valid UTF-8") from None


def _parse_close(payload: bytes) -> CloseReceived:
    """RFC 6455 section 5.5.1: no payload, or a 2-byte code and a UTF-8 reason."""
    if not payload:
        return CloseReceived(code=None, reason="")
    if len(payload) == 1:
        raise ProtocolViolation(1002, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise ProtocolViolation(1002, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(1007, "close reason is not valid UTF-8") from None
    return CloseReceived(code=code, reason=reason)
