"""The broker node: routes between this instance's sessions, the fan-out and the history.

Every publish takes one path, single-instance too: validate, hand the batch to the fan-out
(which records it in the history first, where the topic is recorded), and every instance's
fan-out hands the messages back to `deliver`, which matches them against the subscription index
and queues one encoding of each message on every matching session.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import structlog
from attrs import define, field

from mqbroker.auth import Access, Authenticator, access_of
from mqbroker.config import BUILT_IN_AUTH_MODES, Config
from mqbroker.fanout import Fanout, FanoutContext, FanoutOutcomeUnknown, FanoutUnavailable
from mqbroker.history import Gap, HistoryStore, HistoryUnavailable, Replay
from mqbroker.index import SubscriptionIndex
from mqbroker.message import Draft, InvalidEventId, Message, Position
from mqbroker.plugins import PluginError, load_auth_plugin, load_plugin
from mqbroker.presence import LeaveReason, entry_map
from mqbroker.protocol import (
    CloseCode,
    EncodedMessage,
    Ended,
    Error,
    ErrorCode,
    Forget,
    Forgot,
    GapNotice,
    Latest,
    LatestAck,
    Presence,
    Present,
    PubAck,
    Publish,
    ServerEvent,
    SessionRequest,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
)
from mqbroker.protocol.codec import fitting, payload_size
from mqbroker.protocol.events import PROTOCOL_VERSION
from mqbroker.ratelimit import Rates
from mqbroker.registry import MAX_SESSION_BATCH, Caller, ScopedSubscriptions, SessionTopics
from mqbroker.resume import ReplaySwitch
from mqbroker.sessions import PresenceEntry, StoreUnavailable, check_session_id
from mqbroker.topics import (
    FilterSet,
    InvalidTopic,
    TopicLimits,
    is_wildcard,
    validate_filter,
    validate_topic,
)

logger = structlog.get_logger("mqbroker.broker")

#: Room kept in a frame for a delivery's envelope (subs, event id, time) around topic + payload.
ENVELOPE_BYTES = 1024
COUNTERS = ("sessions_opened", "sessions_closed", "published", "deliveries", "gaps",
            # Requests refused over a rate limit, sessions closed for it (4029), and
            # connections refused over connections_per_second_per_peer.
            "security_rate_limited", "security_violations_exceeded",
            "connections_rate_limited",
            *(f"sessions_closed_{code.name.lower()}" for code in CloseCode),
            "sessions_closed_other", "security_origin_refused", "security_metrics_refused",
            "tls_handshakes_failed",
            # Hellos refused for their credential (4003), requests refused as forbidden.
            "security_auth_failed", "security_forbidden",
            # Hellos whose authenticator (a plugin's) did not answer in time (1013), or failed
            # unexpectedly (1011).
            "security_auth_unavailable", "security_auth_errors",
            # Publishes refused on a topic reserved for the broker (lifecycle, presence), and
            # subscriptions ended because their application session ended.
            "reserved_topic_refused", "subscriptions_ended")
#: How many recently validated topic names are remembered (publishers repeat their topics).
VALID_TOPICS_CACHE = 10_000
#: How many events one frame may carry (the welcome says so as `max_frame_items`): it bounds
#: the work one frame can ask of the broker.
MAX_FRAME_ITEMS = 1000


class Session(Protocol):
    """An attached session, as the broker sees it (mqbroker.server.session.Session is the real
    one; tests/test_broker.py drives the broker with in-memory ones, no sockets).

    Nothing here blocks except `replay`, which waits on that session alone: the broker never
    waits on a session while routing.
    """

    @property
    def id(self) -> str: ...

    def __hash__(self) -> int: ...

    @property
    def close_code(self) -> int | None:
        """The code it closed (or is closing) with; None while it is open."""

    def deliver(self, message: EncodedMessage, subs: tuple[int, ...]) -> bool:
        """Queue a delivery; True when the session needs a `flush` that it did not need before."""

    def reply(self, event: ServerEvent) -> None:
        """Queue a reply to the session's own request (sent by its next `flush`)."""

    def signal(self, event: ServerEvent) -> None:
        """Queue an event in order with the deliveries (where `reply` would overtake them)."""

    def flush(self) -> None:
        """Hand what is queued to the connection now, without waiting for the peer."""

    def slow(self, droppable: bool = True) -> None:
        """A delivery did not fit: apply the session's slow-consumer policy (let it go with
        4008, or count the delivery as dropped and tell the client). `droppable=False`: let
        it go under either policy (a message of a replaying subscription: resuming loses
        nothing, dropping would lose what history still has)."""

    async def replay(self, message: EncodedMessage, sub: int) -> bool:
        """Queue a replayed delivery, waiting for room in this session's outbox; False when the
        session was let go meanwhile."""


class PresenceTracking(Protocol):
    """Presence (mqbroker.server.presence.PresenceService), as the broker sees it: told of
    every subscription added or removed, where the index changes (so that the two always
    agree), and asked the `presence` query. Nothing here but `query` may block."""

    def subscribed(self, session: Session, filter: str) -> None: ...

    def unsubscribed(self, session: Session, filter: str, reason: LeaveReason) -> None: ...

    def detached(self, session: Session, filters: Sequence[str]) -> None: ...

    async def query(self, session_id: str) -> Sequence[PresenceEntry]:
        """The entries of an application session; raises StoreUnavailable."""

    def stats(self) -> dict[str, int]: ...


class Registry(Protocol):
    """The session registry, as the broker and its sessions see it
    (mqbroker.server.registry.Registry is the real one)."""

    #: Records per state, as last counted (for /metrics).
    @property
    def counts(self) -> Mapping[Any, int]: ...

    async def answer(self, caller: Caller, request: SessionRequest) -> ServerEvent:
        """Carry out one registry request; its reply or error event (never raises)."""
        ...


@define(eq=False)
class Broker:
    instance_id: str
    config: Config
    history: HistoryStore
    fanout: Fanout = field(init=False)
    index: SubscriptionIndex[Session] = field(factory=SubscriptionIndex)
    sessions: set[Session] = field(factory=set)
    #: Sessions with subscriptions replaying history: subscription id -> its hold-back.
    _recovering: dict[Session, dict[int, ReplaySwitch]] = field(factory=dict)
    #: Every counter exists from the start, at 0, so that metrics can be scraped from the start.
    counters: collections.Counter[str] = field(factory=lambda: collections.Counter(
        dict.fromkeys(COUNTERS, 0)))
    recorded: FilterSet = field(init=False)
    topic_limits: TopicLimits = field(init=False)
    #: The scheme of an `[auth] mode` that is a plugin (open_broker opens it); None for the
    #: built-in modes.
    authenticator: Authenticator | None = None
    #: Who may open a session, what each may do and at what rate ([auth], [limits]).
    access: Access = field(init=False)
    #: Recently validated topic names -> their UTF-8 length (publishers repeat their topics).
    _valid_topics: dict[str, int] = field(factory=dict)
    #: Presence tracking and the `presence` query; None when not served (an embedded broker).
    presence: PresenceTracking | None = None
    #: The session registry (mqbroker.server.registry), once opened; sessions reach it here.
    registry: Registry | None = None
    #: The application sessions' topics, and the subscriptions inside each session's topics.
    session_topics: SessionTopics = field(init=False)
    scoped: ScopedSubscriptions[Session] = field(init=False)
    #: Called with every batch `deliver` gets, once the sessions got theirs (the registry
    #: ends subscriptions on lifecycle messages here). Must not block.
    observers: list[Callable[[Sequence[Message]], None]] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        server = self.config.server
        self.session_topics = SessionTopics(self.config.sessions.topic_prefix)
        self.scoped = ScopedSubscriptions(self.session_topics)
        if self.index.uncached is None:
            # The broker's own event topics (a join, a leave, a lifecycle change per session)
            # are published on once or twice: caching them would only push out the topics
            # published on again and again (and cost ~400 B per idle session).
            self.index.uncached = self.session_topics.reserved
        self.recorded = FilterSet(self.config.history.record)
        self.access = access_of(self.config, self.authenticator)
        self.topic_limits = TopicLimits(max_length=server.max_topic_length,
                                        max_levels=server.max_topic_levels)

    @property
    def max_message_bytes(self) -> int:
        return self.config.server.max_frame_bytes - ENVELOPE_BYTES

    def welcome(self, session_id: str, rates: Rates) -> Welcome:
        """The welcome of a session whose rate limits (its principal's) are `rates`."""
        return Welcome(version=PROTOCOL_VERSION, instance=self.instance_id, session=session_id,
                       limits=self.limits(rates))

    def limits(self, rates: Rates) -> dict[str, Any]:
        """The limits in force for a session, as the welcome tells them: the instance's, and
        the session's rate limits with bursts as applied (0 in the config: one second's
        worth), so that a client can pace itself; a rate of 0 is no limit."""
        s = self.config.server
        return {
            "max_frame_bytes": s.max_frame_bytes,
            "max_frame_items": MAX_FRAME_ITEMS,
            "max_message_bytes": self.max_message_bytes,
            "max_subscriptions": s.max_subscriptions,
            "max_wildcard_subscriptions": s.max_wildcard_subscriptions,
            "max_wildcard_filters": s.max_wildcard_filters,
            "max_topic_length": s.max_topic_length,
            "max_topic_levels": s.max_topic_levels,
            "outbox_messages": s.outbox_messages,
            "outbox_bytes": s.outbox_bytes,
            "slow_consumer": s.slow_consumer,
            "ping_interval": s.ping_interval,
            "idle_timeout": s.idle_timeout,
            "dedup_window": s.dedup_window,
            "max_session_batch": MAX_SESSION_BATCH,
            "max_session_page": self.config.sessions.max_page,
            **rates.as_dict(),
        }

    # --- sessions ------------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        self.sessions.add(session)
        self.counters["sessions_opened"] += 1

    async def detach(self, session: Session) -> None:
        """Forget a session: drop its subscriptions and the fan-out's watches for them."""
        self.sessions.discard(session)
        self._recovering.pop(session, None)
        subs = self.index.filters_of(session)
        filters = list(subs.values())
        self.index.remove_session(session)
        self.scoped.remove_all(session, subs)
        if self.presence is not None:
            self.presence.detached(session, filters)
        for filter in filters:
            await self._unwatch(filter)
        code = session.close_code
        reason = CloseCode(code).name.lower() if code in set(CloseCode) else "other"
        self.counters["sessions_closed"] += 1
        self.counters[f"sessions_closed_{reason}"] += 1

    async def handle(self, session: Session, event: Any) -> None:
        """Handle one request other than a publish; its replies are queued on `session`."""
        if isinstance(event, Subscribe):
            await self.subscribe(session, event)
        elif isinstance(event, Unsubscribe):
            await self.unsubscribe(session, event)
        elif isinstance(event, Forget):
            await self.forget(session, event)
        elif isinstance(event, Latest):
            await self.latest(session, event)
        elif isinstance(event, Presence):
            await self.presence_query(session, event)
        else:  # the codec only yields the events above, publishes and pings
            raise AssertionError(f"unexpected event {event!r}")

    # --- publish and deliver -------------------------------------------------------------

    async def publish(self, session: Session, events: Sequence[Publish]) -> None:
        """Publish a batch; acknowledge those that asked, and report every refusal."""
        now = time.time()
        accepted: list[Publish] = []
        drafts: list[Draft] = []
        for event in events:
            problem = self._check_publish(event)
            if problem is not None:
                session.reply(problem)
                continue
            accepted.append(event)
            drafts.append(Draft(topic=event.topic, payload=event.payload, published_at=now,
                                msg_id=event.msg_id,
                                record=self.recorded.matches_any(event.topic)))
        if not drafts:
            return
        try:
            messages = await self.fanout.publish(drafts)
        except FanoutUnavailable as e:
            # Unavailable promises that nothing was published; when that is not known, say so.
            code = (ErrorCode.OUTCOME_UNKNOWN if isinstance(e, FanoutOutcomeUnknown)
                    else ErrorCode.UNAVAILABLE)
            for event in accepted:
                session.reply(_error(code, f"publish failed: {e}", event))
            return
        self.counters["published"] += len(messages)
        for event, message in zip(accepted, messages, strict=True):
            if event.id is not None:
                session.reply(PubAck(id=event.id, event=message.event_id))

    def _check_publish(self, event: Publish) -> Error | None:
        topic_bytes = self._valid_topics.get(event.topic)
        if topic_bytes is None:
            try:
                validate_topic(event.topic, self.topic_limits)
            except InvalidTopic as e:
                return _error(ErrorCode.INVALID_TOPIC, str(e), event)
            if self.session_topics.reserved(event.topic):  # never cached: checked each time
                self.counters["reserved_topic_refused"] += 1
                return _error(ErrorCode.RESERVED_TOPIC,
                              f"topic {event.topic!r} is reserved for the broker's session "
                              "events (lifecycle, presence): clients may not publish on it",
                              event)
            if len(self._valid_topics) >= VALID_TOPICS_CACHE:
                self._valid_topics.clear()
            topic_bytes = self._valid_topics[event.topic] = len(event.topic.encode())
        if self._too_large(event.payload, self.max_message_bytes - topic_bytes):
            return _error(ErrorCode.MESSAGE_TOO_LARGE,
                          f"topic and payload exceed max_message_bytes ({self.max_message_bytes})",
                          event)
        return None

    @staticmethod
    def _too_large(payload: Any, limit: int) -> bool:
        """Whether the payload's encoding exceeds `limit` bytes (what is left beside the topic).
        Cheap bounds first: most payloads are far below the limit and need no encoding."""
        if isinstance(payload, bytes):
            return len(payload) > limit - 5
        if isinstance(payload, str) and len(payload) * 4 < limit - 5:
            return False
        return payload_size(payload) > limit

    def deliver(self, messages: Sequence[Message]) -> None:
        """The fan-out's callback: queue each message on every matching session, then flush
        each of those sessions once (one write per session for the whole batch). Never blocks."""
        deliveries = 0
        to_flush: list[Session] = []
        recovering = self._recovering
        for message in messages:
            targets = self.index.match(message.topic)
            if not targets:
                continue
            encoded = EncodedMessage(message)
            for session, subs in targets:
                if recovering and session in recovering:
                    subs = self._hold_back(session, encoded, subs)
                    if not subs:
                        continue
                if session.deliver(encoded, subs):
                    to_flush.append(session)
            deliveries += len(targets)
            if encoded.problem is not None:  # sessions got `dropped` instead (never expected)
                logger.error("message.unencodable", topic=ascii(message.topic)[:200],
                             event_id=message.event_id, problem=encoded.problem)
        for session in to_flush:
            session.flush()
        self.counters["deliveries"] += deliveries
        for observe in self.observers:
            observe(messages)

    def _hold_back(self, session: Session, message: EncodedMessage, subs: tuple[int, ...]
                   ) -> tuple[int, ...]:
        """The subscriptions of `subs` that are live; the message is held for the others."""
        switches = self._recovering[session]
        live = []
        for sub in subs:
            switch = switches.get(sub)
            if switch is None:
                live.append(sub)
            elif switch.live:
                if switch.admit(message):
                    live.append(sub)
                    self._stop_holding(session, sub)
            elif not switch.hold(message):
                # More arrived while this subscription replays than its outbox could hold:
                # the session is let go (4008) under either policy, as protocol.md says.
                session.slow(droppable=False)
        return tuple(live)

    def interrupted(self, filters: Sequence[str]) -> None:
        """The fan-out's callback (FanoutContext.interrupted): live delivery of `filters` may
        have been interrupted, so every subscription on them is told with a `gap` event, queued
        in order with its deliveries."""
        wanted = set(filters)
        for session in list(self.sessions):
            subs = tuple(sorted(sub for sub, filter in self.index.filters_of(session).items()
                                if filter in wanted))
            if subs:
                session.signal(GapNotice(subs=subs, reason=Gap.UNAVAILABLE.value))
                session.flush()
                self.counters["gaps"] += len(subs)

    # --- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, session: Session, event: Subscribe) -> None:
        problem = self._check_subscribe(session, event)
        if problem is not None:
            session.reply(problem)
            return
        since = Position.parse(event.since) if event.since is not None else None
        if since is not None:
            # Hold back live messages from here on, so none slips between history and live.
            switch = ReplaySwitch(since, max_held=self.config.server.outbox_messages,
                                  max_held_bytes=self.config.server.outbox_bytes)
            self._recovering.setdefault(session, {})[event.id] = switch
        self._add(session, event.id, event.filter)
        try:
            # The watch is live (confirmed) before the suback and before history is read.
            await self.fanout.watch(event.filter)
        except FanoutUnavailable as e:
            self._remove(session, event.id)
            self._stop_holding(session, event.id)
            session.reply(_error(ErrorCode.UNAVAILABLE, f"subscribe failed: {e}", event))
            return
        if since is None:
            session.reply(SubAck(id=event.id))
            return
        live = False
        try:
            live = await self._recover(session, event, switch)
        finally:
            if not live:  # once live, the switch filters until the first new live message
                self._stop_holding(session, event.id)

    def _add(self, session: Session, sub: int, filter: str) -> None:
        """Add a subscription to the index, the session-scoped index and presence."""
        self.index.add(session, sub, filter)
        self.scoped.add(session, sub, filter)
        if self.presence is not None:
            self.presence.subscribed(session, filter)

    def _stop_holding(self, session: Session, sub: int) -> None:
        switches = self._recovering.get(session)
        if switches is not None:
            switches.pop(sub, None)
            if not switches:
                del self._recovering[session]

    def _check_subscribe(self, session: Session, event: Subscribe) -> Error | None:
        subs = self.index.filters_of(session)
        if event.id in subs:
            return _error(ErrorCode.DUPLICATE_SUBSCRIPTION,
                          f"subscription id {event.id} is in use", event)
        if len(subs) >= self.config.server.max_subscriptions:
            return _error(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                          f"at most {self.config.server.max_subscriptions} subscriptions "
                          "per session", event)
        if is_wildcard(event.filter):
            problem = self._check_wildcards(session, event)
            if problem is not None:
                return problem
        try:
            validate_filter(event.filter, self.topic_limits)
        except InvalidTopic as e:
            return _error(ErrorCode.INVALID_FILTER, str(e), event)
        if event.since is None:
            return None
        if is_wildcard(event.filter):
            return _error(ErrorCode.SINCE_UNSUPPORTED,
                          "`since` needs an exact topic, not a wildcard filter", event)
        try:
            Position.parse(event.since)
        except InvalidEventId as e:
            return _error(ErrorCode.BAD_EVENT_ID, str(e), event)
        return None

    def _check_wildcards(self, session: Session, event: Subscribe) -> Error | None:
        """The wildcard limits: each overlapping wildcard filter costs every matching publish."""
        server = self.config.server
        if self.index.wildcards_of(session) >= server.max_wildcard_subscriptions:
            return _error(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                          f"at most {server.max_wildcard_subscriptions} wildcard subscriptions "
                          "per session (max_wildcard_subscriptions)", event)
        if self.index.wildcards >= server.max_wildcard_filters:
            return _error(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                          f"at most {server.max_wildcard_filters} wildcard subscriptions on this "
                          "broker instance (max_wildcard_filters)", event)
        return None

    async def _recover(self, session: Session, event: Subscribe, switch: ReplaySwitch) -> bool:
        """Suback with `recovered`, replay what was missed, then switch to live, in order; True
        once live, False when the session was let go or unsubscribed meanwhile."""
        replay = await self._read_history(event.filter, switch.since)
        gap = replay.gap.value if replay.gap is not None else None
        replayed = list(switch.replayed(EncodedMessage(m) for m in replay.messages))
        # `last` is the replay boundary: a client can tell where the replay ends, no timeout.
        last = replayed[-1].message.event_id if replayed else None
        session.reply(SubAck(id=event.id, recovered=replay.recovered, reason=gap, last=last))
        session.flush()
        for message in replayed:
            if not await self._replay_one(session, event.id, switch, message):
                return False
        # What arrived live meanwhile, after the last position replayed. The last `next_live`
        # turns the switch live with nothing awaited after it, so none can slip by.
        while (live := switch.next_live()) is not None:
            if not await self._replay_one(session, event.id, switch, live):
                return False
        return True

    async def _replay_one(self, session: Session, sub: int, switch: ReplaySwitch,
                          message: EncodedMessage) -> bool:
        """Queue one replayed message; False once the session is let go or unsubscribed."""
        return (await session.replay(message, sub)
                and self._recovering.get(session, {}).get(sub) is switch)

    async def _read_history(self, topic: str, since: Position) -> Replay:
        if not self.recorded.matches_any(topic):
            return Replay(messages=(), gap=Gap.NOT_RECORDED)
        try:
            return await self.history.read(topic, since)
        except HistoryUnavailable:
            return Replay(messages=(), gap=Gap.UNAVAILABLE)

    async def unsubscribe(self, session: Session, event: Unsubscribe) -> None:
        removed = self._remove(session, event.id)
        if removed is None:
            session.reply(_error(ErrorCode.UNKNOWN_SUBSCRIPTION,
                                 f"no subscription with id {event.id}", event))
            return
        session.reply(UnsubAck(id=event.id))
        await self._unwatch(removed)

    async def end_subscription(self, session: Session, sub: int, notice: Error) -> None:
        """End subscription `sub` of `session` on the broker's initiative (its principal lost
        the right, say), telling the client with `notice` after the deliveries queued for it."""
        removed = self._remove(session, sub)
        if removed is None:
            return
        session.signal(notice)
        await self._unwatch(removed)

    def _remove(self, session: Session, sub: int) -> str | None:
        """Drop subscription `sub` from the index (and any replay of it) and from presence; its
        filter, or None when the session had none with that id."""
        removed = self.index.remove(session, sub)
        if removed is None:
            return None
        self.scoped.remove(session, sub)
        self._stop_holding(session, sub)
        if self.presence is not None:
            self.presence.unsubscribed(session, removed[0], LeaveReason.UNSUBSCRIBED)
        return removed[0]

    def end_subscriptions(self, session_id: str, reason: str) -> list[str]:
        """End every subscription inside the topics of application session `session_id`:
        removed, and its session told with `ended`, in order after its deliveries. Returns
        the filters to unwatch (the caller's to do: this never blocks)."""
        unwatch: list[str] = []
        for session, subs in self.scoped.pop(session_id).items():
            for sub in subs:
                removed = self.index.remove(session, sub)
                self._stop_holding(session, sub)
                if removed is not None:
                    unwatch.append(removed[0])
                    if self.presence is not None:
                        self.presence.unsubscribed(session, removed[0], LeaveReason.ENDED)
            session.signal(Ended(subs=subs, reason=reason, session=session_id))
            session.flush()
            self.counters["subscriptions_ended"] += len(subs)
        return unwatch

    async def unwatch(self, filters: Sequence[str]) -> None:
        """Undo one fan-out watch of each filter (failures logged)."""
        for filter in filters:
            await self._unwatch(filter)

    async def announce(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        """Publish the broker's own messages (lifecycle and presence events) through the one
        publish path;
        raises FanoutUnavailable as the fan-out does."""
        messages = await self.fanout.publish(drafts)
        self.counters["published"] += len(messages)
        return messages

    async def _unwatch(self, filter: str) -> None:
        try:
            await self.fanout.unwatch(filter)
        except FanoutUnavailable as e:
            logger.warning("fanout.unwatch_failed", filter=filter, error=str(e))

    async def forget(self, session: Session, event: Forget) -> None:
        try:
            validate_filter(event.filter, self.topic_limits)
        except InvalidTopic as e:
            session.reply(_error(ErrorCode.INVALID_FILTER, str(e), event))
            return
        try:
            count = await self.history.forget(event.filter)
        except HistoryUnavailable as e:
            session.reply(_error(ErrorCode.UNAVAILABLE, f"forget failed: {e}", event))
            return
        session.reply(Forgot(id=event.id, topics=count))

    async def latest(self, session: Session, event: Latest) -> None:
        """Answer the event id of the topic's newest retained message (none when the topic
        is not recorded)."""
        try:
            validate_topic(event.topic, self.topic_limits)
        except InvalidTopic as e:
            session.reply(_error(ErrorCode.INVALID_TOPIC, str(e), event))
            return
        if not self.recorded.matches_any(event.topic):
            session.reply(LatestAck(id=event.id))
            return
        try:
            position = await self.history.latest(event.topic)
        except HistoryUnavailable as e:
            session.reply(_error(ErrorCode.UNAVAILABLE, f"latest failed: {e}", event))
            return
        session.reply(LatestAck(id=event.id,
                                event=position.event_id if position is not None else None))

    async def presence_query(self, session: Session, event: Presence) -> None:
        """Answer `presence` with the entries of the application session, from every
        instance (authorization is the session's: mqbroker.server.session)."""
        try:
            check_session_id(event.session)
        except ValueError as e:
            session.reply(_error(ErrorCode.BAD_EVENT, f"presence: `session`: {e}", event))
            return
        if self.presence is None:
            session.reply(_error(ErrorCode.UNAVAILABLE, "presence is not served here", event))
            return
        try:
            entries = await self.presence.query(event.session)
        except StoreUnavailable as e:
            session.reply(_error(ErrorCode.UNAVAILABLE, f"presence failed: {e}", event))
            return
        maps = tuple(entry_map(e) for e in entries)
        count = fitting(maps, self.max_message_bytes // 2)
        session.reply(Present(id=event.id, entries=maps[:count], more=count < len(maps)))

    def gauges(self) -> frozenset[str]:
        """The `stats()` names that are levels, not totals: the broker's own, and those its
        plugins declare in STAT_GAUGES (issue 9: a plugin's gauge was exported as a counter)."""
        history: frozenset[str] = getattr(self.history, "STAT_GAUGES", frozenset())
        fanout: frozenset[str] = getattr(self.fanout, "STAT_GAUGES", frozenset())
        presence: frozenset[str] = getattr(self.presence, "STAT_GAUGES", frozenset())
        return frozenset({"sessions", "subscriptions", *(f"history_{k}" for k in history),
                          *(f"fanout_{k}" for k in fanout), *(f"presence_{k}" for k in presence)})

    def labeled_gauges(self) -> dict[str, tuple[str, dict[str, int]]]:
        """Gauges with a label: the registry's sessions per state, as its reaper last
        counted them (a scrape costs no store call)."""
        if self.registry is None:
            return {}
        counts = {str(state): n for state, n in self.registry.counts.items()}
        return {"registry_sessions": ("state", counts)}

    def stats(self) -> dict[str, int]:
        return {
            "sessions": len(self.sessions),
            "subscriptions": len(self.index),
            **self.counters,
            **{f"history_{k}": v for k, v in self.history.stats().items()},
            **{f"fanout_{k}": v for k, v in self.fanout.stats().items()},
            **({f"presence_{k}": v for k, v in self.presence.stats().items()}
               if self.presence is not None else {}),
        }


def _error(code: ErrorCode, message: str,
           event: Publish | Subscribe | Unsubscribe | Forget | Latest | Presence) -> Error:
    return Error(code=code, message=message, id=event.id, ref=event.OP)


@asynccontextmanager
async def open_broker(config: Config, instance_id: str) -> AsyncIterator[Broker]:
    """Open the configured authenticator (when it is a plugin's), history store and fan-out,
    and the broker that routes through them."""
    from mqbroker.config import plugin_settings

    history_plugin = load_plugin(config.history.plugin)
    fanout_plugin = load_plugin(config.fanout.plugin)
    if history_plugin.open_history is None:
        raise PluginError(f"plugin {history_plugin.name!r} provides no history store")
    if fanout_plugin.open_fanout is None:
        raise PluginError(f"plugin {fanout_plugin.name!r} provides no fan-out")
    history_settings = plugin_settings(config, history_plugin)
    fanout_settings = plugin_settings(config, fanout_plugin)
    async with open_authenticator(config) as authenticator, \
            history_plugin.open_history(history_settings, config.history) as history:
        broker = Broker(instance_id=instance_id, config=config, history=history,
                        authenticator=authenticator)
        context = FanoutContext(instance_id=instance_id, history=history,
                                deliver=broker.deliver,
                                dedup_window=config.server.dedup_window,
                                dedup_max_entries=config.server.dedup_max_entries,
                                dedup_max_bytes=config.server.dedup_max_bytes,
                                interrupted=broker.interrupted)
        async with fanout_plugin.open_fanout(fanout_settings, context) as fanout:
            broker.fanout = fanout
            yield broker


@asynccontextmanager
async def open_authenticator(config: Config) -> AsyncIterator[Authenticator | None]:
    """The authenticator of the plugin `[auth] mode` names, open; None for a built-in mode.
    Raises PluginError when no installed plugin by that name provides one."""
    from mqbroker.config import plugin_settings

    mode = config.auth.mode
    if mode in BUILT_IN_AUTH_MODES:
        yield None
        return
    plugin = load_auth_plugin(mode)
    assert plugin.open_authenticator is not None
    async with plugin.open_authenticator(plugin_settings(config, plugin)) as authenticator:
        yield authenticator
