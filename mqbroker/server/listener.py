"""The listener: accepts WebSocket connections and runs one session for each, until shutdown."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio
from attrs import define
from trio_websocket import WebSocketRequest, serve_websocket

from mqbroker.config import ServerConfig
from mqbroker.protocol import CloseCode
from mqbroker.server.session import Session

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.server")

RECEIVE_BUFFER_BYTES = 64 * 1024


class ListenError(Exception):
    """An address could not be listened on (taken, not ours, not resolvable): said at start."""

    @classmethod
    def of(cls, host: str, port: int, error: OSError) -> ListenError:
        return cls(f"cannot listen on {host}:{port}: {error.strerror or error}")


@define(eq=False)
class Listener:
    """A running listener: its bound port, and the way to shut it down gracefully."""

    broker: Broker
    config: ServerConfig
    port: int
    _accepting: trio.CancelScope
    _sessions: trio.CancelScope

    async def shutdown(self) -> None:
        """Stop accepting, close every session with 1001, and give up after the grace period."""
        self._accepting.cancel()
        with trio.move_on_after(self.config.shutdown_grace):
            async with trio.open_nursery() as nursery:
                for session in list(self.broker.sessions):
                    nursery.start_soon(session.close, CloseCode.GOING_AWAY,
                                       "broker shutting down")
        self._sessions.cancel()


async def serve(broker: Broker, config: ServerConfig, *,
                task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept sessions on config.host:config.port; `task_status` gets the Listener once bound."""

    async def handle(request: WebSocketRequest) -> None:
        session = Session(await request.accept(), config)
        broker.attach(session)
        try:
            await session.run(broker)
        except Exception:
            # A bug met by one session must not take the listener and every other session
            # down with it: log it, and close this session with 1011.
            session.log.exception("session.crashed")
            await session.close(CloseCode.INTERNAL_ERROR, "internal error")

    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as accepting:
            try:
                server = await accepting.start(partial(
                    serve_websocket, handle, config.host, config.port, ssl_context=None,
                    handler_nursery=sessions, max_message_size=config.max_frame_bytes,
                    # Bound the opening and closing handshakes by our own settings: a peer that
                    # reads nothing must not hold its connection for trio-websocket's default 60 s.
                    connect_timeout=config.hello_timeout, disconnect_timeout=config.shutdown_grace,
                    # Batched frames are tens of kilobytes; trio-websocket's 4 KiB default would
                    # take several reads for each.
                    receive_buffer_size=RECEIVE_BUFFER_BYTES))
            except OSError as error:
                raise ListenError.of(config.host, config.port, error) from error
            port = server.port
            logger.info("server.listening", host=config.host, port=port)
            task_status.started(Listener(broker, config, port, accepting.cancel_scope,
                                         sessions.cancel_scope))
