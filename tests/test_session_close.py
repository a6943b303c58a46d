"""After the session's close frame, nothing more is sent on its connection (RFC 6455 5.5.1):
a reply that comes in late (a registry change finishing, shielded, during the close) is
dropped, not written behind the close frame."""

from __future__ import annotations

import socket

from structlog.testing import capture_logs

from mqbroker.broker import open_broker
from mqbroker.config import Config, ServerConfig
from mqbroker.message import Message, Position
from mqbroker.protocol import Pong
from mqbroker.protocol.codec import EncodedMessage
from mqbroker.protocol.websocket import CloseReceived, ServerWebSocket
from mqbroker.server.connection import Connection
from mqbroker.server.session import Session


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real TCP connection on 127.0.0.1 (the server's end, the client's)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        peer = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    return ours, peer


async def test_nothing_is_written_after_the_close_frame() -> None:
    config = Config(server=ServerConfig(port=0))
    ours, peer = tcp_pair()
    with ours, peer:
        async with open_broker(config, "a") as broker:
            ws = ServerWebSocket(config.server.max_frame_bytes)
            session = Session(connection=Connection(ours), ws=ws, config=config.server,
                              broker=broker, peer="test")
            close_frame = ws.close(1001, "going away")
            session.connection.write(close_frame)
            session.reply(Pong(id=1))
            session.flush()
            peer.setblocking(False)
            assert peer.recv(65536) == close_frame


async def test_deliveries_after_the_peer_closed_are_not_taken_for_a_slow_consumer() -> None:
    """The peer closed and we answered: deliveries that still come (publishes drain for up to
    shutdown_grace before the session detaches) are never written, so they fill the outbox.
    That is no slow consumer: no `session.slow` warning, let alone one per delivery."""
    config = Config(server=ServerConfig(port=0, outbox_messages=3))
    ours, peer = tcp_pair()
    with ours, peer:
        async with open_broker(config, "a") as broker:
            ws = ServerWebSocket(config.server.max_frame_bytes)
            session = Session(connection=Connection(ours), ws=ws, config=config.server,
                              broker=broker, peer="test")
            session._peer_closed(CloseReceived(1000, ""))
            message = EncodedMessage(Message(topic="t", payload="x", published_at=0.0,
                                             position=Position("e", 1)))
            with capture_logs() as logs:
                for _ in range(10):
                    session.deliver(message, (1,))
                    session.flush()
            assert [log for log in logs if log["event"] == "session.slow"] == []
