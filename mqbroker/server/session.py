"""One attached client: its protocol state, outbox and the reader and writer tasks.

Each session runs in its own nursery: the reader decodes frames and hands events to the broker,
the writer drains the outbox, coalescing whatever is queued into one frame. The broker reaches a
session only through `deliver`, which never blocks.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio
from attrs import define, field
from trio_websocket import ConnectionClosed, WebSocketConnection

from mqbroker.config import ServerConfig
from mqbroker.message import Message
from mqbroker.protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    Dropped,
    EncodedMessage,
    Frame,
    HandshakeFailed,
    Ping,
    Pong,
    Publish,
    Rejected,
    ServerConnection,
    ServerEvent,
    Welcome,
    join,
)
from mqbroker.server.outbox import Outbox, Overflowed
from mqbroker.server.publishing import PublishQueue

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.session")


@define(eq=False)
class Session:
    """A client attached over one WebSocket. Hashable by identity: the index keys on it."""

    ws: WebSocketConnection
    config: ServerConfig
    id: str = field(factory=lambda: secrets.token_hex(6))
    protocol: ServerConnection = field(factory=ServerConnection)
    outbox: Outbox = field(init=False)
    #: Subscription id -> live messages held back while that subscription replays history.
    recovering: dict[int, deque[EncodedMessage]] = field(factory=dict)
    log: Any = field(init=False)
    closing: CloseCode | None = None
    #: The scope of the reader and writer, once running.
    _tasks: trio.CancelScope | None = None
    _publishes: PublishQueue = field(factory=PublishQueue)
    #: When the reader began waiting for the next frame; None while it handles one.
    _waiting_since: float | None = None

    def __attrs_post_init__(self) -> None:
        self.outbox = Outbox(
            max_messages=self.config.outbox_messages,
            max_bytes=self.config.outbox_bytes,
            drop_oldest=self.config.slow_consumer == "drop_oldest",
        )
        remote = self.ws.remote
        peer = remote if isinstance(remote, str) else f"{remote.address}:{remote.port}"
        self.log = logger.bind(session=self.id, peer=peer)

    # --- what the broker calls ---------------------------------------------------------------

    def deliver(self, message: EncodedMessage, subs: tuple[int, ...]) -> None:
        """Queue a message for this session's subscriptions `subs`; never blocks."""
        if self.recovering:
            subs = self._hold_back(message, subs)
            if not subs:
                return
        if not self.outbox.put_nowait(message.fragment(self.protocol.format, subs)):
            self._overflowed()

    def signal(self, event: ServerEvent) -> None:
        """Queue an event in order with the deliveries (a `gap` must come after what was
        delivered before the interruption, unlike a reply); never blocks. Issue 9, item 1."""
        if not self.outbox.put_nowait(self.protocol.encode(event)):
            self._overflowed()

    def reply(self, event: ServerEvent) -> None:
        self.outbox.reply(self.protocol.encode(event))

    async def replay(self, messages: Sequence[Message], sub: int) -> None:
        """Queue replayed messages, paced by this session's writer rather than dropped."""
        for message in messages:
            await self.outbox.put(EncodedMessage(message).fragment(self.protocol.format, (sub,)))

    def _hold_back(self, message: EncodedMessage, subs: tuple[int, ...]) -> tuple[int, ...]:
        live = []
        for sub in subs:
            held = self.recovering.get(sub)
            if held is None:
                live.append(sub)
            elif len(held) < self.config.outbox_messages:
                held.append(message)
            else:
                self._overflowed()
        return tuple(live)

    def _overflowed(self) -> None:
        self.outbox.overflow()
        if self.closing is None:
            self.closing = CloseCode.SLOW_CONSUMER
            self.log.warning("session.slow", outbox=len(self.outbox),
                             policy=self.config.slow_consumer)
            if self._tasks is not None:
                # The writer may be stuck sending to a peer that reads nothing, so the 4008
                # close might never go out: after the grace period the connection is dropped.
                self._tasks.deadline = trio.current_time() + self.config.shutdown_grace

    # --- the tasks ---------------------------------------------------------------------------

    async def run(self, broker: Broker) -> None:
        """Serve this session until it closes; the broker forgets it on the way out."""
        try:
            first_events = await self._open(broker)
            if first_events is not None:
                self.log.info("session.opened", client=self.protocol.client,
                              format=self.protocol.format.value)
                async with trio.open_nursery() as nursery:
                    self._tasks = nursery.cancel_scope
                    nursery.start_soon(self._write_loop, nursery.cancel_scope)
                    nursery.start_soon(self._publishes.run, partial(broker.publish, self))
                    nursery.start_soon(self._watch_idle)
                    # Events batched with the hello are handled once the writer runs: one
                    # may be a replay that needs the outbox drained.
                    await self._handle(broker, first_events)
                    await self._read_loop(broker)
                    # What the peer sent before leaving is still published (acknowledged or
                    # not), within the grace period.
                    with trio.move_on_after(self.config.shutdown_grace):
                        await self._publishes.drained()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(self.config.shutdown_grace, shield=True):
                await broker.detach(self)
            self.log.info("session.closed", code=self.close_code)

    @property
    def close_code(self) -> int | None:
        """The code this session closed (or is closing) with: ours if we closed it, else the
        peer's; None while it is open."""
        if self.closing is not None:
            return int(self.closing)
        closed = self.ws.closed
        return int(closed.code) if closed is not None else None

    async def _open(self, broker: Broker) -> list[Any] | None:
        """Handshake: the events that came with the hello, or None if the session is over."""
        with trio.move_on_after(self.config.hello_timeout):
            try:
                frame = await self.ws.get_message()
                events: list[Any] = self.protocol.receive(frame)
                await self.ws.send_message(self.protocol.encode(self._welcome(broker)))
            except HandshakeFailed as e:
                await self._send_and_close(self.protocol.encode(e.error),
                                           CloseCode.HANDSHAKE_FAILED, e.error.message)
                return None
            except ConnectionClosed:
                return None
            return events
        await self._send_and_close(None, CloseCode.HANDSHAKE_FAILED, "no hello in time")
        return None

    def _welcome(self, broker: Broker) -> Welcome:
        return Welcome(version=PROTOCOL_VERSION, instance=broker.instance_id, session=self.id,
                       limits=broker.limits())

    async def _read_loop(self, broker: Broker) -> None:
        while True:
            self._waiting_since = trio.current_time()
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed:
                return
            self._waiting_since = None
            await self._handle(broker, self.protocol.receive(frame))

    async def _watch_idle(self) -> None:
        """Close the session once its reader has waited idle_timeout for a frame.

        Only waiting is timed: handling a frame may wait on this session's own outbox (a
        replay) for longer than a client needs to stay quiet. A watchdog rather than a cancel
        scope around each read: that costs a tenth of a small frame's handling."""
        idle = self.config.idle_timeout
        while True:
            since = self._waiting_since
            await trio.sleep_until((since if since is not None else trio.current_time()) + idle)
            since = self._waiting_since
            if since is not None and trio.current_time() - since >= idle:
                await self._close(CloseCode.IDLE_TIMEOUT, "idle timeout")
                return

    async def _handle(self, broker: Broker, events: list[Any]) -> None:
        """Handle one frame's events in order. Runs of publishes are queued for the publishing
        task; any other event first waits for the publishes queued before it."""
        publishes: list[Publish] = []
        for event in events:
            if isinstance(event, Publish):
                publishes.append(event)
                continue
            if publishes:
                await self._publishes.put(publishes)
                publishes = []
            await self._publishes.drained()
            await self._handle_one(broker, event)
        if publishes:
            await self._publishes.put(publishes)

    async def _handle_one(self, broker: Broker, event: Any) -> None:
        if isinstance(event, Rejected):
            self.outbox.reply(self.protocol.error(event))
        elif isinstance(event, Ping):
            self.reply(Pong(id=event.id))
        else:
            await broker.handle(self, event)

    async def _write_loop(self, session_scope: trio.CancelScope) -> None:
        max_bytes = self.config.max_frame_bytes
        try:
            while True:
                fragments, dropped = await self.outbox.take(max_bytes)
                if dropped:
                    fragments.insert(0, self.protocol.encode(Dropped(count=dropped)))
                await self.ws.send_message(join(fragments, self.protocol.format))
        except Overflowed:
            await self._close(CloseCode.SLOW_CONSUMER, "slow consumer: outbox overflowed")
        except ConnectionClosed:
            pass
        session_scope.cancel()

    async def _send_and_close(self, frame: Frame | None, code: CloseCode, reason: str) -> None:
        try:
            if frame is not None:
                await self.ws.send_message(frame)
        except ConnectionClosed:
            return
        await self._close(code, reason)

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close this session's WebSocket with `code` (used by the listener at shutdown)."""
        await self._close(code, reason)

    async def _close(self, code: CloseCode, reason: str) -> None:
        self.closing = self.closing or code
        with trio.move_on_after(self.config.shutdown_grace, shield=True):
            await self.ws.aclose(code, reason)
