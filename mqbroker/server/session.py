"""One attached client: its connection, its protocol state and its outbox, served by one task.

The task that serves a session reads its frames, hands their requests to the broker and writes
what they produced; publishes are handled inline when the fan-out is local, and through a
publishing task of the session's own when it is not (so that a round trip to Redis does not
stop it reading). Deliveries from other sessions' publishes are queued on the outbox and
written at once by whichever task delivered them: the broker never waits on a session, and no
task is woken per delivery. A writer task exists only while the socket is full.

The session reaches the broker through `Broker`'s methods; the broker reaches the session only
through the small `mqbroker.broker.Session` protocol (deliver, reply, flush, slow, replay).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio
from attrs import define, field

from mqbroker.auth import (
    ANONYMOUS,
    AuthFailed,
    Operation,
    Permissions,
    Principal,
    checked_principal,
)
from mqbroker.broker import MAX_FRAME_ITEMS
from mqbroker.config import ServerConfig
from mqbroker.protocol import (
    SESSION_REQUESTS,
    CloseCode,
    Dropped,
    EncodedMessage,
    Error,
    ErrorCode,
    Forget,
    Frame,
    HandshakeFailed,
    Latest,
    Ping,
    Pong,
    Presence,
    Publish,
    Refresh,
    Refreshed,
    Rejected,
    ServerConnection,
    ServerEvent,
    SessionRequest,
    Subscribe,
    Unsubscribe,
    join,
)
from mqbroker.protocol.codec import payload_size
from mqbroker.protocol.websocket import (
    CloseReceived,
    ProtocolViolation,
    ServerWebSocket,
)
from mqbroker.protocol.websocket import (
    Ping as WsPing,
)
from mqbroker.ratelimit import Rates, SessionLimits
from mqbroker.registry import Caller, SessionsRight
from mqbroker.server.connection import Connection
from mqbroker.server.outbox import Outbox
from mqbroker.server.publishing import PublishQueue
from mqbroker.server.registry import RequestQueue
from mqbroker.sessions import check_session_id
from mqbroker.topics import InvalidTopic, validate_filter

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.session")

#: Publishes of one frame are handed to the broker in runs of at most this many, with a
#: checkpoint between runs: a frame of a thousand publishes does not hold the loop meanwhile.
PUBLISH_RUN = 100
#: Other requests (and WebSocket pings) are handled this many at a time between checkpoints:
#: one read of 64 KiB can hold dozens of small frames of a thousand requests each (invalid
#: ones, say), and handled in one go they held the loop for a quarter of a second.
REQUEST_RUN = 100
#: What a hello or refresh is told when a plugin's authenticator did not answer in time, or
#: failed (the reason stays in the log).
AUTH_UNAVAILABLE = "authentication unavailable: no answer in time"
AUTH_ERROR = "authentication failed unexpectedly"


@define(eq=False)
class Session:
    """A client attached over one WebSocket. Hashable by identity: the index keys on it."""

    connection: Connection
    ws: ServerWebSocket
    config: ServerConfig
    broker: Broker
    peer: str
    id: str = field(factory=lambda: secrets.token_hex(6))
    protocol: ServerConnection = field(factory=ServerConnection)
    outbox: Outbox = field(init=False)
    log: Any = field(init=False)
    #: The code we close with, once closing; None while open (or closed by the peer).
    closing: CloseCode | None = None
    #: The code and reason the peer closed with, if it did (1005: a close frame with no code).
    peer_code: int | None = None
    peer_reason: str = ""
    #: When the session last finished handling what it read (trio's clock); the listener's
    #: watchdog closes sessions idle for `idle_timeout`.
    last_read: float = 0.0
    #: Reading a frame's requests, which may wait on this session's own outbox (a replay):
    #: that is not idleness.
    busy: bool = False
    _close_reason: str = ""
    _dirty: bool = False
    #: Requests handled since the last checkpoint (see REQUEST_RUN).
    _handled: int = 0
    _reading: trio.CancelScope | None = None
    _publishes: PublishQueue | None = None
    #: Session registry requests in flight (started with the first one).
    _registry_requests: RequestQueue | None = None
    _nursery: trio.Nursery | None = None
    _ended: trio.Event = field(factory=trio.Event)
    #: WebSocket items that arrived with the hello, handled first by the read loop.
    _backlog: list[Any] = field(factory=list)
    #: The session's rate limits (its principal's roles', or [limits]), set by the hello;
    #: `_limits` is None when they limit nothing (the checks are skipped).
    rates: Rates = field(factory=Rates)
    _limits: SessionLimits | None = None
    #: Who the hello authenticated as ([auth]), and what that principal may do.
    principal: Principal = ANONYMOUS
    permissions: Permissions = field(factory=Permissions.all)
    #: When security.forbidden was last logged: once per violation_window at most.
    _forbidden_logged: float | None = None
    #: When the credential expires (trio's clock); the listener's watchdog closes the session
    #: then (4003). Infinite for credentials that do not expire.
    expires_at: float = math.inf

    def __attrs_post_init__(self) -> None:
        self.outbox = Outbox(
            max_messages=self.config.outbox_messages,
            max_bytes=self.config.outbox_bytes,
            drop_oldest=self.config.slow_consumer == "drop_oldest",
        )
        self.log = logger.bind(session=self.id, peer=self.peer)
        self.protocol.max_items = MAX_FRAME_ITEMS
        self.last_read = trio.current_time()
        self.connection.on_drained = self.flush
        self.connection.on_broken = self.outbox.gone_away

    # --- what the broker calls (mqbroker.broker.Session) -------------------------------------

    def deliver(self, message: EncodedMessage, subs: tuple[int, ...]) -> bool:
        if not self.outbox.put(message.fragment(self.protocol.format, subs)):
            self.slow()
            return False
        if self._dirty:
            return False
        self._dirty = True
        return True

    def signal(self, event: ServerEvent) -> None:
        # Among the deliveries: a `gap` must come after what was delivered before the
        # interruption, which a reply would overtake.
        if not self.outbox.put(self.protocol.encode(event)):
            self.slow()
        self._dirty = True

    def reply(self, event: ServerEvent) -> None:
        self._queue_reply(self.protocol.encode(event))

    def _queue_reply(self, fragment: Frame) -> None:
        if not self.outbox.reply(fragment):
            self.slow()
        self._dirty = True

    def slow(self, droppable: bool = True) -> None:
        if droppable and self.outbox.drop_oldest and not self.outbox.overflowed:
            self.outbox.dropped += 1
            self.outbox.dropped_total += 1
            return
        self._let_go()

    def _let_go(self) -> None:
        # Not once the peer closed: we answered its close, so nothing more is written and the
        # outbox fills with what still comes until the session detaches; no slow consumer.
        if self.closing is None and self.peer_code is None:
            self.log.warning("session.slow", outbox=len(self.outbox),
                             policy=self.config.slow_consumer)
            self.close_soon(CloseCode.SLOW_CONSUMER, "slow consumer: outbox overflowed",
                            discard=True)

    def _answer_ping(self, payload: bytes) -> bool:
        """Answer a WebSocket ping; False when the peer lets replies pile up instead of reading.

        A pong goes straight to the connection, not through the outbox (it is a control frame,
        not part of a batch), so it is bounded here: while more than `outbox_bytes` wait for
        the socket, a ping is not answered. Nothing is answered once a close was sent or
        received (the WebSocket layer gives b"" then)."""
        if self.connection.pending > self.config.outbox_bytes:
            return False
        self.connection.write(self.ws.pong(payload))
        return True

    async def replay(self, message: EncodedMessage, sub: int) -> bool:
        # No flush per message: a replay goes out in full frames, written when the outbox
        # fills (here) and when the request is done (by the caller).
        outbox = self.outbox
        fragment = message.fragment(self.protocol.format, (sub,))
        if not outbox.has_room(len(fragment)):
            self.flush()
            # A replay keeps the session busy (never idle), so a peer that reads nothing would
            # hold it for ever: no room for idle_timeout makes it a slow consumer (4008).
            with trio.move_on_after(self.config.idle_timeout) as waiting:
                await outbox.wait_room(len(fragment))
            if waiting.cancelled_caught:
                self._let_go()
                return False
            if self.connection.broken:
                return False
        if outbox.put(fragment):
            return True
        # It cannot fit even in an empty outbox, or the session is being let go: stopping the
        # replay silently would leave the client waiting for the rest, so it is told (4008).
        self._let_go()
        return False

    def flush(self) -> None:
        """Frame and write what the outbox holds, while the connection takes it at once;
        nothing once our close frame is out (RFC 6455 5.5.1): a reply that comes late, from a
        registry change finishing during the close, say, is dropped."""
        self._dirty = False
        connection, outbox, ws = self.connection, self.outbox, self.ws
        max_bytes = self.config.max_frame_bytes
        while outbox and not connection.pending and not connection.broken and not ws.close_sent:
            fragments = outbox.take(max_bytes)
            dropped = outbox.take_dropped()
            if dropped:
                fragments.insert(0, self.protocol.encode(Dropped(count=dropped)))
            connection.write(self.ws.send(join(fragments, self.protocol.format)))

    @property
    def close_code(self) -> int | None:
        if self.closing is not None:
            return int(self.closing)
        return self.peer_code

    def expired(self) -> None:
        """The credential expired: tell the client (after what is queued), then close (4003)."""
        if self.closing is not None:
            return
        self.log.info("security.credential_expired")
        self.signal(Error(code=ErrorCode.UNAUTHORIZED, message="credential expired",
                          ref="hello"))
        self.close_soon(CloseCode.UNAUTHORIZED, "credential expired")

    # --- what presence reads (mqbroker.server.presence) --------------------------------------

    @property
    def client_name(self) -> str:
        """The hello's `client`."""
        return self.protocol.client

    @property
    def principal_name(self) -> str | None:
        """Who the hello authenticated as; None in anonymous mode (as in the welcome)."""
        return None if self.permissions.everything else self.principal.name

    # --- closing ---------------------------------------------------------------------------

    def close_soon(self, code: CloseCode, reason: str, *, discard: bool = False) -> None:
        """Close with `code`: stop reading, send what is queued (unless `discard`), then the
        close frame. Returns at once; the session's own task does the closing, bounded by
        shutdown_grace."""
        if self.closing is not None or self.peer_code is not None:
            return
        self.closing = code
        self._close_reason = reason
        if discard:
            self.outbox.clear()
        else:
            self.outbox.let_go()  # a replay waiting for room stops; what is queued still goes
        if self._reading is not None:
            self._reading.cancel()

    async def close(self, code: CloseCode, reason: str) -> None:
        """Close with `code` and wait until the session has ended (bounded by shutdown_grace)."""
        self.close_soon(code, reason)
        await self._ended.wait()

    async def _finish(self) -> None:
        """The end of the session: what is queued, the close frame, the peer's close, bounded."""
        connection = self.connection
        with trio.move_on_after(self.config.shutdown_grace, shield=True):
            if self.closing is not None and not connection.broken:
                while self.outbox and not connection.broken and not self.ws.close_sent:
                    self.flush()
                    await connection.drained()
                connection.write(self.ws.close(int(self.closing), self._close_reason))
                await connection.drained()
                await connection.linger()
            elif self.peer_code is not None:
                await connection.drained()
        connection.close()

    # --- serving -----------------------------------------------------------------------------

    async def open(self, received: bytes) -> list[Any] | None:
        """Wait for the hello (the caller bounds this by hello_timeout), `received` being what
        came behind the HTTP request. The events that came with the hello, or None if the
        session is over (refused, closed by the peer, broken)."""
        data = received
        while True:
            try:
                items = self.ws.receive_data(data) if data else []
            except ProtocolViolation as e:
                await self._refuse(None, e.code, e.reason)
                return None
            for index, item in enumerate(items):
                if isinstance(item, bytes | str):
                    # Frames the client sent right behind its hello wait for the read loop.
                    self._backlog = items[index + 1:]
                    return await self._hello(item)
                if isinstance(item, CloseReceived):
                    self.peer_code = item.code or CloseCode.NORMAL
                    self.connection.write(self.ws.close(item.code or CloseCode.NORMAL, ""))
                    await self.connection.flush_now()
                    return None
                if isinstance(item, WsPing):
                    # Past the bound, left unanswered: hello_timeout ends this soon anyway.
                    self._answer_ping(item.payload)
            data = await self.connection.receive()
            if not data:
                return None

    async def _hello(self, frame: Frame) -> list[Any] | None:
        try:
            events: list[Any] = self.protocol.receive(frame)
        except HandshakeFailed as e:
            await self._refuse(self.protocol.encode(e.error), CloseCode.HANDSHAKE_FAILED,
                               e.error.message)
            return None
        auth, self.protocol.auth = self.protocol.auth, None
        if not await self._authenticate(auth):
            return None
        welcome = self.broker.welcome(self.id, self.rates)
        if not self.permissions.everything:
            welcome = attrs.evolve(welcome, principal=self.principal.name, ttl=self._ttl())
        self.connection.write(self.ws.send(self.protocol.encode(welcome)))
        return events

    async def _authenticate(self, credential: str | None) -> bool:
        """Check the hello's credential (mode mtls: the client certificate's name); when it
        names no principal, refuse the session: 4003 for a credential that is not valid, 1013
        when the authenticator did not answer within authenticate_timeout, 1011 when it failed
        otherwise (a plugin's fault)."""
        access = self.broker.access
        if access.by_certificate:
            credential = self.connection.client_common_name()
        try:
            principal = await self._principal(credential)
        except AuthFailed as e:
            self._auth_failed(e.reason, "hello")
            await self._refuse_hello(ErrorCode.UNAUTHORIZED,
                                     f"authentication failed: {e.reason}",
                                     CloseCode.UNAUTHORIZED, "unauthorized")
            return False
        except trio.TooSlowError:
            self._auth_unavailable("hello")
            await self._refuse_hello(ErrorCode.UNAVAILABLE, AUTH_UNAVAILABLE,
                                     CloseCode.TRY_AGAIN_LATER, "try again later")
            return False
        except Exception as e:
            self._auth_error(e, credential, "hello")
            await self._refuse_hello(ErrorCode.INTERNAL, AUTH_ERROR,
                                     CloseCode.INTERNAL_ERROR, "internal error")
            return False
        self._admit(principal)
        return True

    async def _principal(self, credential: str | None) -> Principal:
        """Who the credential names: a plugin's answer is bounded by its timeout and checked."""
        access = self.broker.access
        if access.timeout is None:  # a built-in scheme: it never waits
            return await access.authenticate(credential)
        with trio.fail_after(access.timeout):
            answer = await access.authenticate(credential)
        return checked_principal(answer)

    def _admit(self, principal: Principal) -> None:
        """From now on the session is `principal`'s: its rights, rate limits and expiry (at
        the hello, and again at each refresh)."""
        access = self.broker.access
        self.principal = principal
        self.permissions = access.permissions(principal)
        rates = access.rates_of(principal)
        if rates != self.rates or self._limits is None:  # a refresh keeps unchanged buckets
            self.rates = rates
            self._limits = SessionLimits.of(rates) if rates.session_limited else None
        self.expires_at = (math.inf if principal.expires is None
                           else trio.current_time() + (principal.expires - time.time()))
        self.log = self.log.bind(principal=principal.name)

    async def _refuse_hello(self, code: ErrorCode, message: str, close: CloseCode,
                            reason: str) -> None:
        error = Error(code=code, ref="hello", message=message)
        await self._refuse(self.protocol.encode(error), close, reason)

    def _ttl(self) -> float | None:
        """Seconds until the credential expires (what `welcome` and `refreshed` say)."""
        if self.expires_at == math.inf:
            return None
        return round(max(self.expires_at - trio.current_time(), 0.0), 3)

    def _auth_failed(self, reason: str, op: str) -> None:
        self.broker.counters["security_auth_failed"] += 1
        # The reason only: the credential is a secret, even a wrong one (a typo of a real one).
        self.log.warning("security.auth_failed", reason=reason, op=op)

    def _auth_unavailable(self, op: str) -> None:
        self.broker.counters["security_auth_unavailable"] += 1
        self.log.warning("security.auth_unavailable", timeout=self.broker.access.timeout, op=op)

    def _auth_error(self, error: Exception, credential: str | None, op: str) -> None:
        self.broker.counters["security_auth_errors"] += 1
        self.log.error("security.auth_error", error=type(error).__name__,
                       message=_masked(str(error), credential), op=op)

    async def refuse(self, code: CloseCode, reason: str) -> None:
        """Close before (or instead of) serving: no hello in time, or a crash. Bounded."""
        if self.closing is None and self.peer_code is None and not self.connection.broken:
            with trio.move_on_after(self.config.shutdown_grace, shield=True):
                await self._refuse(None, code, reason)
        self.connection.close()

    async def _refuse(self, frame: Frame | None, code: int, reason: str) -> None:
        self.closing = CloseCode(code) if code in set(CloseCode) else CloseCode.HANDSHAKE_FAILED
        self._close_reason = reason
        if frame is not None:
            self.connection.write(self.ws.send(frame))
        self.connection.write(self.ws.close(code, reason))
        with trio.move_on_after(self.config.shutdown_grace):
            await self.connection.flush_now()
            await self.connection.linger()

    async def run(self, first_events: list[Any]) -> None:
        """Serve the session until it closes, then finish the close (bounded)."""
        self.log.info("session.opened", client=self.protocol.client,
                      format=self.protocol.format.value)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.connection.start_writing(nursery)
                self.flush()
                with trio.CancelScope() as self._reading:
                    if self._limits is not None:
                        self._limits.new_frame()
                    await self._handle_frame(first_events)
                    self.flush()
                    await self._read_loop()
                with trio.move_on_after(self.config.shutdown_grace):
                    # What the peer sent before leaving is still published (acknowledged or
                    # not) and carried out, within the grace period.
                    if self._publishes is not None:
                        await self._publishes.drained()
                    if self._registry_requests is not None:
                        await self._registry_requests.drained()
                await self._finish()
                nursery.cancel_scope.cancel()
        finally:
            self.connection.close()
            self._ended.set()

    async def _read_loop(self) -> None:
        connection, ws = self.connection, self.ws
        items, self._backlog = self._backlog, []
        while not await self._handle_items(items):
            self.flush()
            self.busy = False
            self.last_read = trio.current_time()
            data = await connection.receive()
            if not data:
                if self.closing is None:
                    self.peer_code = 1006  # gone without a close frame (RFC 6455 7.1.5)
                return
            self.busy = True
            try:
                items = ws.receive_data(data)
            except ProtocolViolation as e:
                self.close_soon(_ws_code(e.code), e.reason)
                return

    async def _handle_items(self, items: list[Any]) -> bool:
        """Handle what the WebSocket layer made of the bytes read; True once the peer closed."""
        ping: bytes | None = None
        for item in items:
            kind = type(item)
            if kind is bytes or kind is str:
                events = self.protocol.receive(item)
                if self._limits is not None:
                    self._limits.new_frame()
                await self._handle_frame(events)
            elif kind is WsPing:
                # Only the latest ping of a read is answered, once the read is handled (RFC 6455
                # section 5.5.3 allows it): a burst of pings costs one pong, not a write each.
                ping = item.payload
                await self._handled_one()
            elif kind is CloseReceived:
                self._peer_closed(item)
                return True
        if ping is not None and not self._answer_ping(ping):
            # Pinging without reading the pongs: a slow consumer like any other (4008).
            self._let_go()
        return False

    def _peer_closed(self, item: CloseReceived) -> None:
        self.peer_code = item.code if item.code is not None else 1005
        self.peer_reason = item.reason
        # Echo the peer's code, as RFC 6455 section 5.5.1 asks.
        self.flush()
        self.connection.write(self.ws.close(item.code or CloseCode.NORMAL, ""))

    async def _handle_frame(self, events: list[Any]) -> None:
        """Handle one frame's events in order: runs of publishes, then each other request."""
        run: list[Publish] = []
        for event in events:
            if type(event) is Publish:
                run.append(event)
                if len(run) < PUBLISH_RUN:
                    continue
                await self._publish(run)
                # Let the other sessions in between runs of a long batch; the next read
                # checkpoints anyway, so a frame's last run needs none.
                await trio.lowlevel.checkpoint()
                run = []
                continue
            if run:
                await self._publish(run)
                run = []
            await self._handle_one(event)
            await self._handled_one()
        if run:
            await self._publish(run)

    async def _handled_one(self) -> None:
        """Count one request handled; every REQUEST_RUN, let the other sessions have their turn
        (and a close_soon, which cancels the reading, take effect)."""
        self._handled += 1
        if self._handled >= REQUEST_RUN:
            self._handled = 0
            await trio.lowlevel.checkpoint()

    async def _publish(self, run: list[Publish]) -> None:
        if self.closing is not None:
            return  # closing (an unauthorized refresh, say): the rest of the frame is not done
        if self._limits is not None:
            run = self._admitted(run)
            if not run:
                return
        if not self.permissions.everything and not self._authorized(run):
            await self._publish_allowed(run)
            return
        await self._publish_run(run)

    async def _publish_run(self, run: list[Publish]) -> None:
        if self.broker.fanout.local:
            await self.broker.publish(self, run)
            return
        if self._publishes is None:
            assert self._nursery is not None
            self._publishes = PublishQueue()
            self._nursery.start_soon(self._publishes.run, self._publish_pipelined)
        await self._publishes.put(run)

    async def _publish_pipelined(self, run: list[Publish]) -> None:
        await self.broker.publish(self, run)
        self.flush()

    async def _handle_one(self, event: Any) -> None:
        if self.closing is not None:
            return  # as in _publish
        if self._publishes is not None:
            await self._publishes.drained()  # every request after the publishes before it
        if type(event) is Ping:
            self.reply(Pong(id=event.id))
        elif type(event) is Rejected:
            self._queue_reply(self.protocol.error(event))
        elif self._limits is None or self._admit_request(event):
            if type(event) is Refresh:
                await self._refresh(event)
            elif type(event) in SESSION_REQUESTS:
                # Answered by the registry task, which flushes once nothing is left queued.
                await self._registry_request(event)
                return
            elif self.permissions.everything or self._may(event):
                await self.broker.handle(self, event)
            self.flush()

    # --- refreshing the credential ([auth] modes token and jwt) --------------------------------

    async def _refresh(self, event: Refresh) -> None:
        """Replace the session's credential: the same principal, maybe other rights and expiry.
        A credential that is not valid, or names another principal, closes the session (4003),
        as it would have refused the hello; subscriptions the new rights no longer allow end."""
        access = self.broker.access
        if not access.refreshable:
            self.reply(Error(code=ErrorCode.REFRESH_UNSUPPORTED, id=event.id, ref=event.OP,
                             message="this session's credential cannot be refreshed "
                                     f"([auth] mode {self.broker.config.auth.mode})"))
            return
        if self.expires_at <= trio.current_time():
            self.expired()  # too late: what the watchdog would have done at its next round
            return
        try:
            principal = access.refreshed(self.principal, await self._principal(event.auth))
        except AuthFailed as e:
            self._auth_failed(e.reason, event.OP)
            self.reply(Error(code=ErrorCode.UNAUTHORIZED, id=event.id, ref=event.OP,
                             message=f"refresh failed: {e.reason}"))
            self.close_soon(CloseCode.UNAUTHORIZED, "unauthorized")
            return
        except trio.TooSlowError:  # a plugin's: the session keeps its current credential
            self._auth_unavailable(event.OP)
            self.reply(Error(code=ErrorCode.UNAVAILABLE, id=event.id, ref=event.OP,
                             message=AUTH_UNAVAILABLE))
            return
        except Exception as e:
            self._auth_error(e, event.auth, event.OP)
            self.reply(Error(code=ErrorCode.INTERNAL, id=event.id, ref=event.OP,
                             message=AUTH_ERROR))
            return
        self._admit(principal)
        self.log.info("security.refreshed", ttl=self._ttl())
        self.reply(Refreshed(id=event.id, ttl=self._ttl()))
        await self._end_subscriptions_not_allowed()

    async def _end_subscriptions_not_allowed(self) -> None:
        """End each subscription whose filter the (new) rights no longer cover, telling the
        client with `forbidden` naming the subscription, in order with its deliveries."""
        permissions = self.permissions
        if permissions.everything:
            return
        filters = self.broker.index.filters_of(self)
        for sub, filter in list(filters.items()):
            if permissions.allows_filter(Operation.SUBSCRIBE, filter):
                continue
            notice = Error(code=ErrorCode.FORBIDDEN, id=sub, ref=Subscribe.OP,
                           message="subscription ended: the refreshed credential does not "
                                   f"allow subscribe on {filter!r}")
            await self.broker.end_subscription(self, sub, notice)
            self.log.info("security.subscription_ended", sub=sub, filter=_loggable(filter))

    # --- the session registry ----------------------------------------------------------------

    async def _registry_request(self, event: SessionRequest) -> None:
        """Queue a registry request: answered in order with the session's other registry
        requests, by a task of its own, so that a slow store never stops the reading."""
        if self._registry_requests is None:
            assert self._nursery is not None
            self._registry_requests = RequestQueue()
            self._nursery.start_soon(self._registry_requests.run, self._answer_registry,
                                     self.flush)
        await self._registry_requests.put(event)

    async def _answer_registry(self, event: SessionRequest) -> None:
        registry = self.broker.registry
        if registry is None:
            reply: ServerEvent = Error(code=ErrorCode.UNAVAILABLE, id=event.id, ref=event.OP,
                                       message="this broker has no session registry open")
        else:
            reply = await registry.answer(self.caller, event)
        if type(reply) is Error and reply.code == ErrorCode.FORBIDDEN:
            self._forbade("sessions", f"user {event.user}")
        self.reply(reply)

    @property
    def caller(self) -> Caller:
        """Who the registry serves on this connection (None as principal: anonymous mode)."""
        return Caller(principal=None if self.permissions.everything else self.principal.name,
                      right=SessionsRight.parse(self.permissions.sessions))

    # --- authorization ([auth]) ----------------------------------------------------------------

    def _authorized(self, run: list[Publish]) -> bool:
        """Whether the principal may make every publish of `run` (the common case)."""
        allows = self.permissions.allows_topic
        return all(allows(Operation.PUBLISH, event.topic) for event in run)

    async def _publish_allowed(self, run: list[Publish]) -> None:
        """Publish those of `run` the principal may make; answer each other one with
        `forbidden` (those without an id: one error per run at most), in the order of the run:
        a client reads its answers in the order of its requests."""
        allows = self.permissions.allows_topic
        allowed: list[Publish] = []
        unacknowledged_told = False
        for event in run:
            if allows(Operation.PUBLISH, event.topic):
                allowed.append(event)
                continue
            if allowed:
                await self._publish_run(allowed)
                allowed = []
            if self._publishes is not None:
                await self._publishes.drained()  # after the answers of the publishes before
            if event.id is not None or not unacknowledged_told:
                unacknowledged_told = unacknowledged_told or event.id is None
                self.reply(_forbidden(event, event.topic))
            self._forbade(Operation.PUBLISH, event.topic)
        if allowed:
            await self._publish_run(allowed)

    def _may(self, event: Subscribe | Unsubscribe | Forget | Latest | Presence) -> bool:
        """Whether the principal may make this request; answers `forbidden` when not."""
        if isinstance(event, Unsubscribe):
            return True  # only ever the session's own subscriptions
        if isinstance(event, Presence):
            return self._may_see_presence(event)
        target = event.topic if isinstance(event, Latest) else event.filter
        try:
            validate_filter(target, self.broker.topic_limits)
        except InvalidTopic:
            return True  # the broker answers invalid_filter, as it would without [auth]
        needed = self._rights(event)
        for operation in needed:
            if not self.permissions.allows_filter(operation, target):
                self.reply(_forbidden(event, target, operation))
                self._forbade(operation, target)
                return False
        return True

    def _may_see_presence(self, event: Presence) -> bool:
        """The `presence` query tells what the session's presence events tell: it is allowed
        to those who may subscribe to `{topic_prefix}/{id}/presence`."""
        try:
            check_session_id(event.session)
        except ValueError:
            return True  # the broker answers bad_event, as it would without [auth]
        topic = self.broker.session_topics.presence(event.session)
        if self.permissions.allows_filter(Operation.SUBSCRIBE, topic):
            return True
        self.reply(_forbidden(event, topic, Operation.SUBSCRIBE))
        self._forbade(Operation.SUBSCRIBE, topic)
        return False

    @staticmethod
    def _rights(event: Subscribe | Forget | Latest) -> Sequence[Operation]:
        if type(event) is Forget:
            return (Operation.FORGET,)
        # `latest` tells a position to resume from: it needs what a resume needs.
        if type(event) is Latest or (type(event) is Subscribe and event.since is not None):
            return (Operation.SUBSCRIBE, Operation.REPLAY)
        return (Operation.SUBSCRIBE,)

    def _forbade(self, operation: str, topic: str) -> None:
        """Count a refusal; log it at most once per violation_window."""
        self.broker.counters["security_forbidden"] += 1
        now = trio.current_time()
        last = self._forbidden_logged
        if last is None or now - last >= self.rates.violation_window:
            self._forbidden_logged = now
            self.log.warning("security.forbidden", op=str(operation),
                             topic=_loggable(topic))

    # --- rate limits ([limits]) ----------------------------------------------------------------

    def _admitted(self, run: list[Publish]) -> list[Publish]:
        """The publishes of `run` within the session's limits; each of the others is answered
        with `rate_limited` (those without an id: one error per frame at most) and dropped."""
        limits = self._limits
        assert limits is not None
        now = trio.current_time()
        # Only measured when a bytes limit is on: otherwise no payload is sized here.
        sizes = ([len(event.topic.encode()) + payload_size(event.payload) for event in run]
                 if limits.bytes is not None else [0] * len(run))
        if self.closing is None and limits.publish_run(len(run), sum(sizes), now):
            return run  # the common case: the whole run is within the limits, one check
        admitted: list[Publish] = []
        for event, size in zip(run, sizes, strict=True):
            if self.closing is not None:
                break  # closing (past max_violations, say): the rest is neither done nor answered
            over = limits.publish(size, now)
            if over is None:
                admitted.append(event)
                continue
            if event.id is not None or limits.report_unacknowledged():
                self.reply(_rate_limited(over, event))
            self._refused(over, now)
        if self.closing is not None:
            # Past max_violations: a closing session answers nothing more, so what this run
            # admitted before the refusal is not carried out either (published, it would be
            # delivered to others without its puback ever reaching the publisher).
            return []
        return admitted

    def _admit_request(self, event: Subscribe | Unsubscribe | Forget | Refresh | Latest
                       | SessionRequest | Presence) -> bool:
        limits = self._limits
        assert limits is not None
        if self.closing is not None:
            return False
        now = trio.current_time()
        over = limits.request(now)
        if over is None:
            return True
        self.reply(_rate_limited(over, event))
        self._refused(over, now)
        return False

    def _refused(self, limit: str, now: float) -> None:
        """Count a refusal; log it (once per window) and close the session past max_violations."""
        limits = self._limits
        assert limits is not None
        self.broker.counters["security_rate_limited"] += 1
        refusal = limits.refused(now)
        if refusal.log:
            self.log.warning("security.rate_limited", limit=limit)
        if refusal.exceeded and self.closing is None:
            self.broker.counters["security_violations_exceeded"] += 1
            self.log.warning("security.violations_exceeded",
                             max_violations=limits.violations.max_violations,
                             window=limits.violations.window)
            self.close_soon(CloseCode.RATE_LIMITED, "rate limited")


def _rate_limited(limit: str, event: Publish | Subscribe | Unsubscribe | Forget | Refresh | Latest
                  | SessionRequest | Presence) -> Error:
    return Error(code=ErrorCode.RATE_LIMITED, message=f"over the rate limit {limit}: not done",
                 id=event.id, ref=event.OP)


def _forbidden(event: Publish | Subscribe | Forget | Latest | Presence, topic: str,
               operation: Operation = Operation.PUBLISH) -> Error:
    return Error(code=ErrorCode.FORBIDDEN,
                 message=f"not allowed: {operation.value} on {topic!r}: not done",
                 id=event.id, ref=event.OP)


def _masked(text: str, credential: str | None) -> str:
    """A plugin's error message as logged: the credential replaced wherever it appears (it
    is a secret, even a wrong one), cut to LOGGED_TOPIC_CHARS."""
    if credential:
        text = text.replace(credential, "[credential]")
    return _loggable(text)


#: A topic longer than this is cut in logs: it is the client's text.
LOGGED_TOPIC_CHARS = 120


def _loggable(topic: str) -> str:
    return topic if len(topic) <= LOGGED_TOPIC_CHARS else topic[:LOGGED_TOPIC_CHARS] + "..."


def _ws_code(code: int) -> CloseCode:
    return CloseCode(code) if code in set(CloseCode) else CloseCode.PROTOCOL_ERROR
