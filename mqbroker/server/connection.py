"""Bytes in and out of one accepted socket, for the task that serves it.

The WebSocket framing is sans-IO (mqbroker.protocol.websocket); this module only moves bytes,
on a raw non-blocking socket, without trio's stream layer in between: a small message costs one
`recv` and one `send`, and no task switch but the reader's own wake-up.

- Reading happens in the connection's own task (`receive`).
- Writing never waits: `write` sends at once, from whatever task calls it (a publisher's task
  delivering to this connection, say), what the socket takes, and keeps the rest. Only then is
  a writer task started, which waits for the socket to become writable, sends the rest, and
  calls `on_drained` so that the owner can hand over more. A peer that does not read therefore
  costs the broker nothing but the bytes its owner agreed to keep.
- Closing puts whatever is pending on the wire first, shuts the write side, and reads (and
  drops) what the peer still sends until it closes too: closing a socket with unread input makes
  the kernel reset it, and the reset would destroy the close frame before the peer reads it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

#: Up to this much is read at a time: a batched frame of tens of KiB in one call.
RECEIVE_BYTES = 64 * 1024


class Connection:
    """One accepted TCP connection. Not thread-safe; every method runs in trio's thread."""

    __slots__ = ("_drained", "_drained_input", "_nursery", "_pending", "broken", "closed",
                 "on_broken", "on_drained", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        #: The peer is gone (reset, or a write failed): writes are dropped from then on.
        self.broken = False
        self.closed = False
        #: Called (from the writer task) once everything pending went out.
        self.on_drained: Callable[[], None] | None = None
        #: Called once when the connection breaks: whoever waits for the peer to read (a replay
        #: waiting for outbox room) would otherwise wait for ever, the reader being that waiter.
        self.on_broken: Callable[[], None] | None = None
        self._pending = bytearray()
        self._nursery: trio.Nursery | None = None
        self._drained: trio.Event | None = None
        self._drained_input = False

    def start_writing(self, nursery: trio.Nursery) -> None:
        """From now on, what the socket cannot take at once is sent by a task of `nursery`."""
        self._nursery = nursery
        if self._pending:  # left over from the opening handshake
            self._start_writer()

    def client_common_name(self) -> str | None:
        """The subject CN of the client certificate verified by TLS: none over plain TCP."""
        return None

    @property
    def pending(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return len(self._pending)

    async def receive(self) -> bytes:
        """The next bytes from the peer; b"" once it closed or the connection broke.

        When bytes were waiting already this still checkpoints (yields to the other tasks
        first): a peer that floods us gets its turn like every other, not the loop."""
        waited = False
        if self._drained_input:
            # The last read took less than it could: the socket was empty then, so wait first
            # rather than pay a failing recv (and its exception) per message.
            waited = await self._wait_readable()
            if not waited:
                return b""
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                if not await self._wait_readable():
                    return b""
                waited = True
                continue
            except OSError:
                self.broken = True
                return b""
            self._drained_input = len(data) < RECEIVE_BYTES
            if not waited:
                # No wait, so no checkpoint yet: one pass of the scheduler per read, not two.
                await trio.lowlevel.checkpoint()
            return data

    async def _wait_readable(self) -> bool:
        """Wait for input; False when the socket was closed meanwhile."""
        try:
            await trio.lowlevel.wait_readable(self.sock)
        except trio.ClosedResourceError:
            return False
        return True

    def write(self, data: bytes) -> None:
        """Send `data` after anything pending, without waiting; never raises."""
        if self.broken or self.closed or not data:
            return
        if self._pending:
            self._pending += data  # the writer task is waiting for room; keep the order
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broke()
            return
        if sent < len(data):
            self._pending += memoryview(data)[sent:]
            self._start_writer()

    async def drained(self) -> None:
        """Wait until nothing is pending (or the connection broke)."""
        while self._pending and not self.broken and not self.closed:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    def _start_writer(self) -> None:
        if self._nursery is None:
            # Before the session's tasks run (the opening handshake): the opener waits with
            # `flush_now` instead.
            return
        self._nursery.start_soon(self._write_pending)

    async def flush_now(self) -> None:
        """Wait until everything pending is sent; for the opening handshake, before the session
        has a nursery."""
        await self._write_pending()

    async def _write_pending(self) -> None:
        try:
            while self._pending and not self.broken:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    sent = self.sock.send(self._pending)
                except BlockingIOError:
                    continue
                except OSError:
                    self._broke()
                    break
                del self._pending[:sent]
        except trio.ClosedResourceError:
            self._broke()
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        if self.on_drained is not None and not self.broken:
            self.on_drained()

    def _broke(self) -> None:
        # EPIPE, ECONNRESET and the like: the peer is gone. Its reader finds out too (EOF or
        # an error) and ends the session; a writer must never raise into a publisher's task.
        if self.broken:
            return
        self.broken = True
        self._pending.clear()
        if self.on_broken is not None:
            self.on_broken()

    async def linger(self) -> None:
        """The polite end: the write side shut, then what the peer sends dropped until it
        closes. Bound it with a deadline: a peer may never close."""
        if self.broken or self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        while await self.receive():
            pass

    def close(self) -> None:
        """Close the socket now; any task waiting on it is woken with ClosedResourceError."""
        if self.closed:
            return
        self.closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        if self._drained is not None:
            self._drained.set()
