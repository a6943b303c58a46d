"""The listener: accepts TCP connections, upgrades them to WebSocket, and serves one session
on each, until shutdown.

Every connection is served inside its own crash boundary: nothing that happens on one, from
the accept through the handshake to the last byte, can reach the listener or another session.
Accept errors (out of file descriptors, say) are logged once per burst and retried with a
backoff. Past `max_connections`, a new connection is refused with HTTP 503; past
`connections_per_second_per_peer` ([limits]), with HTTP 429, before any handshake work.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any

import structlog
import trio
from attrs import define, field

from mqbroker.config import ServerConfig
from mqbroker.protocol import CloseCode
from mqbroker.protocol.websocket import Handshake, HandshakeRejected, ServerWebSocket
from mqbroker.ratelimit import PeerLimiter, effective_burst
from mqbroker.server.connection import Connection
from mqbroker.server.security import loggable_origin, origin_allowed
from mqbroker.server.session import Session
from mqbroker.server.tls import TLSConnection, establish
from mqbroker.tls import server_context

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.server")

#: Accept errors that mean "out of a resource for now": wait and try again.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Accept errors that concern one connection only (it was reset before we took it).
_ONE_CONNECTION = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
#: A refused connection (over max_connections) gets this long to send its request.
REFUSAL_TIMEOUT = 1.0
LISTEN_BACKLOG = 1024


class ListenError(Exception):
    """An address could not be listened on (taken, not ours, not resolvable): said at start."""

    @classmethod
    def of(cls, host: str, port: int, error: OSError) -> ListenError:
        return cls(f"cannot listen on {host}:{port}: {error.strerror or error}")


@define(eq=False)
class Listener:
    """A running listener: its bound port, its sessions, the way to shut it down gracefully."""

    broker: Broker
    config: ServerConfig
    port: int
    _accepting: trio.CancelScope
    _connections: trio.CancelScope
    #: The TLS context of a wss:// listener; None for plain ws://.
    tls: ssl.SSLContext | None = None
    sessions: set[Session] = field(factory=set)
    #: Connections accepted and not yet closed, handshaking ones included.
    open_connections: int = 0
    #: Set once shutting down and every session has ended.
    _all_closed: trio.Event = field(factory=trio.Event)
    _stopping: bool = False
    #: New connections per peer address; None when that limit is off.
    peers: PeerLimiter | None = None
    #: Connections refused by `peers` since the last `security.rate_limited` line about them
    #: (one line per violation_window at most, whatever the flood).
    _peers_refused: int = 0
    _peers_log_after: float = float("-inf")

    def __attrs_post_init__(self) -> None:
        limits = self.broker.config.limits
        rate = limits.connections_per_second_per_peer
        if rate > 0:
            self.peers = PeerLimiter(rate, effective_burst(rate, limits.connections_burst_per_peer))

    def admit(self, address: object) -> bool:
        """Whether a connection from `address` is within connections_per_second_per_peer."""
        if self.peers is None:
            return True
        now = trio.current_time()
        host = _host(address)
        if self.peers.take(host, now):
            return True
        self.broker.counters["connections_rate_limited"] += 1
        self._peers_refused += 1
        if now >= self._peers_log_after:
            self._peers_log_after = now + self.broker.config.limits.violation_window
            logger.warning("security.rate_limited", peer=host,
                           limit="connections_per_second_per_peer",
                           refused=self._peers_refused)
            self._peers_refused = 0
        return False

    def connection(self, sock: socket.socket) -> Connection:
        """A freshly accepted socket as this listener's kind of connection."""
        if self.tls is not None:
            return TLSConnection(sock, self.tls)
        return Connection(sock)

    def _ended(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._stopping and not self.sessions:
            self._all_closed.set()

    async def shutdown(self) -> None:
        """Stop accepting, close every session with 1001, and give up after the grace period."""
        self._accepting.cancel()
        self._stopping = True
        if not self.sessions:
            self._all_closed.set()
        for session in list(self.sessions):
            session.close_soon(CloseCode.GOING_AWAY, "broker shutting down")
        with trio.move_on_after(self.config.shutdown_grace):
            await self._all_closed.wait()
        self._connections.cancel()


async def serve(broker: Broker, config: ServerConfig, *,
                task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept sessions on config.host:config.port; `task_status` gets the Listener once bound.

    Raises ConfigError for unusable TLS settings, ListenError for an address it cannot bind."""
    tls = server_context(config)
    sockets = _listen(config)
    port = sockets[0].getsockname()[1]
    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                listener = Listener(broker, config, port, accepting.cancel_scope,
                                    connections.cancel_scope, tls)
                for sock in sockets:
                    accepting.start_soon(_accept_loop, listener, sock, connections)
                accepting.start_soon(_watch_idle, listener)
                logger.info("server.listening", host=config.host, port=port,
                            tls=tls is not None,
                            client_certificates=tls is not None and bool(config.tls_client_ca))
                task_status.started(listener)
    finally:
        for sock in sockets:
            sock.close()


def _listen(config: ServerConfig) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of config.host."""
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as error:
        raise ListenError.of(config.host, config.port, error) from error
    sockets: list[socket.socket] = []
    port = config.port
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Port 0: every address gets the port the first one was given.
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ListenError.of(config.host, config.port, error) from error
    return sockets


async def _accept_loop(listener: Listener, sock: socket.socket, nursery: trio.Nursery) -> None:
    backoff = 0.0
    while True:
        try:
            conn, address = sock.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as error:
            if error.errno in _ONE_CONNECTION:
                continue
            if error.errno not in _EXHAUSTED:
                raise
            if not backoff:  # once per burst, not once per retry
                logger.error("server.accept_failed", error=error.strerror,
                             connections=listener.open_connections)
                listener.broker.counters["accept_errors"] += 1
            backoff = min(max(backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
            await trio.sleep(backoff)
            continue
        if backoff:
            logger.info("server.accepting_again", connections=listener.open_connections)
            backoff = 0.0
        listener.open_connections += 1
        if listener.open_connections > listener.config.max_connections:
            listener.broker.counters["connections_refused"] += 1
            nursery.start_soon(_refuse, listener, conn, 503, "too many connections")
        elif not listener.admit(address):
            # Counted in open_connections like any other, so max_connections bounds these too.
            nursery.start_soon(_refuse, listener, conn, 429,
                               "too many new connections from this address")
        else:
            nursery.start_soon(_serve_connection, listener, conn, address)
        await trio.lowlevel.checkpoint()


async def _refuse(listener: Listener, sock: socket.socket, status: int, reason: str) -> None:
    """Past max_connections (503) or a peer's connection rate (429): read the request (briefly),
    answer `status`, close."""
    connection = listener.connection(sock)
    try:
        with trio.move_on_after(REFUSAL_TIMEOUT):
            if not await establish(connection):
                return
            handshake = Handshake()
            while (data := await connection.receive()) and handshake.receive_data(data) is None:
                pass
            connection.write(HandshakeRejected(status, reason).response())
            await connection.flush_now()
            await connection.linger()
    except HandshakeRejected:
        pass
    finally:
        connection.close()
        listener.open_connections -= 1


async def _serve_connection(listener: Listener, sock: socket.socket, address: object) -> None:
    """One connection, from the handshake to the close, inside its crash boundary."""
    config = listener.config
    session: Session | None = None
    try:
        connection = listener.connection(sock)
        first_events = None
        with trio.move_on_after(config.hello_timeout) as opening:
            upgraded = await _upgrade(listener, connection, _peer(address))
            if upgraded is not None:
                session, received = upgraded
                first_events = await session.open(received)
        if opening.cancelled_caught and session is not None:
            await session.refuse(CloseCode.HANDSHAKE_FAILED, "no hello in time")
        if session is None or first_events is None:
            return
        await _run(listener, session, first_events)
    except OSError as error:
        # The socket failed under us (a reset between two calls, say): the peer's doing, not
        # a bug of ours. Nothing is left to close politely.
        log = session.log if session is not None else logger.bind(peer=_peer(address))
        log.info("connection.failed", error=error.strerror or str(error))
    except Exception:
        # A bug met on one connection must not take the listener and every other session down
        # with it: log it, and close this connection with 1011.
        log = session.log if session is not None else logger.bind(peer=_peer(address))
        log.exception("session.crashed")
        if session is not None:
            await session.refuse(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        sock.close()
        listener.open_connections -= 1


async def _upgrade(listener: Listener, connection: Connection, peer: str
                   ) -> tuple[Session, bytes] | None:
    """The HTTP upgrade: a session awaiting its hello, and the bytes that came behind the
    request; None when the request was refused or the peer left."""
    if not await establish(connection):
        _tls_failed(listener, connection, peer)
        return None
    handshake = Handshake()
    while True:
        data = await connection.receive()
        if not data:
            return None
        try:
            request = handshake.receive_data(data)
            if request is not None:
                _check_origin(listener, request.header("origin"), peer)
        except HandshakeRejected as rejected:
            connection.write(rejected.response())
            await connection.flush_now()
            with trio.move_on_after(listener.config.shutdown_grace):
                await connection.linger()
            return None
        if request is not None:
            break
    connection.write(request.accept())
    config = listener.config
    session = Session(connection, ServerWebSocket(config.max_frame_bytes), config,
                      listener.broker, peer)
    return session, handshake.leftover


def _tls_failed(listener: Listener, connection: Connection, peer: str) -> None:
    # A plain ws:// client, an unknown certificate, a scanner: the peer's problem, but the
    # operator's news when it is a client of theirs misconfigured.
    listener.broker.counters["tls_handshakes_failed"] += 1
    failure = connection.failure if isinstance(connection, TLSConnection) else ""
    logger.info("connection.tls_failed", peer=peer, reason=failure)


def _check_origin(listener: Listener, origin: str | None, peer: str) -> None:
    """Raise HandshakeRejected(403) for a web page whose origin is not allowed."""
    if origin_allowed(origin, listener.config.allowed_origins):
        return
    assert origin is not None  # no Origin is always allowed
    listener.broker.counters["security_origin_refused"] += 1
    logger.warning("security.origin_refused", peer=peer, origin=loggable_origin(origin))
    raise HandshakeRejected(403, "origin not allowed")


async def _run(listener: Listener, session: Session, first_events: list[Any]) -> None:
    if listener._stopping:
        # Its hello came once shutdown had begun (and told the sessions then): it is told
        # too, rather than served until the grace runs out and cut without a close frame.
        await session.refuse(CloseCode.GOING_AWAY, "broker shutting down")
        return
    broker = listener.broker
    listener.sessions.add(session)
    broker.attach(session)
    try:
        await session.run(first_events)
    finally:
        with trio.move_on_after(listener.config.shutdown_grace, shield=True):
            await broker.detach(session)
        session.log.info("session.closed", code=session.close_code)
        listener._ended(session)


async def _watch_idle(listener: Listener) -> None:
    """Close sessions that have waited `idle_timeout` for a frame, and those whose credential
    expired ([auth] mode jwt). One watchdog for all the sessions, rather than a timer per
    session or per read: sessions are many, timeouts rare."""
    idle = listener.config.idle_timeout
    period = min(idle / 4, 1.0)
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        deadline = now - idle
        for session in list(listener.sessions):
            if session.expires_at <= now:
                session.expired()
            elif not session.busy and session.last_read <= deadline:
                session.close_soon(CloseCode.IDLE_TIMEOUT, "idle timeout")


def _host(address: object) -> str:
    """The peer's address without its port: what connections_per_second_per_peer counts by."""
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)

