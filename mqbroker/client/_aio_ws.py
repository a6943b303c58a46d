"""A WebSocket client connection for asyncio: asyncio streams carry the bytes, wsproto the protocol.

wsproto is sans-IO, like mqbroker's own protocol layer: this module only moves bytes between the
socket and a `wsproto.WSConnection` and acts on the events it reports. There is no reader task:
whoever waits for a message reads the socket, one reader at a time, so `aclose` can finish the
close handshake itself when nobody else is reading.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from attrs import define, field, frozen
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from mqbroker.client.runtime import Target

#: How much to read from the socket at a time.
RECEIVE_BYTES = 64 * 1024
#: RFC 6455 7.4.1: the peer sent a message larger than we accept.
MESSAGE_TOO_BIG = 1009
#: RFC 6455 7.4.1: no close frame was received (never sent on the wire).
ABNORMAL_CLOSURE = 1006


@frozen
class CloseReason:
    """Why a WebSocket closed: the close code and reason of whichever side closed first."""

    code: int
    reason: str | None = None
    #: The peer closed first (its code), rather than this side.
    by_peer: bool = False


class ConnectionClosed(Exception):
    """The WebSocket is closed (by either side, or the connection dropped); see `reason`."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"WebSocket closed with {reason.code} {reason.reason or ''}".rstrip())
        self.reason = reason


class HandshakeError(Exception):
    """The server did not upgrade the HTTP connection to a WebSocket."""


async def open_websocket(url: str | Target, *, max_message_size: int,
                         ssl_context: ssl.SSLContext | None = None) -> WebSocket:
    """Connect to `url` and upgrade to a WebSocket; the caller must `aclose` the result.

    Raises OSError if the server cannot be reached, HandshakeError if it refuses the upgrade.
    """
    target = url if isinstance(url, Target) else Target.parse(url)
    if ssl_context is not None and not target.tls:
        # It would silently not be used: plaintext while its owner believes it protected.
        raise ValueError(f"ssl_context given for a URL that is not wss://: {url!r}")
    context = (ssl_context or ssl.create_default_context()) if target.tls else None
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=context)
    ws = WebSocket(reader, writer, max_message_size)
    try:
        await ws._upgrade(target)
    except BaseException:
        ws.abort()
        raise
    return ws


@define(eq=False)
class WebSocket:
    """One client WebSocket: `send_message`, `get_message`, `aclose`."""

    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter
    #: A longer message (bytes, or characters of text) closes the connection with 1009.
    max_message_size: int
    #: Set once no more messages can be sent or received (the reason of the first close).
    closed: CloseReason | None = None
    _protocol: WSConnection = field(factory=lambda: WSConnection(ConnectionType.CLIENT))
    _messages: deque[bytes | str] = field(factory=deque)
    #: The fragments of a message still being received, and their total size.
    _parts: list[Any] = field(factory=list)
    _size: int = 0
    _reading: asyncio.Lock = field(factory=asyncio.Lock)
    #: The socket is closed or closing: the close handshake is over, or was given up.
    _finished: bool = False

    # --- the application's side -------------------------------------------------------------

    async def send_message(self, message: bytes | str) -> None:
        """Send one message: bytes as a binary frame, str as a text frame."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        event: Event = (TextMessage(data=message) if isinstance(message, str)
                        else BytesMessage(data=message))
        self._write(self._protocol.send(event))
        await self._drain()

    async def get_message(self) -> bytes | str:
        """The next message; raises ConnectionClosed once the connection is closed."""
        while not self._messages:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            await self._pump(lambda: bool(self._messages) or self.closed is not None)
        return self._messages.popleft()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with `code` and wait for the peer's close frame; callers bound the wait.

        If cancelled meanwhile (a caller's timeout), the socket is dropped at once.
        """
        try:
            await self._close_handshake(code, reason)
            self._writer.close()
            with suppress(OSError):
                await self._writer.wait_closed()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the socket now, without a close handshake."""
        self.closed = self.closed or CloseReason(ABNORMAL_CLOSURE, "aborted")
        self._finished = True
        self._writer.transport.abort()

    # --- the opening handshake ----------------------------------------------------------------

    async def _upgrade(self, target: Target) -> None:
        self._write(self._protocol.send(Request(host=target.authority, target=target.resource)))
        await self._writer.drain()
        while True:
            data = await self._reader.read(RECEIVE_BYTES)
            if not data:
                raise HandshakeError("the server closed the connection during the upgrade")
            try:
                self._protocol.receive_data(data)
            except RemoteProtocolError as e:
                raise HandshakeError(f"bad upgrade response: {e}") from e
            for event in self._protocol.events():
                if isinstance(event, RejectConnection):
                    raise HandshakeError(f"the server refused the upgrade: HTTP "
                                         f"{event.status_code}")
                if isinstance(event, AcceptConnection):
                    self._handle_events()  # frames that came with the response
                    return

    # --- reading ------------------------------------------------------------------------------

    async def _pump(self, done: Callable[[], bool]) -> None:
        """Read from the socket once, unless `done()` by the time it is this caller's turn."""
        async with self._reading:
            if done():
                return
            try:
                data = await self._reader.read(RECEIVE_BYTES)
            except OSError:
                data = b""
            if self._finished:
                return  # aborted while reading
            # wsproto takes None for end of file: a close with 1006.
            self._protocol.receive_data(data or None)
            self._handle_events()

    def _handle_events(self) -> None:
        for event in self._protocol.events():
            if isinstance(event, Message):
                self._assemble(event)
            elif isinstance(event, Ping):
                # RFC 6455 5.5.2: answer a ping with a pong carrying its payload.
                self._write(self._protocol.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._closed_by_peer(event)
            # Pongs need nothing: the client's keepalive pings at the broker's protocol level.

    def _assemble(self, event: Message[Any]) -> None:
        if self.closed is not None:
            return  # closing: nothing more is delivered
        self._parts.append(event.data)
        self._size += len(event.data)
        if self._size > self.max_message_size:
            self._close_locally(MESSAGE_TOO_BIG, f"message over {self.max_message_size} bytes")
            return
        if event.message_finished:
            parts, self._parts, self._size = self._parts, [], 0
            joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            self._messages.append(joined)

    def _closed_by_peer(self, event: CloseConnection) -> None:
        state = self._protocol.state
        if state is ConnectionState.REMOTE_CLOSING:
            # RFC 6455 5.5.1: echo the close frame; the handshake is then complete.
            self._write(self._protocol.send(event.response()))
        elif state is ConnectionState.OPEN:
            # wsproto reports bad bytes from the peer as a close event, without sending it.
            self._write(self._protocol.send(CloseConnection(code=event.code,
                                                            reason=event.reason)))
        self.closed = self.closed or CloseReason(event.code, event.reason, by_peer=True)
        self._finished = True
        self._writer.close()

    # --- writing and closing ------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._finished:
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as e:
            self.closed = self.closed or CloseReason(ABNORMAL_CLOSURE, f"connection lost: {e}")
            self._finished = True
            self._writer.close()
            raise ConnectionClosed(self.closed) from e

    def _close_locally(self, code: int, reason: str | None) -> None:
        self._write(self._protocol.send(CloseConnection(code=code, reason=reason)))
        self.closed = self.closed or CloseReason(code, reason)
        self._parts, self._size = [], 0

    async def _close_handshake(self, code: int, reason: str | None) -> None:
        if self._protocol.state is ConnectionState.OPEN:
            self._close_locally(code, reason)
            with suppress(ConnectionClosed):
                await self._drain()
        while not self._finished:
            await self._pump(lambda: self._finished)
