"""TLS on the listener's raw sockets, driven through memory BIOs.

`TLSConnection` is a `Connection` whose bytes are TLS records: what the session writes is
encrypted into the outgoing BIO and sent like plain bytes, by the same never-waiting `write`
(a TLS record is produced at once, whatever the socket can take); what arrives is fed to the
incoming BIO and decrypted. The session above sees the same interface, plaintext in and out.

The handshake (`establish`) runs before the HTTP upgrade, inside the listener's `hello_timeout`
bound: a client that never completes it holds the connection no longer than one that never
sends its hello.
"""

from __future__ import annotations

import socket
import ssl

import trio

from mqbroker.server.connection import RECEIVE_BYTES, Connection


class TLSConnection(Connection):
    """One accepted TCP connection speaking TLS. Not thread-safe, like Connection."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "failure")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: Why the handshake failed (a plain-HTTP client, an unknown client certificate...).
        self.failure = ""

    async def establish(self) -> bool:
        """The TLS handshake; False (with `failure` said) when it failed or the peer left."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_records()
                await self.flush_now()
                data = await Connection.receive(self)
                if not data:
                    self.failure = self.failure or "the client left during the TLS handshake"
                    return False
                self._incoming.write(data)
                continue
            except (ssl.SSLError, ValueError) as error:
                # Its alert (if any) goes out, so that the client learns why.
                self._send_records()
                await self.flush_now()
                self.failure = _reason(error)
                return False
            self._send_records()
            await self.flush_now()
            return True

    def client_common_name(self) -> str | None:
        """The subject CN of the client certificate the handshake verified (mutual TLS); None
        without a certificate, or when its subject holds no CN or several (which to pick would
        be a guess)."""
        certificate = self._tls.getpeercert()
        if not certificate:
            return None
        # The subject is a tuple of relative names, each a tuple of (attribute, value) pairs.
        subject = certificate.get("subject", ())
        names = [pair[1] for part in subject for pair in part
                 if isinstance(pair, tuple) and pair[0] == "commonName"]
        return names[0] if len(names) == 1 else None

    async def receive(self) -> bytes:
        """The next plaintext from the peer; b"" once it closed, broke, or broke TLS."""
        while True:
            plain = self._decrypt()
            if plain is None:
                return b""
            if plain:
                return plain
            data = await Connection.receive(self)
            if not data:
                return b""
            self._incoming.write(data)

    def _decrypt(self) -> bytes | None:
        """Every byte of plaintext the incoming records make (b"" for none yet); None at the
        end of the TLS stream (the peer's close_notify) or on a TLS error."""
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = self._tls.read(RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            except ssl.SSLError:
                # A corrupt or forged record: nothing more from this peer can be trusted.
                self.broken = True
                return None
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        # Reading may have produced records to send (a TLS 1.3 key update's answer).
        self._send_records()
        if chunks:
            return b"".join(chunks)
        return None if ended else b""

    def write(self, data: bytes) -> None:
        """Encrypt `data` and send the records after anything pending, without waiting."""
        if self.broken or self.closed or not data:
            return
        try:
            self._tls.write(data)
        except (ssl.SSLError, ValueError):  # after our close_notify: nothing more to say
            self._broke()
            return
        self._send_records()

    def _send_records(self) -> None:
        records = self._outgoing.read()
        if records:
            Connection.write(self, records)

    async def linger(self) -> None:
        """The polite end: close_notify, the write side shut, then the peer's bytes dropped
        (undecrypted) until it closes. Bound it with a deadline, like Connection.linger."""
        if self.broken or self.closed:
            return
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: our close_notify is out, the peer's not in yet
        self._send_records()
        if self._nursery is None:
            await self.flush_now()
        else:
            await self.drained()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        while await Connection.receive(self):
            pass


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error)


async def establish(connection: Connection) -> bool:
    """Whatever the connection needs before HTTP: nothing for plain TCP, the handshake for TLS."""
    if isinstance(connection, TLSConnection):
        return await connection.establish()
    await trio.lowlevel.checkpoint()
    return True
