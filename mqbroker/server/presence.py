"""Presence, served: keeps the presence store told which connections of this instance are
present in which application sessions, and publishes their join and leave events.

The connections' paths never wait on the store: a subscribe, an unsubscribe or a close only
marks the pure `PresenceTracker` (mqbroker.presence) and wakes the one task that does all the
store I/O (`PresenceService.run`). That task, in turn:
- writes what changed, in batches of at most ANNOUNCE_BATCH keys (changes coalesce while it
  writes: churn costs one key, never a queue), then publishes a join or leave event per change
  on `{topic_prefix}/{id}/presence`, through the broker's one publish path;
- announces again every entry of this instance every `presence_ttl / 3`, in batches, so that
  they outlive `presence_ttl` only while this instance lives;
- reaps, every `reap_interval`, at most `reap_batch` entries that ran out (those of dead
  instances, whatever instance reaps them: the store reports each entry to one reaper) and
  publishes their leave events, reason `expired`.
docs/sessions.md ("Presence") is the user's description.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import trio
from attrs import define, field

from mqbroker.config import Config, SessionsConfig, plugin_settings
from mqbroker.fanout import FanoutUnavailable
from mqbroker.message import Draft
from mqbroker.plugins import PluginError, load_plugin
from mqbroker.presence import (
    Change,
    Holder,
    LeaveReason,
    PresenceTracker,
    event_payload,
)
from mqbroker.sessions import PresenceEntry, PresenceStore, StoreUnavailable

if TYPE_CHECKING:
    from mqbroker.broker import Broker, Session

logger = structlog.get_logger("mqbroker.presence")

#: The most entries one store call carries (announce, withdraw, re-announce): the work one
#: round may ask of the store, whatever a client subscribes to.
ANNOUNCE_BATCH = 500
#: The longest wait before a write the store refused is tried again.
RETRY_DELAY = 1.0
COUNTERS = ("joins", "leaves", "expired", "store_errors", "events_unpublished")
#: What a store call that failed raises: the store's word for it, or our deadline.
UNREACHABLE = (StoreUnavailable, trio.TooSlowError)


@define(eq=False)
class PresenceService:
    """The `PresenceTracking` of mqbroker.broker, over a `PresenceStore`."""

    #: Levels, not totals, among `stats()` (the broker exports them as gauges).
    STAT_GAUGES: ClassVar[frozenset[str]] = frozenset({"announced", "pending"})

    broker: Broker
    store: PresenceStore
    config: SessionsConfig
    #: Unix seconds: what the stores compare entries' expiry with (every instance's clock).
    clock: Callable[[], float] = time.time
    tracker: PresenceTracker = field(init=False)
    counters: collections.Counter[str] = field(
        factory=lambda: collections.Counter(dict.fromkeys(COUNTERS, 0)))
    _wake: trio.Event = field(factory=trio.Event)
    #: Changes the store has (written, or reaped) whose events are not yet published, in
    #: order (see `_tell`).
    _untold: collections.deque[Sequence[Change]] = field(factory=collections.deque)
    #: The store is failing (logged once per outage).
    _failing: bool = False

    def __attrs_post_init__(self) -> None:
        self.tracker = PresenceTracker(self.config.topic_prefix)

    @property
    def instance(self) -> str:
        return self.broker.instance_id

    # --- what the broker calls (never blocks) ------------------------------------------------

    def subscribed(self, session: Session, filter: str) -> None:
        if self.tracker.subscribed(_holder(session), filter):
            self._wake.set()

    def unsubscribed(self, session: Session, filter: str,
                     reason: LeaveReason = LeaveReason.UNSUBSCRIBED) -> None:
        if self.tracker.unsubscribed(session.id, filter, reason):
            self._wake.set()

    def detached(self, session: Session, filters: Sequence[str]) -> None:
        if self.tracker.closed(session.id):
            self._wake.set()

    async def query(self, session_id: str) -> Sequence[PresenceEntry]:
        try:
            with self._bounded():
                return await self.store.query(session_id, self.clock())
        except trio.TooSlowError:
            raise StoreUnavailable("no answer within request_timeout") from None

    def stats(self) -> dict[str, int]:
        return {"announced": self.tracker.present, "pending": self.tracker.pending,
                **self.counters}

    # --- the one task that does the store's I/O ----------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        period = self.config.presence_ttl / 3
        next_refresh = next_reap = trio.current_time()
        next_refresh += period
        next_reap += self.config.reap_interval
        refreshing: collections.deque[tuple[str, Holder]] = collections.deque()
        task_status.started()
        while True:
            busy = self.tracker.pending or refreshing
            with trio.move_on_at(-math.inf if busy else min(next_refresh, next_reap)):
                await self._wake.wait()
            await trio.lowlevel.checkpoint()  # busy rounds, one after another, still yield
            self._wake = trio.Event()
            if self.tracker.pending and not await self._write(ANNOUNCE_BATCH):
                await trio.sleep(min(RETRY_DELAY, period))
            now = trio.current_time()
            if not refreshing and now >= next_refresh:
                refreshing.extend(self.tracker.announced())
                next_refresh = now + period
            if refreshing:
                await self._refresh(refreshing)
            if now >= next_reap:
                # A full batch: more may be waiting, so the next round comes at once.
                full = await self._reap()
                next_reap = now if full else now + self.config.reap_interval

    async def flush(self) -> None:
        """Publish what a cancel kept untold, then write every change pending (the leaves of
        a shutdown, say), stopping at a failure."""
        await self._tell()
        while self.tracker.pending and await self._write(ANNOUNCE_BATCH):
            pass

    async def _write(self, limit: int) -> bool:
        """Write at most `limit` changes, then publish their events; False if the store
        refused them (they are kept for the next try)."""
        changes = self.tracker.take(limit)
        if not changes:
            return True
        try:
            written = await self._store(changes)
        except BaseException:
            # Cancelled (a shutdown) while the store may or may not have taken them. Leaves
            # are given back, so that the flush on the way out withdraws them again (that
            # does no harm) and publishes them. Joins stay counted as announced: a connection
            # that closes is then withdrawn by the flush, whether the store has it or not.
            self.tracker.restore([c for c in changes if not c.joined])
            raise
        if not written:
            # The store may have carried them out all the same (a call past request_timeout
            # still runs on its own; StoreUnavailable says nothing is known to be done): a
            # join that leaves before it is written again is withdrawn, not left behind.
            self.tracker.restore(changes, maybe_written=True)
            return False
        self.counters["joins"] += sum(1 for c in changes if c.joined)
        self.counters["leaves"] += sum(1 for c in changes if not c.joined and not c.silent)
        self._untold.append(changes)
        await self._tell()
        return True

    async def _store(self, changes: Sequence[Change]) -> bool:
        """Tell the store `changes`; False if it did not answer."""
        leaves = [(c.session, self.instance, c.holder.connection) for c in changes
                  if not c.joined]
        expires = self.clock() + self.config.presence_ttl
        joins = [self._entry(c.session, c.holder, expires) for c in changes if c.joined]
        try:
            with self._bounded():
                if leaves:
                    await self.store.withdraw(leaves)
                if joins:
                    await self.store.announce(joins)
        except UNREACHABLE as e:
            self._failed(e)
            return False
        self._recovered()
        return True

    async def _refresh(self, refreshing: collections.deque[tuple[str, Holder]]) -> None:
        """Announce again the next batch of this round's entries (those still announced)."""
        expires = self.clock() + self.config.presence_ttl
        batch: list[PresenceEntry] = []
        while refreshing and len(batch) < ANNOUNCE_BATCH:
            session, holder = refreshing.popleft()
            if self.tracker.announces(session, holder.connection):
                batch.append(self._entry(session, holder, expires))
        if not batch:
            return
        try:
            with self._bounded():
                await self.store.announce(batch)
        except UNREACHABLE as e:
            self._failed(e)  # the rest of the round is tried; these again at the next round
            return
        self._recovered()

    async def _reap(self) -> bool:
        """Remove entries that ran out and publish their leaves; True for a full batch."""
        try:
            # Shielded (bounded by request_timeout): entries the store may have removed are
            # ones whose leaves a shutdown must not drop; it waits for the answer instead.
            with trio.CancelScope(shield=True), self._bounded():
                reaped = await self.store.reap(self.clock(), self.config.reap_batch)
        except UNREACHABLE as e:
            self._failed(e)
            return False
        self._recovered()
        changes: list[Change] = []
        for entry in reaped:
            # One of ours ran out (not announced again in time: the store was unreachable, or
            # this instance too slow): announced again, with a join, if it is still present.
            if entry.instance == self.instance and self.tracker.lost(entry.session,
                                                                     entry.connection):
                self._wake.set()
            holder = Holder(connection=entry.connection, client=entry.client,
                            principal=entry.principal)
            changes.append(Change(entry.session, holder, LeaveReason.EXPIRED, entry.instance))
        self.counters["expired"] += len(changes)
        self._untold.append(changes)
        await self._tell()
        return len(reaped) >= self.config.reap_batch

    async def _tell(self) -> None:
        """Publish the events of what the store has and no one was told, oldest first: a
        batch stays untold until its publish returns, so one a shutdown cancelled is told by
        the flush on the way out, before anything written after it."""
        while self._untold:
            await self._publish(self._untold[0])
            self._untold.popleft()

    async def _publish(self, changes: Sequence[Change]) -> None:
        changes = [c for c in changes if not c.silent]
        if not changes:
            return
        broker, now = self.broker, time.time()
        drafts = []
        for c in changes:
            topic = broker.session_topics.presence(c.session)
            payload = event_payload("join" if c.joined else "leave", c.session,
                                    c.instance or self.instance, c.holder, c.reason)
            drafts.append(Draft(topic=topic, payload=payload, published_at=now,
                                record=broker.recorded.matches_any(topic)))
        try:
            # Shielded, bounded all the same: a publish a cancel cut short may be carried out
            # still (the Redis fan-out's writer finishes it), so it is finished here, never
            # given back to the flush on the way out to be told a second time.
            with trio.CancelScope(shield=True), self._bounded():
                await broker.announce(drafts)
        except (FanoutUnavailable, trio.TooSlowError) as e:
            # The events are lost (the store, and so the `presence` query, is right anyway).
            self.counters["events_unpublished"] += len(drafts)
            logger.warning("presence.events_unpublished", count=len(drafts),
                           error=str(e) or type(e).__name__)

    def _entry(self, session: str, holder: Holder, expires: float) -> PresenceEntry:
        return PresenceEntry(session=session, instance=self.instance,
                             connection=holder.connection, client=holder.client,
                             principal=holder.principal, expires=expires)

    def _bounded(self) -> AbstractContextManager[trio.CancelScope]:
        """Every store call and publish: a store that does not answer is one that failed."""
        return trio.fail_after(self.config.request_timeout)

    def _failed(self, error: Exception) -> None:
        self.counters["store_errors"] += 1
        if not self._failing:
            self._failing = True
            logger.warning("presence.store_unavailable", error=str(error) or type(error).__name__)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("presence.store_available")


def _holder(session: Session) -> Holder:
    # The server's sessions (and mqbroker.testing's) have these; a bare Session may not.
    client: Any = getattr(session, "client_name", "")
    principal: Any = getattr(session, "principal_name", None)
    return Holder(connection=session.id, client=client, principal=principal)


@asynccontextmanager
async def open_presence(broker: Broker, config: Config, *,
                        clock: Callable[[], float] = time.time
                        ) -> AsyncIterator[PresenceService]:
    """Open `[sessions] plugin`'s presence store and serve presence for `broker` until the
    block ends; then write what is pending (the leaves of the connections closed by a
    shutdown), bounded by shutdown_grace."""
    plugin = load_plugin(config.sessions.plugin)
    if plugin.open_presence is None:
        raise PluginError(f"plugin {plugin.name!r} provides no presence store")
    settings = plugin_settings(config, plugin)
    async with plugin.open_presence(settings, config.sessions) as store:
        service = PresenceService(broker, store, config.sessions, clock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                broker.presence = service
                try:
                    yield service
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # The service's task has stopped, however the block ended (a cancel included).
            try:
                with trio.move_on_after(config.server.shutdown_grace, shield=True):
                    await service.flush()
            finally:
                broker.presence = None
