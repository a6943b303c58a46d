"""A tiny raw WebSocket client for attacking the broker: every byte on the wire is the test's.

Unlike tests/harness.py's `RawSession` (trio-websocket underneath, which only ever sends valid
frames and hides the close handshake), this writes the HTTP upgrade itself, encodes frames of
any opcode, flags, length and masking (invalid ones included), reads frames and close frames as
they come, and can end with a TCP reset (SO_LINGER 0). `ProtocolSession` adds the broker's wire
protocol on top (mqbroker.protocol's ClientConnection), so a raw client can also be a
well-behaved session: the hostile tests' monitor is one.

Trio sockets throughout: the tests run the broker in the same event loop.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from mqbroker.protocol import ClientConnection, ClientEvent, Format, ServerEvent

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
#: How long a read waits before the test is told the broker went quiet.
READ_TIMEOUT = 5.0


class ConnectionEnded(Exception):
    """The broker closed TCP (EOF) or reset it, before what was expected arrived."""

    def __init__(self, reset: bool) -> None:
        super().__init__("connection reset" if reset else "connection closed (EOF)")
        #: True for a TCP reset (ECONNRESET), False for an orderly EOF.
        self.reset = reset


@attrs.frozen
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The code of a close frame (None for an empty close payload)."""
        assert self.opcode == CLOSE
        return int.from_bytes(self.payload[:2], "big") if len(self.payload) >= 2 else None


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 mask: bytes | None = b"\x01\x02\x03\x04", length: int | None = None) -> bytes:
    """One frame as a client would send it, or as no valid client would.

    `rsv`: the three reserved bits (0-7). `mask`: the 4-byte masking key, None for an unmasked
    frame. `length`: the length to announce in the header, when it must lie about the payload.
    """
    announced = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0x0F)
    masked = 0x80 if mask is not None else 0
    if announced < 126:
        header = bytes((first, masked | announced))
    elif announced <= 0xFFFF:
        header = struct.pack("!BBH", first, masked | 126, announced)
    else:
        header = struct.pack("!BBQ", first, masked | 127, announced)
    if mask is None:
        return header + payload
    return header + mask + _xor(payload, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    key = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        len(data), "little")


def upgrade_request(path: str = "/", *, key: str | None = None) -> bytes:
    """A valid HTTP/1.1 WebSocket upgrade request."""
    key = key or base64.b64encode(os.urandom(16)).decode("ascii")
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii")


@attrs.define(eq=False)
class RawWebSocket:
    """One TCP connection to the broker, driven byte by byte."""

    sock: trio.socket.SocketType
    _buffer: bytearray = attrs.field(factory=bytearray)
    #: The HTTP response head to the upgrade (status line and fields), once read.
    response: bytes = b""

    @classmethod
    async def open_tcp(cls, port: int, host: str = "127.0.0.1") -> RawWebSocket:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    # --- bytes ---------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Send all of `data`; ConnectionEnded if the broker is gone."""
        view = memoryview(data)
        while view:
            try:
                sent = await self.sock.send(view)
            except (BrokenPipeError, ConnectionResetError) as error:
                raise ConnectionEnded(isinstance(error, ConnectionResetError)) from None
            view = view[sent:]

    async def _fill(self) -> None:
        try:
            data = await self.sock.recv(65536)
        except ConnectionResetError:
            raise ConnectionEnded(reset=True) from None
        if not data:
            raise ConnectionEnded(reset=False)
        self._buffer += data

    async def _take(self, count: int) -> bytes:
        while len(self._buffer) < count:
            await self._fill()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    # --- the handshake ------------------------------------------------------------------------

    async def handshake(self, path: str = "/") -> int:
        """Send a valid upgrade request and read the response head; its HTTP status."""
        await self.send(upgrade_request(path))
        return await self.read_response()

    async def read_response(self) -> int:
        """The HTTP status of the response head (read in full; a body is left unread)."""
        with trio.fail_after(READ_TIMEOUT):
            while (end := self._buffer.find(b"\r\n\r\n")) < 0:
                await self._fill()
        self.response = bytes(self._buffer[:end])
        del self._buffer[:end + 4]
        return int(self.response.split(b" ", 2)[1])

    # --- frames -------------------------------------------------------------------------------

    async def send_frame(self, opcode: int, payload: bytes = b"", **flags: object) -> None:
        await self.send(encode_frame(opcode, payload, **flags))  # type: ignore[arg-type]

    async def read_frame(self) -> Frame:
        """The next frame from the broker (unmasked, as a server's must be)."""
        first, second = await self._take(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._take(8))
        mask = await self._take(4) if second & 0x80 else None
        payload = await self._take(length)
        if mask is not None:
            payload = _xor(payload, mask)
        return Frame(fin=bool(first & 0x80), rsv=(first >> 4) & 0x7, opcode=first & 0x0F,
                     payload=payload)

    async def read_close(self, within: float = READ_TIMEOUT) -> Frame:
        """Read (and drop) frames until the broker's close frame; ConnectionEnded if TCP ends
        first (a reset being the failure the hostile tests look for)."""
        with trio.fail_after(within):
            while (frame := await self.read_frame()).opcode != CLOSE:
                pass
        return frame

    async def read_until_end(self, within: float = READ_TIMEOUT) -> list[Frame]:
        """Every frame until the broker ends TCP; whether it reset is in `self.reset`."""
        frames: list[Frame] = []
        with trio.fail_after(within):
            try:
                while True:
                    frames.append(await self.read_frame())
            except ConnectionEnded as ended:
                self.reset_seen = ended.reset
        return frames

    reset_seen: bool = False

    # --- ending -------------------------------------------------------------------------------

    def reset(self) -> None:
        """End with a TCP reset: SO_LINGER on with a zero timeout, then close."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already reset by the peer: closing is all there is left to do
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[RawWebSocket]:
    """A TCP connection to the broker (no handshake yet), closed on exit."""
    ws = await RawWebSocket.open_tcp(port)
    try:
        yield ws
    finally:
        ws.close()


@attrs.define(eq=False)
class ProtocolSession:
    """The broker's protocol over a `RawWebSocket`: masked binary frames of msgpack events."""

    ws: RawWebSocket
    connection: ClientConnection = attrs.field(factory=lambda: ClientConnection(Format.MSGPACK))
    _pending: list[ServerEvent] = attrs.field(factory=list)

    @classmethod
    async def open(cls, port: int, client: str = "raw") -> ProtocolSession:
        """Connect, upgrade, hello, and read the welcome."""
        ws = await RawWebSocket.open_tcp(port)
        status = await ws.handshake()
        assert status == 101, ws.response
        session = cls(ws)
        await ws.send_frame(BINARY, session.connection.hello(client))
        await session.next_event()  # the welcome
        return session

    async def send(self, *events: ClientEvent) -> None:
        await self.ws.send_frame(BINARY, self.connection.encode_batch(list(events)))

    async def receive(self) -> list[ServerEvent]:
        """The events of the next data frame (pings are answered, pongs skipped); a close frame
        raises ConnectionEnded."""
        while True:
            frame = await self.ws.read_frame()
            if frame.opcode == PING:
                await self.ws.send_frame(PONG, frame.payload)
            elif frame.opcode == CLOSE:
                raise ConnectionEnded(reset=False)
            elif frame.opcode in (BINARY, TEXT):
                return self.connection.receive(frame.payload)  # type: ignore[return-value]

    async def next_event(self) -> ServerEvent:
        if not self._pending:
            with trio.fail_after(READ_TIMEOUT):
                while not self._pending:
                    self._pending.extend(await self.receive())
        return self._pending.pop(0)

    def close(self) -> None:
        self.ws.close()


def batch(events: Sequence[ClientEvent], fmt: Format = Format.MSGPACK) -> bytes:
    """One frame's payload holding `events`."""
    return ClientConnection(fmt).encode_batch(list(events))
