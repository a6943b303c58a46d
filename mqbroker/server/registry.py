"""The session registry in the broker: store calls for requests, the reaper, lifecycle events.

One `Registry` per instance, opened by `open_registry` from `[sessions] plugin` and reached by
connections as `broker.registry`. Each connection queues its registry requests on a
`RequestQueue` of its own, answered in order by one task of that connection: a slow store
costs those requests their latency, and neither the connection's reading nor any other
connection waits on it. Every store call is bounded by `[sessions] request_timeout`.

Lifecycle events are published through the broker's one publish path (so through the
fan-out to every instance). Every instance watches `{prefix}/+/lifecycle` itself, so it
learns of every session that ends even with no subscriber of its own, and ends its
subscriptions inside that session's topics (`Broker.end_subscriptions`).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import structlog
import trio
from attrs import define, field

from mqbroker.config import Config, SessionsConfig, plugin_settings
from mqbroker.fanout import FanoutUnavailable
from mqbroker.history import HistoryUnavailable
from mqbroker.message import Draft, Message
from mqbroker.plugins import PluginError, load_plugin
from mqbroker.protocol import (
    Error,
    ErrorCode,
    ServerEvent,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionRequest,
    SessionTouch,
    SessionUpdate,
)
from mqbroker.protocol.codec import fitting
from mqbroker.registry import (
    CHANGES,
    ENDING,
    BadRequest,
    Caller,
    Forbidden,
    Lifecycle,
    Rules,
    bad_request,
    error_reply,
    lifecycle_of_state,
    lifecycle_payload,
    record_map,
    scope,
)
from mqbroker.server.publishing import OrderedQueue
from mqbroker.sessions import (
    SessionError,
    SessionNotFound,
    SessionRecord,
    SessionState,
    SessionStore,
    new_session_id,
)

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.registry")

#: The reason `ended` gives for subscriptions ended with their application session.
SESSION_ENDED = "session_ended"
#: Registry requests of one connection that may wait before its reader waits too.
MAX_QUEUED_REQUESTS = 64
#: Reaper rounds without an answer remembered at most (see Registry._recover_lost_reaps): a
#: store down for longer than this many rounds has expired nothing meanwhile.
MAX_LOST_REAPS = 1000
#: Counters the registry adds to the broker's stats.
COUNTERS = ("registry_requests", "registry_expired", "registry_purged",
            "registry_store_failures", "registry_lifecycle_failures")


@define(eq=False)
class Registry:
    """The registry of one broker instance: its store, and what it does around each call."""

    store: SessionStore
    broker: Broker
    rules: Rules
    #: Records per state, as `counts()` last said (refreshed by the reaper, not per scrape).
    counts: Mapping[SessionState, int] = field(factory=lambda: dict.fromkeys(SessionState, 0))
    #: The times of reaper rounds whose answer never came: the store may have expired
    #: sessions then that nobody was told about (see `_recover_lost_reaps`).
    _lost_reaps: list[float] = field(factory=list)
    #: Reaper rounds whose `expired` events are not yet published, with their time: a round
    #: a shutdown interrupts is told on the way out (`tell_reaped`), not lost.
    _untold: collections.deque[tuple[float, Sequence[SessionRecord]]] = field(
        factory=collections.deque)
    _unwatch: trio.MemorySendChannel[list[str]] = field(init=False)
    _to_unwatch: trio.MemoryReceiveChannel[list[str]] = field(init=False)

    def __attrs_post_init__(self) -> None:
        # Unbounded: each item is subscriptions already removed (bounded by how many exist).
        self._unwatch, self._to_unwatch = trio.open_memory_channel(math.inf)
        for name in COUNTERS:
            self.broker.counters.setdefault(name, 0)

    @property
    def config(self) -> SessionsConfig:
        return self.rules.config

    # --- requests --------------------------------------------------------------------------

    async def answer(self, caller: Caller, request: SessionRequest) -> ServerEvent:
        """Carry out one request for `caller`; its reply or error (never raises)."""
        self.broker.counters["registry_requests"] += 1
        try:
            user = scope(caller, request)
            # A change is shielded from a cancel from outside (its connection closing in a
            # shutdown, say): once the store has carried it out, its lifecycle event must go
            # out, or other instances never learn it. Bounded all the same: each store call,
            # forget and publish inside keeps its own request_timeout.
            with trio.CancelScope(shield=isinstance(request, CHANGES)):
                reply = await self._carry_out(request, user)
            return reply
        except BadRequest as e:
            return bad_request(request, e)
        except Forbidden as e:
            return error_reply(request, ErrorCode.FORBIDDEN, str(e))
        except SessionError as e:
            if e.code == ErrorCode.UNAVAILABLE:
                self._store_failed(request.OP, e)
            return error_reply(request, e.code, f"{request.OP}: {e}")
        except trio.TooSlowError:
            return self._timed_out(request)

    def _timed_out(self, request: SessionRequest) -> Error:
        timeout = self.config.request_timeout
        self._store_failed(request.OP, f"no answer within request_timeout ({timeout:g} s)")
        if isinstance(request, CHANGES):
            return error_reply(request, ErrorCode.OUTCOME_UNKNOWN,
                               f"{request.OP}: the session store did not answer within "
                               f"{timeout:g} s: the change may or may not have been made")
        return error_reply(request, ErrorCode.UNAVAILABLE,
                           f"{request.OP}: the session store did not answer within {timeout:g} s")

    def _store_failed(self, op: str, error: object) -> None:
        self.broker.counters["registry_store_failures"] += 1
        logger.warning("registry.store_failed", op=op, error=str(error))

    async def _carry_out(self, request: SessionRequest, user: str | None) -> ServerEvent:
        kind = type(request)
        if kind is SessionCreate:
            assert isinstance(request, SessionCreate)
            return await self._create(request, _known(user))
        if kind is SessionGet:
            assert isinstance(request, SessionGet)
            ids = self.rules.ids(request.sessions)
            with self._bounded():
                found = await self.store.get(ids, user)
            return _reply(request, found)
        if kind is SessionTouch:
            assert isinstance(request, SessionTouch)
            ids, ttl = self.rules.ids(request.sessions), self.rules.ttl(request.ttl)
            with self._bounded():
                touched = await self.store.touch(ids, user, time.time(), ttl)
            return _reply(request, touched)
        if kind is SessionUpdate:
            assert isinstance(request, SessionUpdate)
            return await self._update(request, user)
        if kind is SessionDelete:
            assert isinstance(request, SessionDelete)
            return await self._delete(request, user)
        assert isinstance(request, SessionList)
        return await self._list(request, user)

    def _bounded(self) -> AbstractContextManager[trio.CancelScope]:
        return trio.fail_after(self.config.request_timeout)

    async def _create(self, request: SessionCreate, user: str) -> SessionReply:
        rules = self.rules
        session_id = (new_session_id() if request.session is None
                      else rules.id(request.session))
        ttl = rules.ttl(request.ttl) or self.config.default_ttl
        state = rules.creatable(request.state)
        metadata = rules.metadata(request.metadata) or {}
        now = time.time()
        record = SessionRecord(id=session_id, user=user, state=state, created=now, updated=now,
                               expires=now + ttl, ttl=ttl, metadata=metadata)
        with self._bounded():
            await self.store.create(record)
        await self.publish_lifecycle([(Lifecycle.CREATED, record)], now)
        return _reply(request, [record])

    async def _update(self, request: SessionUpdate, user: str | None) -> SessionReply:
        rules = self.rules
        session_id = rules.id(request.session)
        state = rules.settable(request.state)
        metadata = rules.metadata(request.metadata)
        if state is None and metadata is None:
            raise BadRequest("give `state` or `metadata` (or both)")
        now = time.time()
        with self._bounded():
            record = await self.store.change(
                session_id, user, now, state=state, metadata=metadata,
                expect_version=request.version, retain=self.config.retain_ended)
        if state is not None:
            await self.publish_lifecycle([(lifecycle_of_state(state), record)], now)
        return _reply(request, [record])

    async def _delete(self, request: SessionDelete, user: str | None) -> SessionReply:
        session_id = self.rules.id(request.session)
        with self._bounded():
            record = await self.store.delete(session_id, user)
        if record is None:
            raise SessionNotFound(f"no session {session_id!r}")
        await self.publish_lifecycle([(Lifecycle.DELETED, record)], time.time())
        return _reply(request, [record])

    async def _list(self, request: SessionList, user: str | None) -> SessionReply:
        rules = self.rules
        state = rules.listable(request.state)
        after = None if request.after is None else rules.id(request.after, "after")
        limit = rules.limit(request.limit)
        with self._bounded():
            page = await self.store.list(user=user, state=state, after=after, limit=limit)
        records, next_id = _within_frame(page.records, page.next,
                                         self.broker.max_message_bytes // 2)
        return SessionReply(id=request.id, ref=request.OP,
                            sessions=tuple(record_map(r) for r in records), next=next_id)

    # --- lifecycle events ------------------------------------------------------------------

    async def publish_lifecycle(self, events: Sequence[tuple[Lifecycle, SessionRecord]],
                                now: float) -> None:
        """Publish lifecycle events (one batch); for ending ones, forget the session's history
        first, and publish their event unrecorded: nothing of the session is kept. A failure
        is logged and counted: the store's change stands."""
        broker, topics = self.broker, self.broker.session_topics
        drafts: list[Draft] = []
        for event, record in events:
            topic = topics.lifecycle(record.id)
            ending = event in ENDING
            if ending:
                await self._forget(record.id)
            drafts.append(Draft(
                topic=topic, published_at=now,
                payload=lifecycle_payload(event, record, now=now, instance=broker.instance_id),
                record=not ending and broker.recorded.matches_any(topic)))
        try:
            # Shielded: a publish a cancel cut short may be carried out still (the Redis
            # fan-out's writer finishes it), so it is finished here, never told again by
            # `tell_reaped`. Bounded under the memory fan-out too: it waits on its history's
            # appends (a Redis history, say), one publish after another.
            with trio.CancelScope(shield=True), self._bounded():
                await broker.announce(drafts)
        except (FanoutUnavailable, trio.TooSlowError) as e:
            broker.counters["registry_lifecycle_failures"] += len(drafts)
            logger.warning("registry.lifecycle_failed", events=len(drafts),
                           error=str(e) or type(e).__name__)

    async def _forget(self, session_id: str) -> None:
        try:
            with self._bounded():
                await self.broker.history.forget(self.broker.session_topics.everything(session_id))
        except (HistoryUnavailable, trio.TooSlowError) as e:
            logger.warning("registry.forget_failed", session=session_id,
                           error=str(e) or type(e).__name__)

    def observe(self, messages: Sequence[Message]) -> None:
        """The broker's observer: an ending lifecycle event ends this instance's subscriptions
        inside that session's topics, after the event itself was delivered."""
        topics = self.broker.session_topics
        unwatch: list[str] = []
        for message in messages:
            session_id = topics.session_of_lifecycle(message.topic)
            if session_id is None:
                continue
            payload = message.payload
            if isinstance(payload, dict) and payload.get("event") in ENDING:
                unwatch += self.broker.end_subscriptions(session_id, SESSION_ENDED)
        if unwatch:
            self._unwatch.send_nowait(unwatch)

    async def _unwatching(self) -> None:
        async for filters in self._to_unwatch:
            await self.broker.unwatch(filters)

    # --- the reaper ------------------------------------------------------------------------

    async def run_reaper(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Every reap_interval: expire and purge at most reap_batch sessions (each instance
        runs one; the store reaps each session on exactly one), then refresh the counts."""
        await self._refresh_counts()
        task_status.started()
        while True:
            await trio.sleep(self.config.reap_interval)
            await self.reap()

    async def reap(self) -> None:
        """One round of the reaper (what `run_reaper` does every reap_interval)."""
        config = self.config
        now = time.time()
        try:
            # Shielded (and bounded by request_timeout): a reap the store may have carried out
            # is one whose events a shutdown must not drop; it waits for the answer instead.
            with trio.CancelScope(shield=True), self._bounded():
                reaped = await self.store.reap(now, config.reap_batch, config.retain_ended)
        except (SessionError, trio.TooSlowError) as e:
            self._store_failed("reap", e if str(e) else "no answer within request_timeout")
            if len(self._lost_reaps) < MAX_LOST_REAPS:
                self._lost_reaps.append(now)
            return
        if reaped.expired or reaped.purged:
            counters = self.broker.counters
            counters["registry_expired"] += len(reaped.expired)
            counters["registry_purged"] += len(reaped.purged)
            logger.info("registry.reaped", expired=len(reaped.expired),
                        purged=len(reaped.purged))
        if reaped.expired:
            # Untold from the store's answer on, before anything a cancel can cut.
            self._untold.append((now, reaped.expired))
        if self._lost_reaps:
            await self._recover_lost_reaps(reaped.purged, now)
        await self.tell_reaped()
        await self._refresh_counts()

    async def tell_reaped(self) -> None:
        """Publish the `expired` events of reaper rounds not yet told: a round is told until
        its publish returns, so one a shutdown cancelled is told again on the way out
        (forgetting a history twice does no harm)."""
        while self._untold:
            now, expired = self._untold[0]
            await self.publish_lifecycle([(Lifecycle.EXPIRED, record) for record in expired],
                                         now)
            self._untold.popleft()

    async def _recover_lost_reaps(self, purged: Sequence[SessionRecord], now: float) -> None:
        """Tell what reaper rounds whose answer was lost may have done. A store that ran the
        reap and lost only the answer (a Redis reply cut, a SQL call past its deadline) expired
        sessions with `updated` equal to that round's `now`, exactly (the stores keep times
        exactly): find them among the expired sessions (and those purged since), publish their
        `expired` and end their subscriptions. Another instance's reaper never uses the same
        float time, so nothing is told twice."""
        lost = set(self._lost_reaps)
        found = [record for record in purged if record.updated in lost]
        after: str | None = None
        try:
            while True:
                with self._bounded():
                    page = await self.store.list(state=SessionState.EXPIRED, after=after,
                                                 limit=self.config.max_page)
                found.extend(record for record in page.records if record.updated in lost)
                if page.next is None:
                    break
                after = page.next
        except (SessionError, trio.TooSlowError) as e:
            self._store_failed("reap", e if str(e) else "no answer within request_timeout")
            return  # tried again at the next round
        self._lost_reaps.clear()
        if found:
            logger.warning("registry.lost_reap_recovered", expired=len(found))
            self.broker.counters["registry_expired"] += len(found)
            self._untold.append((now, found))  # told by the caller (see tell_reaped)

    async def _refresh_counts(self) -> None:
        try:
            with self._bounded():
                self.counts = dict(await self.store.counts())
        except (SessionError, trio.TooSlowError) as e:
            self._store_failed("counts", e if str(e) else "no answer within request_timeout")


def _known(user: str | None) -> str:
    # `scope` answers None (every user) only for session_list.
    assert user is not None
    return user


def _reply(request: SessionRequest, records: Sequence[SessionRecord | None]) -> SessionReply:
    return SessionReply(id=request.id, ref=request.OP,
                        sessions=tuple(None if r is None else record_map(r) for r in records))


def _within_frame(records: Sequence[SessionRecord], next_id: str | None, budget: int
                  ) -> tuple[Sequence[SessionRecord], str | None]:
    """The first records of a page that fit in `budget` bytes (at least one), and the `next`
    that resumes after them: a page of large metadata is cut, not sent over a frame's size."""
    count = fitting([record_map(record) for record in records], budget)
    if count < len(records):
        return records[:count], records[count - 1].id
    return records, next_id


class RequestQueue(OrderedQueue[SessionRequest]):
    """One connection's registry requests, answered one at a time in order by one task."""

    def __init__(self) -> None:
        super().__init__(MAX_QUEUED_REQUESTS)

    async def run(self, answer: Callable[[SessionRequest], Awaitable[None]],
                  idle: Callable[[], None]) -> None:
        """Answer queued requests in order; `idle` (the connection's flush) runs whenever none
        is left waiting, so that pipelined answers go out together, not one write each."""
        async for request in self._receive:
            await answer(request)
            self._finished(1)
            if not self._receive.statistics().current_buffer_used:
                idle()


@asynccontextmanager
async def open_registry(broker: Broker, config: Config) -> AsyncIterator[Registry]:
    """Open `[sessions] plugin`'s session store and serve the registry on `broker` (its
    reaper, its watch of every lifecycle topic) until closed."""
    plugin = load_plugin(config.sessions.plugin)
    if plugin.open_sessions is None:
        raise PluginError(f"plugin {plugin.name!r} provides no session store")
    settings = plugin_settings(config, plugin)
    async with plugin.open_sessions(settings, config.sessions) as store:
        registry = Registry(store=store, broker=broker, rules=Rules(config.sessions))
        await broker.fanout.watch(broker.session_topics.every_lifecycle)
        broker.observers.append(registry.observe)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry._unwatching)
                await nursery.start(registry.run_reaper)
                broker.registry = registry
                try:
                    yield registry
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # The reaper has stopped: what its last round carried out and a cancel kept
            # untold is told now, before the fan-out closes, bounded as a shutdown is.
            try:
                with trio.move_on_after(config.server.shutdown_grace, shield=True):
                    await registry.tell_reaped()
            finally:
                broker.registry = None
                broker.observers.remove(registry.observe)
