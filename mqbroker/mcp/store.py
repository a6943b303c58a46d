"""The MCP SDK's `EventStore`, kept in mqbroker: one recorded topic per session.

`BrokerEventStore` owns the broker connection (the asyncio client); `session(id)` gives the
`EventStore` of one session (the hooks in `_sdk_hooks` hand one to each session the SDK opens,
since the SDK never tells a store which session an event belongs to). Each stored event is a
message on the session's topic holding its sequence number, its stream and its JSON-RPC
message; its SSE event id (`mqbroker.mcp.ids.EventRef`) carries the session, so a replay
cannot cross sessions.

`store_event` never raises into the SDK (its message router stops for good on the first error)
and never waits on the broker: it queues the publish and returns the id at once (the SDK stores
one message after another, so a round trip per message would be the whole cost). Publishes leave
in order on one connection, each acknowledged in the background; one that cannot be stored (the
broker unreachable past the retry window, or the message over its size limit) leaves a hole in
the session's sequence numbers, or a marker, which a replay reports as a gap.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from attrs import define, field
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import ErrorData, JSONRPCError, JSONRPCMessage, JSONRPCResponse
from mcp_types import jsonrpc_message_adapter as messages

from mqbroker.client import aio
from mqbroker.client.errors import ClientError, OutcomeUnknown, Unavailable
from mqbroker.mcp.ids import EventRef, omitted, record, request_id
from mqbroker.mcp.registry import Owner, SessionRegistry
from mqbroker.mcp.replay import Lost, SessionReader, unsubscribe
from mqbroker.mcp.settings import StoreSettings
from mqbroker.protocol.codec import payload_size
from mqbroker.topics import InvalidTopic, TopicLimits, validate_topic

logger = structlog.get_logger("mqbroker.mcp")

#: The JSON-RPC error code a resumed request is answered with when events of its stream were
#: lost (docs/mcp.md, "Gaps"): in the range JSON-RPC leaves to servers.
GAP_ERROR_CODE = -32050
#: The broker's default max_message_bytes (1 MiB frames), assumed before the first welcome.
DEFAULT_MAX_MESSAGE_BYTES = (1 << 20) - 1024
#: The SDK's name for the standalone GET stream (no request: a gap there fails no request).
GET_STREAM = "_GET_stream"


@define(eq=False)
class BrokerEventStore(EventStore):
    """The event store of every session of one MCP server instance, in an mqbroker.

    Open it (`async with store:`) before the server serves requests; `mqbroker.mcp.resumable`
    does. Used directly as the SDK's `event_store` without the session hooks, it keeps every
    event under one session of its own: correct for one session, and no replay crosses into
    another store's sessions, but sessions of this store share one sequence.
    """

    url: str
    settings: StoreSettings = field(factory=StoreSettings)
    #: ws:// or wss:// options for `mqbroker.client.aio.connect` (auth, ssl_context, ...).
    connect_options: dict[str, Any] = field(factory=dict)
    #: Counts: stored (acknowledged), lost (not stored), omitted (too large), replays, gaps.
    stats: dict[str, int] = field(factory=lambda: dict.fromkeys(
        ("stored", "lost", "omitted", "replays", "gaps", "forgotten", "registered",
         "unregistered", "deleted", "owner_gone"), 0))
    #: Set when the server is shutting down: sessions ended then are not forgotten (another
    #: instance may resume them).
    shutting_down: bool = False
    _client: aio.Client | None = None
    _closing: Callable[[], Awaitable[None]] | None = None
    _connecting: asyncio.Lock = field(factory=asyncio.Lock)
    _sessions: dict[str, SessionEventStore] = field(factory=dict)
    _unbound: SessionEventStore | None = None
    _in_flight: asyncio.Semaphore = field(init=False)
    _tasks: set[asyncio.Task[None]] = field(factory=set)
    #: This instance's id: the owner the registry names for the sessions it opens.
    instance: str = field(factory=lambda: secrets.token_hex(8))
    #: The session registry and presence, as this store uses them (mqbroker.mcp.registry).
    registry: SessionRegistry = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._in_flight = asyncio.Semaphore(self.settings.max_in_flight)
        self.registry = SessionRegistry(
            self.connected, self.settings, Owner.of(self.instance), self.stats,
            authenticated=self.connect_options.get("auth") is not None)
        try:
            validate_topic(self.settings.topic_of("session"), TopicLimits())
        except InvalidTopic as e:
            raise ValueError(f"mqbroker.mcp: topic {self.settings.topic!r}: {e}") from None

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> BrokerEventStore:
        await self.connected()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connected(self) -> aio.Client:
        """The broker client, connecting first if needed (retried for `connect_timeout`)."""
        if self._client is not None:
            return self._client
        async with self._connecting:
            if self._client is None:
                self._client, self._closing = await _connect(
                    self.url, self.settings, self.registry.owner.client, self.connect_options)
            return self._client

    async def aclose(self) -> None:
        """Let the queued publishes finish (bounded by `store_wait`), then disconnect."""
        await self.registry.aclose()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.store_wait)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closing, self._client, self._closing = self._closing, None, None
        if closing is not None:
            await closing()

    # --- sessions --------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionEventStore:
        """The `EventStore` of one session (made on first use)."""
        store = self._sessions.get(session_id)
        if store is None:
            try:
                validate_topic(self.settings.topic_of(session_id), TopicLimits())
            except InvalidTopic as e:
                raise ValueError(f"mqbroker.mcp: session id {session_id!r}: {e}") from None
            store = self._sessions[session_id] = SessionEventStore(self, session_id)
        return store

    def is_bound(self, session_id: str) -> bool:
        """Whether the session has its own store here (opened on this instance, not forgotten)."""
        return session_id in self._sessions

    async def register(self, session_id: str) -> None:
        """Register a session this instance opened (the resume route calls it before the
        client learns the session's id); bounded, never raises."""
        if self.settings.registry and self.is_bound(session_id):
            await self.registry.register(session_id)

    async def end_session(self, session_id: str) -> None:
        """The SDK ended the session: delete it from the registry, which forgets its stored
        events and ends its subscriptions on every instance (or, if it cannot, forget them
        here); bounded, never raises."""
        self._sessions.pop(session_id, None)
        if self.settings.registry and await self.registry.release(session_id):
            self.stats["forgotten"] += 1
            return
        topic = self.settings.topic_of(session_id)
        try:
            async with asyncio.timeout(self.settings.forget_timeout):
                await (await self.connected()).forget(topic)
            self.stats["forgotten"] += 1
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.forget_failed", session=session_id, error=repr(e))

    # --- the SDK's EventStore, unbound -------------------------------------------------------

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        return await self._unbound_store().store_event(stream_id, message)

    async def replay_events_after(self, last_event_id: EventId,
                                  send_callback: EventCallback) -> StreamId | None:
        return await self._unbound_store().replay_events_after(last_event_id, send_callback)

    def _unbound_store(self) -> SessionEventStore:
        if self._unbound is None:
            self._unbound = SessionEventStore(self, f"unbound-{secrets.token_hex(8)}")
        return self._unbound

    # --- publishing and replaying ---------------------------------------------------------------

    async def enqueue(self, session: SessionEventStore, seq: int, payload: dict[str, Any]
                      ) -> bool:
        """Queue one event's publish; False when there was no room within `store_wait`."""
        try:
            async with asyncio.timeout(self.settings.store_wait):
                await self._in_flight.acquire()
        except TimeoutError:
            return False
        task = asyncio.get_running_loop().create_task(self._publish(session, seq, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _publish(self, session: SessionEventStore, seq: int, payload: dict[str, Any]
                       ) -> None:
        stored = False
        try:
            event = await self._publish_retried(session.topic, seq, payload)
            if event is not None:
                session.stored(seq, event)
                stored = True
        except ClientError as e:  # MessageTooLarge too, if the broker's limit changed since
            logger.warning("mcp.store_failed", session=session.session, seq=seq, error=repr(e))
        finally:  # cancelled (the store closing) counts as lost too
            self._in_flight.release()
            self.stats["stored" if stored else "lost"] += 1

    def fits(self, topic: str, payload: dict[str, Any], json: str | None) -> bool:
        """Whether the event is within the broker's `max_message_bytes` (the welcome's, or the
        default before the first connection); cheap for the usual small message."""
        limit = (self._client.limits.max_message_bytes if self._client is not None
                 else DEFAULT_MAX_MESSAGE_BYTES)
        if json is None or 4 * (len(json) + len(topic)) + 200 < limit:
            return True
        return len(topic.encode()) + payload_size(payload) <= limit

    async def _publish_retried(self, topic: str, seq: int, payload: dict[str, Any]
                               ) -> str | None:
        """Publish with `msg_id` = the sequence number: a retry is never delivered twice."""
        client = await self.connected()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.retry_window
        for attempt in itertools.count():
            try:
                return await client.publish(topic, payload, msg_id=str(seq))
            except (Unavailable, OutcomeUnknown) as e:
                if loop.time() >= give_up:
                    logger.warning("mcp.store_failed", topic=topic, seq=seq, error=repr(e))
                    return None
                await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
        raise AssertionError("unreachable")

    async def replay(self, ref: EventRef, send: EventCallback) -> StreamId | None:
        """Send what the stream `ref` names missed; the stream's id when it may go on live,
        None when it is over (its response replayed) or broken (a gap: its request is
        answered with the gap error)."""
        self.stats["replays"] += 1
        try:
            async with asyncio.timeout(self.settings.replay_timeout):
                return await self._replay(ref, send)
        except (ClientError, TimeoutError) as e:
            await self.report_gap(ref, f"the replay failed: {e!r}", send)
            return None

    async def _replay(self, ref: EventRef, send: EventCallback) -> StreamId | None:
        client = await self.connected()
        subscription = await client.subscribe(self.settings.topic_of(ref.session),
                                              since=ref.since)
        try:
            async for item in SessionReader(ref).replay(subscription):
                if isinstance(item, Lost):
                    await self.report_gap(ref, item.reason, send)
                    return None
                message = messages.validate_json(item.json, by_name=False)
                await send(EventMessage(message, item.event_id))
                if item.final:
                    return None
        finally:
            await unsubscribe(subscription)
        return ref.stream

    async def report_gap(self, ref: EventRef, reason: str, send: EventCallback) -> None:
        """Answer the stream's request with the gap error (the GET stream has none: logged)."""
        self.stats["gaps"] += 1
        logger.warning("mcp.replay_gap", session=ref.session, stream=ref.stream, reason=reason)
        if ref.stream != GET_STREAM:
            await send(EventMessage(gap_error(ref.stream, reason)))


@define(eq=False)
class SessionEventStore(EventStore):
    """The `EventStore` of one session: its events on its own topic, numbered from 1."""

    owner: BrokerEventStore
    session: str
    topic: str = field(init=False)
    _seq: int = 0
    #: The broker event id of the newest acknowledged event, and its sequence number: a
    #: replay of a later event starts there.
    _anchor: str | None = None
    _anchor_seq: int = 0

    def __attrs_post_init__(self) -> None:
        self.topic = self.owner.settings.topic_of(self.session)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        self._seq += 1
        seq = self._seq
        event_id = EventRef(self.session, stream_id, seq, self._anchor).encode()
        try:
            json = (message.model_dump_json(by_alias=True, exclude_unset=True)
                    if message is not None else None)
            final = isinstance(message, JSONRPCResponse | JSONRPCError)
            payload = record(seq, stream_id, json, final=final)
            if not self.owner.fits(self.topic, payload, json):
                # Caught before storing: a marker in its place makes its stream's replay a gap.
                self.owner.stats["omitted"] += 1
                logger.warning("mcp.message_too_large", session=self.session, seq=seq,
                               stream=stream_id, bytes=len(json or ""))
                payload = omitted(seq, stream_id, "too_large")
            if not await self.owner.enqueue(self, seq, payload):
                self.owner.stats["lost"] += 1
                logger.warning("mcp.store_full", session=self.session, seq=seq)
        except Exception as e:  # never into the SDK: its router would stop for good
            self.owner.stats["lost"] += 1
            logger.error("mcp.store_error", session=self.session, seq=seq, error=repr(e))
        return event_id

    def stored(self, seq: int, event: str) -> None:
        """The broker acknowledged event `seq` as `event`."""
        if seq > self._anchor_seq:
            self._anchor, self._anchor_seq = event, seq

    async def replay_events_after(self, last_event_id: EventId,
                                  send_callback: EventCallback) -> StreamId | None:
        ref = EventRef.parse(last_event_id)
        if ref is None or ref.session != self.session:
            return None  # another store's id, a forged one, or another session's: nothing
        return await self.owner.replay(ref, send_callback)


def gap_error(stream: str, reason: str) -> JSONRPCError:
    """The error a resumed request gets when events of its stream were lost."""
    return JSONRPCError(jsonrpc="2.0", id=request_id(stream), error=ErrorData(
        code=GAP_ERROR_CODE,
        message=f"events of this request's stream were lost; retry the request ({reason})",
        data={"reason": reason}))


async def _connect(url: str, settings: StoreSettings, name: str, options: dict[str, Any]
                   ) -> tuple[aio.Client, Callable[[], Awaitable[None]]]:
    """Connect, retrying for `connect_timeout` (the broker may start after the server)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + settings.connect_timeout
    delay = 0.05
    while True:
        context = aio.connect(url, name=name, **options)
        try:
            client = await context.__aenter__()
        except ClientError:
            if loop.time() + delay >= give_up:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue

        async def close(context: Any = context) -> None:
            await context.__aexit__(None, None, None)

        return client, close

