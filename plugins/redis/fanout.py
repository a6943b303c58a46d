"""The Redis fan-out: Redis pub/sub carries each message to every instance that watches it.

One channel per topic; exact filters SUBSCRIBE it, wildcard filters PSUBSCRIBE a glob and the
`CopyFilter` keeps one copy per publish. A publish runs the publish script, which records,
de-duplicates and PUBLISHes a whole batch atomically; this instance's own sessions receive
their messages back through pub/sub like every other instance's (one delivery path).
When Redis goes away the fan-out stays: health turns degraded, publishes fail (or wait up
to `publish_timeout`), the receiver reconnects with backoff, re-subscribes, and refills each
watched exact recorded topic from its stream. docs/redis.md has the arguments.
"""

from __future__ import annotations

import collections
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

import structlog
import trio
from attrs import define, field

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext, FanoutUnavailable, Health
from mqbroker.history import HistoryUnavailable
from mqbroker.message import Draft, Message, Position
from mqbroker.redact import redact
from mqbroker.topics import is_wildcard

from .bridge import PubSubReceiver, RedisBridge, RedisOutcomeUnknown, RedisUnavailable
from .channels import (
    Arrived,
    Confirmed,
    Connected,
    CopyFilter,
    Disconnected,
    KeyLayout,
    Received,
    Refilled,
    Subscription,
)
from .history import RedisHistory
from .scripts import (
    Outbound,
    PublishCall,
    StreamBounds,
    decode_published,
    read_args,
    replay_of,
)
from .settings import RedisSettings
from .writer import ScriptWriter

_log = structlog.get_logger("mqbroker.fanout")

#: What this instance publishes to its own channel: a wake-up for the pub/sub thread, and
#: probes (followed by their number).
WAKE = b"w"
PROBE = b"p"
#: Topics read per pipeline when refilling after a reconnection.
REFILL_CHUNK = 500
FIRST_PUBLISH_RETRY = 0.05
#: How long shutdown waits for the wake-up that ends the pub/sub thread's read.
CLOSE_GRACE = 1.0


@define
class Tracked:
    """A watched exact topic that Redis records: where a refill resumes it after an outage."""

    #: The newest recorded position delivered here.
    delivered: Position | None = None
    #: The topic's newest position when the watch began (None: read all that is retained).
    baseline: Position | None = None
    #: Redis' epoch when the watch began on a topic with nothing recorded yet (no counter):
    #: a refill then reads all that is retained, and only a new epoch means a possible loss.
    empty_in: str | None = None

    @property
    def since(self) -> Position | None:
        return self.delivered if self.delivered is not None else self.baseline

    def is_new(self, position: Position) -> bool:
        """Whether `position` is past what was delivered; if so, it is now the newest."""
        last = self.delivered
        if last is not None and last.epoch == position.epoch and position.offset <= last.offset:
            return False
        self.delivered = position
        return True


@define(eq=False, kw_only=True)
class RedisFanout:
    """The `Fanout` over Redis pub/sub. Open it with `open_redis_fanout`."""

    local: ClassVar[bool] = False

    settings: RedisSettings
    context: FanoutContext
    bridge: RedisBridge
    layout: KeyLayout
    writer: ScriptWriter
    receiver: PubSubReceiver
    #: The store Redis records into as it publishes (the history is a RedisHistory on this
    #: Redis); None when another store records, before the publish.
    records_into: RedisHistory | None
    _copies: CopyFilter = field(factory=CopyFilter)
    _watches: dict[Subscription, int] = field(factory=dict)
    #: The broker's filters as watched (several may share one Subscription), counted: what an
    #: interruption is reported for.
    _filters: collections.Counter[str] = field(factory=collections.Counter)
    _tracked: dict[str, Tracked] = field(factory=dict)
    _connected: bool = False
    _reason: str = "connecting to redis"
    _probe_lost: bool = False
    _reported_ok: bool = True
    _probe: bytes = b""
    _probe_returned: trio.Event = field(factory=trio.Event)
    #: Set when the pub/sub thread has unsubscriptions to send and no one waits for them (an
    #: unwatch): `run_waker` wakes it, one PUBLISH for any number of them.
    _wake_wanted: trio.Event = field(factory=trio.Event)
    # Replaced after every batch from the pub/sub thread: wait on it to see the next one.
    _changed: trio.Event = field(factory=trio.Event)
    _counts: collections.Counter[str] = field(factory=collections.Counter)

    @classmethod
    def create(
        cls, settings: RedisSettings, context: FanoutContext, bridge: RedisBridge
    ) -> RedisFanout:
        layout = KeyLayout(settings.key_prefix)
        history = context.history
        records_into = None
        if isinstance(history, RedisHistory) and history.settings.same_redis(settings):
            records_into = history
        # A fan-out that records nothing never sends its bounds: any valid ones do.
        bounds = records_into.bounds if records_into else StreamBounds.of(HistoryConfig(), 1)
        call = PublishCall(
            layout=layout,
            bounds=bounds,
            dedup_ms=round(context.dedup_window * 1000),
            publish=True,
            record="flagged" if records_into else "none",
        )
        return cls(
            settings=settings,
            context=context,
            bridge=bridge,
            layout=layout,
            writer=ScriptWriter(bridge, call),
            receiver=bridge.receiver(layout.instance_channel(context.instance_id)),
            records_into=records_into,
        )

    # --- Fanout -------------------------------------------------------------------------

    async def publish(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        if not drafts:
            return []
        batch = await self._outbound(drafts)
        messages = await self._write(batch)
        self._counts["published"] += len(messages)
        return messages

    async def watch(self, filter: str) -> None:
        subscription = self.layout.subscription_for(filter)
        self._check_connected()
        count = self._watches.get(subscription, 0)
        self._watches[subscription] = count + 1
        self._filters[filter] += 1
        try:
            if count == 0:
                self.receiver.want(subscription, True)
                await self._wake()
            await self._until_live(subscription)
        except BaseException:
            self._release(filter, subscription)
            raise
        if count == 0 and self._tracks(filter):
            await self._track(filter)

    async def unwatch(self, filter: str) -> None:
        subscription = self.layout.subscription_for(filter)
        if subscription in self._watches:
            self._release(filter, subscription)

    def health(self) -> Health:
        if not self._connected:
            return Health(ok=False, detail=f"redis unreachable: {self._reason}")
        if self._probe_lost:
            return Health(ok=False, detail="a pub/sub probe was lost; reconnecting")
        return Health(ok=True)

    #: The stats that are levels (gauges), not totals.
    STAT_GAUGES: ClassVar[frozenset[str]] = frozenset({"watches", "tracked_topics"})

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "batches": self.writer.calls,
            "duplicates": self.writer.duplicates,
            "pubsub_received": self.receiver.received,
            "connections": self.receiver.connections,
            "watches": len(self._watches),
            "tracked_topics": len(self._tracked),
        }

    # --- publishing ---------------------------------------------------------------------

    async def _outbound(self, drafts: Sequence[Draft]) -> list[Outbound]:
        if self.records_into is not None or not any(draft.record for draft in drafts):
            return [Outbound.of(draft) for draft in drafts]
        # Another store records: it positions the recorded drafts before they are published,
        # so the history never misses a message that a subscriber saw (GUIDE section 6).
        try:
            recorded = await self.context.history.append([d for d in drafts if d.record])
        except HistoryUnavailable as error:
            raise FanoutUnavailable(f"the history store failed: {error}") from error
        positions = iter(message.position for message in recorded)
        return [Outbound.of(d, next(positions) if d.record else None) for d in drafts]

    async def _write(self, batch: Sequence[Outbound]) -> Sequence[Message]:
        """Write the batch. While Redis is unreachable, retry until publish_timeout: each retry
        waits for a backoff and for this instance's pub/sub to be back, so that the retried
        message also reaches this instance's own watchers."""
        deadline = trio.current_time() + self.settings.publish_timeout
        delay = FIRST_PUBLISH_RETRY
        while True:
            try:
                return await self.writer.write(batch)
            except RedisOutcomeUnknown:
                self._counts["publish_failures"] += 1
                self._counts["outcomes_unknown"] += 1
                # A retry of a batch that may have run publishes it twice, unless every draft
                # carries a msg_id: then dedup answers the retry with the original message.
                if trio.current_time() >= deadline or not self._retry_is_idempotent(batch):
                    raise
            except RedisUnavailable:
                self._counts["publish_failures"] += 1
                if trio.current_time() >= deadline:
                    raise
            with trio.move_on_at(deadline):
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                while not self._connected:
                    await self._changed.wait()
            delay = min(delay * 2, self.settings.reconnect_max_delay)

    def _retry_is_idempotent(self, batch: Sequence[Outbound]) -> bool:
        return self.context.dedup_window > 0 and all(o.draft.msg_id for o in batch)

    # --- watching -----------------------------------------------------------------------

    def _check_connected(self) -> None:
        if not self._connected:
            raise RedisUnavailable(f"redis unreachable: {self._reason}")

    async def _until_live(self, subscription: Subscription) -> None:
        """Return once Redis confirmed the subscription: from then on nothing is missed."""
        while not self._copies.is_live(subscription):
            self._check_connected()
            await self._changed.wait()

    def _release(self, filter: str, subscription: Subscription) -> None:
        self._filters[filter] -= 1
        if self._filters[filter] <= 0:
            del self._filters[filter]
        count = self._watches.pop(subscription) - 1
        if count > 0:
            self._watches[subscription] = count
            return
        if filter not in self._filters:
            self._tracked.pop(filter, None)
        self.receiver.want(subscription, False)
        # In the background: a session closing must not wait on Redis (hung, it would wait
        # socket_timeout); nothing depends on the unsubscription being sent at once.
        self._wake_wanted.set()

    def _tracks(self, filter: str) -> bool:
        history = self.records_into
        return (
            history is not None and not is_wildcard(filter) and history.recorded.matches_any(filter)
        )

    async def _track(self, topic: str) -> None:
        """Note the topic's newest position, where a refill would start if Redis went away
        before anything was delivered on it."""
        tracked = self._tracked[topic] = Tracked()
        keys = (self.layout.epoch_key, self.layout.counter_key(topic))
        try:
            epoch, counter = await self.bridge.command("MGET", *keys)
        except RedisUnavailable:
            return  # a refill then reads all that is retained: a repeat, not a loss
        if epoch is None:
            return
        if counter is None:
            # No offset to start after: offsets of a new counter start at Redis' clock, so a
            # baseline of 0 would read as a hole (TRIMMED) where nothing was lost.
            tracked.empty_in = epoch.decode()
        else:
            tracked.baseline = Position(epoch.decode(), int(counter))

    async def run_waker(self) -> None:
        """Wake the pub/sub thread whenever an unwatch wants it (see `_release`)."""
        while True:
            await self._wake_wanted.wait()
            self._wake_wanted = trio.Event()
            await self._wake()

    async def _wake(self) -> None:
        """Wake the pub/sub thread so it sends queued (un)subscriptions now."""
        try:
            await self.bridge.command("PUBLISH", self.receiver.home, WAKE)
        except RedisUnavailable:
            pass  # the thread is reconnecting, and re-subscribes everything wanted when back

    # --- receiving (the pub/sub thread calls these) -------------------------------------

    async def run_receiver(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the pub/sub thread; started once its first connection attempt is known."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_on_thread)
            while not self._counts["connection_changes"]:
                await self._changed.wait()
            task_status.started()

    async def _receive_on_thread(self) -> None:
        await trio.to_thread.run_sync(
            self.receiver.run, self._hand_over, self._refill, limiter=trio.CapacityLimiter(1)
        )

    def _hand_over(self, items: list[Received]) -> None:
        trio.from_thread.run_sync(self._take, items)

    def _take(self, items: list[Received]) -> None:
        """Apply one batch from the pub/sub thread, in the order Redis sent it (trio thread)."""
        deliveries: list[Message] = []
        for item in items:
            if type(item) is Arrived:
                self._arrived(item, deliveries)
            elif isinstance(item, Confirmed):
                self._copies.confirm(item)
            elif isinstance(item, Refilled):
                self._interrupted(item.incomplete, deliveries, "the refill was incomplete")
                self._refilled(item, deliveries)
            elif isinstance(item, Connected | Disconnected):
                if isinstance(item, Disconnected) and self._connected:
                    self._interrupted(self._untracked_filters(), deliveries, item.reason)
                self._connection_changed(item)
        self._deliver(deliveries)
        self._changed.set()
        self._changed = trio.Event()

    def _deliver(self, deliveries: list[Message]) -> None:
        if deliveries:
            self._counts["delivered"] += len(deliveries)
            self.context.deliver(deliveries)
            deliveries.clear()

    def _interrupted(self, filters: Sequence[str], deliveries: list[Message], why: str) -> None:
        """Tell the broker these filters may have missed messages: after what was delivered
        before the interruption, before anything delivered after it (issue 9, item 1)."""
        if not filters:
            return
        self._deliver(deliveries)
        self._counts["interruptions"] += 1
        self._counts["interrupted_filters"] += len(filters)
        _log.warning("fanout.interrupted", url=self.settings.url, filters=len(filters),
                     reason=why)
        self.context.interrupted(filters)

    def _untracked_filters(self) -> list[str]:
        """The watched filters a refill does not cover: wildcards and unrecorded topics. The
        pub/sub connection is gone, so what was published to them meanwhile is lost here."""
        return [filter for filter in self._filters if filter not in self._tracked]

    def _arrived(self, item: Arrived, deliveries: list[Message]) -> None:
        if item.channel == self.receiver.home:
            self._home_message(item.data)
        elif not self._copies.keep(item.channel, item.pattern):
            self._counts["copies_dropped"] += 1
        else:
            try:
                carried = decode_published(item.data)
            except ValueError:
                self._counts["malformed"] += 1
                return
            deliveries += [m for m, recorded in carried if not recorded or self._is_new(m)]

    def _refilled(self, item: Refilled, deliveries: list[Message]) -> None:
        fresh = [message for message in item.messages if self._is_new(message)]
        self._counts["refilled"] += len(fresh)
        deliveries += fresh

    def _is_new(self, message: Message) -> bool:
        tracked = self._tracked.get(message.topic)
        return tracked is None or tracked.is_new(message.position)

    def _connection_changed(self, item: Connected | Disconnected) -> None:
        self._copies.reset()
        self._counts["connection_changes"] += 1
        self._connected = isinstance(item, Connected)
        if isinstance(item, Disconnected):
            self._reason = item.reason
        else:
            self._probe_lost = False
        self._report_health()

    def _refill(self) -> list[Received]:
        """On the pub/sub thread, once re-subscribed: what each tracked topic missed."""
        if self.records_into is None:
            return []
        bounds = self.records_into.bounds
        plan = trio.from_thread.run_sync(self._refill_plan)
        messages: list[Message] = []
        incomplete: list[str] = []
        for start in range(0, len(plan), REFILL_CHUNK):
            chunk = plan[start : start + REFILL_CHUNK]
            calls = [read_args(self.layout, topic, since) for topic, since, _ in chunk]
            replies = self.bridge.scripts_sync("read", calls)
            for (topic, since, empty_in), reply in zip(chunk, replies, strict=True):
                replay = replay_of(reply, since, bounds)
                messages += replay.messages
                # Read from the start of a topic empty at the watch: complete unless Redis
                # has another epoch since (it lost its data, and maybe messages with it).
                new_epoch = empty_in is not None and reply[0].decode() != empty_in
                if not replay.recovered or new_epoch:
                    incomplete.append(topic)
        return [Refilled(messages, incomplete)] if messages or incomplete else []

    def _refill_plan(self) -> list[tuple[str, Position | None, str | None]]:
        """(topic, where to read after, the epoch it was empty in if it was read from its
        start) for every tracked topic."""
        return [(topic, tracked.since, tracked.empty_in if tracked.since is None else None)
                for topic, tracked in self._tracked.items()]

    # --- health -------------------------------------------------------------------------

    async def run_probes(self) -> None:
        """Every probe_interval, round-trip a probe through pub/sub."""
        while True:
            await trio.sleep(self.settings.probe_interval)
            await self.probe()

    async def probe(self) -> bool:
        """Publish a probe to this instance's channel and wait (up to probe_interval) for it.

        Pub/sub can lose messages while the connection looks fine (centrifugo's health stayed
        green through it); a lost probe turns health degraded and forces a reconnection,
        which re-subscribes and refills.
        """
        self._counts["probes_sent"] += 1
        self._probe = PROBE + str(self._counts["probes_sent"]).encode()
        self._probe_returned = returned = trio.Event()
        with trio.move_on_after(self.settings.probe_interval):
            try:
                await self.bridge.command("PUBLISH", self.receiver.home, self._probe)
            except RedisUnavailable:
                return False  # not a lost probe: the receiver reports the outage itself
            await returned.wait()
        if returned.is_set():
            self._counts["probes_returned"] += 1
            self._probe_lost = False
        else:
            self._counts["probes_lost"] += 1
            if self._connected:
                self._probe_lost = True
                self.receiver.request_reconnect()
        self._report_health()
        return returned.is_set()

    def _home_message(self, data: bytes) -> None:
        if data == self._probe:
            self._probe_returned.set()

    def _report_health(self) -> None:
        health = self.health()
        if health.ok == self._reported_ok:
            return
        self._reported_ok = health.ok
        if health.ok:
            _log.info("fanout.recovered", url=redact(self.settings.url))
        else:
            _log.warning("fanout.degraded", url=redact(self.settings.url),
                         reason=redact(health.detail))


@asynccontextmanager
async def open_redis_fanout(
    settings: RedisSettings | None, context: FanoutContext
) -> AsyncIterator[RedisFanout]:
    """A RedisFanout with its writer, pub/sub thread and probes running.

    It opens with Redis down too (health degraded, publish and watch raise FanoutUnavailable
    until Redis is back). On exit the pub/sub thread is woken and joined.
    """
    settings = settings if settings is not None else RedisSettings()
    bridge = RedisBridge.open(settings)
    fanout = RedisFanout.create(settings, context, bridge)
    if fanout.records_into is not None:
        fanout.records_into.attach(fanout.writer)
    try:
        with contextlib.suppress(RedisUnavailable):  # health reports it; NOSCRIPT reloads later
            await bridge.load_scripts()
        async with trio.open_nursery() as nursery:
            await nursery.start(fanout.writer.serve)
            await nursery.start(fanout.run_receiver)
            nursery.start_soon(fanout.run_probes)
            nursery.start_soon(fanout.run_waker)
            try:
                yield fanout
            finally:
                fanout.receiver.stop()
                with trio.move_on_after(CLOSE_GRACE, shield=True):
                    await fanout._wake()
                nursery.cancel_scope.cancel()
    finally:
        if fanout.records_into is not None:
            fanout.records_into.detach(fanout.writer)
        bridge.close()
