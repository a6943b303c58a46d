"""The client's state, sans-IO: requests in flight, subscriptions and where each one resumes.

The trio and asyncio drivers own the sockets and tasks; this class decides what to send and
what each received event means. It survives reconnects: `open_connection` starts a new
connection's handshake, and `resume` gives what must be sent again once it is open
(every subscription with `since` at its last delivered event, every unanswered request).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from attrs import define, field, frozen

from mqbroker.client.errors import (
    BrokerError,
    MessageTooLarge,
    OutcomeUnknown,
    ProtocolViolation,
    SubscriptionEnded,
    error_from_event,
)
from mqbroker.client.limits import Limits
from mqbroker.protocol import (
    ClientConnection,
    ClientEvent,
    Delivery,
    Dropped,
    Ended,
    Error,
    Forget,
    Forgot,
    Format,
    Frame,
    GapNotice,
    Latest,
    LatestAck,
    Presence,
    Present,
    PubAck,
    Publish,
    Refresh,
    Refreshed,
    Rejected,
    SessionCreate,
    SessionDelete,
    SessionReply,
    SessionRequest,
    SessionUpdate,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
    join,
)
from mqbroker.protocol.codec import payload_size
from mqbroker.protocol.events import SESSION_REQUESTS
from mqbroker.sessions import PresenceEntry
from mqbroker.topics import is_wildcard


@frozen(kw_only=True)
class Message:
    """A message as a subscription yields it."""

    topic: str
    payload: Any
    #: Opaque; give it back as `since` to resume after this message.
    event_id: str
    #: Publish time, Unix seconds.
    published_at: float


@frozen(kw_only=True)
class Gap:
    """A point in a subscription's stream where messages may be missing: the app should resync.

    reason: "trimmed", "unknown_epoch", "not_recorded", "unavailable" (replay could not be
    complete, or the broker's live delivery was interrupted: its `gap` event), "not_resumable"
    (a subscription was re-established after a reconnect with no
    position to resume from: a wildcard filter, or a topic that had delivered nothing yet)
    or "dropped" (the broker dropped `count` deliveries to this slow session).
    """

    reason: str
    count: int | None = None


@frozen
class Live:
    """The replay boundary in a subscription's stream (made with `since`): every item before
    it was replayed, every message after it is live. Iterating a subscription skips it;
    `subscription.replay()` stops at it."""


#: What a subscription's stream holds; a BrokerError item ends the stream by being raised.
StreamItem = Message | Gap | Live | BrokerError


# --- what `receive` reports -------------------------------------------------------------------


@frozen
class Resolved:
    """The request `key` succeeded with `value` (event id, SubAck, None or a count)."""

    key: tuple[str, int]
    value: Any


@frozen
class Failed:
    key: tuple[str, int]
    error: BrokerError


@frozen
class Deliver:
    """Put `item` on subscription `sub`'s stream."""

    sub: int
    item: StreamItem


@frozen
class Unsolicited:
    """An error answering no request of ours (a fire-and-forget publish, say)."""

    error: BrokerError


@frozen
class Send:
    """Queue `event` to be sent (an `unsubscribe` undoing a cancelled subscribe, say)."""

    event: ClientEvent


Outcome = Resolved | Failed | Deliver | Unsolicited | Send

#: The requests the broker answers, by (op, id), and which a caller may withdraw.
_REQUESTS = (Publish, Subscribe, Unsubscribe, Forget, Refresh, Latest, *SESSION_REQUESTS,
             Presence)
#: Registry changes that are not resent after a reconnect: carried out twice, they would
#: create a second session (or fail as not found, or on a version): they fail OutcomeUnknown.
_NOT_RESENT = (SessionCreate, SessionUpdate, SessionDelete)
#: A credential is refreshed when this much of its time to live has passed...
REFRESH_AT = 0.75
#: ... but never sooner than this many seconds after the last refresh (or the welcome): a
#: provider handing out tokens about to expire cannot make the client refresh in a tight loop.
MIN_REFRESH_DELAY = 1.0


def refresh_delay(ttl: float) -> float:
    """Seconds to wait before refreshing a credential that expires in `ttl` seconds."""
    return max(ttl * REFRESH_AT, MIN_REFRESH_DELAY)
#: Frame limits assumed until a welcome says otherwise (the broker's defaults).
_DEFAULT_MAX_FRAME_BYTES = 1 << 20
_ENVELOPE_BYTES = 1024


@define
class _Subscription:
    filter: str
    #: Where to resume: the last delivered event id, or the `since` the app asked for.
    since: str | None
    #: Established on a connection at least once (so a reconnect may have lost messages).
    established: bool = False
    #: Past the replay boundary (the `Live` marker was put on the stream); True without `since`.
    live: bool = False
    #: The last message of the replay, as the latest suback named it (None: not known yet).
    boundary: str | None = None
    #: Re-established with nothing to resume from: a Gap is owed before its next item, be it
    #: its suback or a delivery ahead of it (the broker may deliver before the suback).
    gap_due: bool = False


@define
class ClientCore:
    format: Format = Format.MSGPACK
    client_name: str = ""
    #: The credential sent in the next hello (the broker's [auth] mode); kept out of repr. A
    #: credential provider's driver sets it before each connection.
    auth: str | None = field(default=None, repr=False)
    connection: ClientConnection = field(init=False)
    subscriptions: dict[int, _Subscription] = field(factory=dict)
    #: (op, id) -> the request, until its answer arrives.
    pending: dict[tuple[str, int], ClientEvent] = field(factory=dict)
    _ids: Iterator[int] = field(factory=lambda: itertools.count(1))
    #: Cancelled subscribes whose `unsubscribe` could not be queued at once: it is sent when
    #: the broker's answer arrives (or not at all, if the next connection comes first).
    _abandoned: set[int] = field(factory=set)
    #: An event taken from the send queue that did not fit in the last frame, and its encoding.
    _carried: tuple[ClientEvent, Frame] | None = None
    #: The largest frame written on this connection: its size and its events. A 1009 close
    #: (frame too large) fails its requests rather than resend them (`refused_as_too_large`).
    _largest: tuple[int, list[ClientEvent]] = (0, [])
    #: A cap on frame sizes below the welcome's, set when a 1009 refused a frame holding no
    #: request to fail (resubscriptions only): smaller frames next time, rather than a loop.
    _frame_cap: int | None = None
    #: The limits of the latest welcome (kept while reconnecting): `client.limits`.
    welcomed: Limits = field(factory=Limits)

    def __attrs_post_init__(self) -> None:
        self.connection = ClientConnection(format=self.format)

    # --- connections -----------------------------------------------------------------------

    def open_connection(self) -> Frame:
        """Start a new connection: the `hello` frame to send first."""
        self.connection = ClientConnection(format=self.format)
        self._largest = (0, [])
        return self.connection.hello(self.client_name, self.auth)

    def resume(self) -> tuple[list[ClientEvent], list[Outcome]]:
        """Once a new connection is open: what to send again, and what that settles at once."""
        events: list[ClientEvent] = [
            # Only exact topics resume from a position (the broker refuses `since` on a
            # wildcard filter); the others are re-established and report a Gap.
            Subscribe(id=sub_id, filter=sub.filter,
                      since=None if is_wildcard(sub.filter) else sub.since)
            for sub_id, sub in self.subscriptions.items()
        ]
        for sub in self.subscriptions.values():
            # Whatever was published while disconnected is not replayed for these.
            sub.gap_due = sub.established and (is_wildcard(sub.filter) or sub.since is None)
        outcomes: list[Outcome] = []
        # The new session never had the abandoned subscriptions: nothing left to undo.
        self._abandoned.clear()
        carried = self.take_carried()
        for key, event in sorted(self.pending.items(), key=lambda item: item[0][1]):
            if isinstance(event, Subscribe):
                continue  # sent above, with its subscription
            if isinstance(event, Unsubscribe | Refresh):
                # The new session never had that subscription: nothing left to undo. (A refresh:
                # the new session's hello carried a current credential.)
                del self.pending[key]
                outcomes.append(Resolved(key, None))
            elif isinstance(event, _NOT_RESENT):
                del self.pending[key]
                outcomes.append(Failed(key, OutcomeUnknown(
                    f"{event.OP}: the connection dropped before the broker answered: it may or "
                    "may not have been carried out (read the session back)", ref=event.OP)))
            else:
                events.append(event)
        if carried is not None and isinstance(carried, Publish) and carried.id is None:
            events.append(carried)  # a fire-and-forget publish taken but never written
        return events, outcomes

    # --- what the drivers send --------------------------------------------------------------

    @property
    def ping_interval(self) -> float:
        """How often to ping while connected, as the broker's welcome asks."""
        welcome = self.connection.welcome
        return float(welcome.limits.get("ping_interval", 20.0)) if welcome else 20.0

    @property
    def ttl(self) -> float | None:
        """Seconds the session's credential had left when the broker welcomed it; None when
        it does not expire (or no welcome yet)."""
        welcome = self.connection.welcome
        return welcome.ttl if welcome else None

    @property
    def limits(self) -> dict[str, Any]:
        welcome = self.connection.welcome
        return welcome.limits if welcome else {}

    @property
    def has_carried(self) -> bool:
        return self._carried is not None

    def take_carried(self) -> ClientEvent | None:
        carried, self._carried = self._carried, None
        return carried[0] if carried else None

    def encode_queued(self, first: ClientEvent | None,
                      next_queued: Callable[[], ClientEvent | None], *,
                      skip_withdrawn: bool = True) -> tuple[Frame | None, list[Outcome]]:
        """One frame: `first` (None: the event carried over from the last frame), then queued
        events (`next_queued` gives None when there are no more) up to half the broker's frame
        limit and its `max_frame_items`. Coalescing what queued up while the previous frame was
        being sent is what lets throughput grow with load.

        No frame exceeds the welcome's `max_frame_bytes` (the broker would close with 1009): an
        event that does not fit is carried over to the next frame, and one that fits in no frame,
        or a publish over `max_message_bytes`, is refused here, never sent (the outcomes fail
        it). Requests withdrawn meanwhile (cancelled) are skipped. None: nothing left to send.
        """
        carried, self._carried = self._carried, None
        if first is not None and not (skip_withdrawn and _withdrawn(first, self.pending)):
            carried = (first, self.connection.encode(first))
        limits = self.limits
        max_frame = int(limits.get("max_frame_bytes", _DEFAULT_MAX_FRAME_BYTES))
        max_message = int(limits.get("max_message_bytes", max_frame - _ENVELOPE_BYTES))
        if self._frame_cap is not None:
            max_frame = min(max_frame, self._frame_cap)
        # Brokers before max_frame_items took any batch; 1000 is what they all take.
        max_items = int(limits.get("max_frame_items", 1000))
        json = self.format is Format.JSON
        # A batch adds a header (msgpack: at most 5 bytes), or brackets and a comma per event
        # (JSON); one event alone is sent as itself.
        per_event, room = (1, max_frame - 1) if json else (0, max_frame - 5)
        pending = self.pending if skip_withdrawn else None
        encode = self.connection.encode
        fragments: list[Frame] = []
        events: list[ClientEvent] = []
        outcomes: list[Outcome] = []
        size = 0
        while size < max_frame // 2 and len(fragments) < max_items:
            if carried is not None:
                event, fragment = carried
                carried = None
            else:
                queued = next_queued()
                if queued is None:
                    break
                event = queued
                if pending is not None and _withdrawn(event, pending):
                    continue  # its caller was cancelled before it was written
                fragment = encode(event)
            length = len(fragment)
            if length > max_frame or (type(event) is Publish
                                      and self._over_message_limit(event, length, max_message)):
                outcomes.extend(self._refuse(event, "is over the broker's size limits"))
                continue
            if fragments and size + length + per_event > room:
                self._carried = (event, fragment)  # first in the next frame
                break
            fragments.append(fragment)
            events.append(event)
            size += length + per_event
        if not fragments:
            return None, outcomes
        if size > self._largest[0]:
            self._largest = (size, events)
        return join(fragments, self.format), outcomes

    def frames(self, events: list[ClientEvent]) -> tuple[list[Frame], list[Outcome]]:
        """`events` as frames within the broker's limits, in order (for `resume`)."""
        remaining = iter(events)
        frames: list[Frame] = []
        outcomes: list[Outcome] = []
        first = next(remaining, None)
        while first is not None or self._carried is not None:
            # Resubscriptions are not pending requests: nothing here counts as withdrawn.
            frame, refused = self.encode_queued(first, lambda: next(remaining, None),
                                                skip_withdrawn=False)
            outcomes += refused
            if frame is not None:
                frames.append(frame)
            first = None if self._carried is not None else next(remaining, None)
        return frames, outcomes

    def refused_as_too_large(self) -> list[Outcome]:
        """The broker closed the connection with 1009 (a frame over its limit): fail the
        requests of the largest frame written on it, which is the refused one or one at least as
        large, instead of resending them forever. Each 1009 fails at least one request, so
        reconnecting cannot loop."""
        size, events = self._largest
        self._largest = (0, [])
        outcomes: list[Outcome] = []
        for event in events:
            key = _key(event)
            if key is not None and key in self.pending:  # (fire-and-forget ones are gone)
                outcomes += self._refuse(event, "was refused by the broker (1009: frame too "
                                                "large); it is not resent")
        if not outcomes and size:
            self._frame_cap = max(size // 2, 1)
        return outcomes

    def _over_message_limit(self, event: Publish, length: int, limit: int) -> bool:
        # The encoded publish holds the topic and the msgpack payload, so a small fragment
        # settles it without measuring. JSON is counted in characters: up to 4 bytes each.
        if length * (4 if self.format is Format.JSON else 1) <= limit:
            return False
        return len(event.topic.encode()) + payload_size(event.payload) > limit

    def _refuse(self, event: ClientEvent, why: str) -> list[Outcome]:
        """Fail `event` with MessageTooLarge without sending it."""
        key = _key(event)
        error = MessageTooLarge(f"{event.OP} {why}", ref=event.OP)
        if isinstance(event, Publish):
            error.msg_id = event.msg_id
        if key is None:
            return [Unsolicited(error)]  # a fire-and-forget publish: nobody waits
        self.pending.pop(key, None)
        if isinstance(event, Subscribe) and self.subscriptions.pop(event.id, None) is not None:
            return [Deliver(event.id, error), Failed(key, error)]
        return [Failed(key, error)]

    # --- requests ----------------------------------------------------------------------------

    def subscribe(self, filter: str, since: str | None = None) -> Subscribe:
        event = Subscribe(id=next(self._ids), filter=filter, since=since)
        self.subscriptions[event.id] = _Subscription(filter=filter, since=since,
                                                     live=since is None)
        self.pending[("subscribe", event.id)] = event
        return event

    def unsubscribe(self, sub_id: int) -> Unsubscribe | None:
        """None when there is nothing to undo (unknown, or the subscribe was never answered)."""
        sub = self.subscriptions.pop(sub_id, None)
        self.pending.pop(("subscribe", sub_id), None)
        if sub is None:
            return None
        event = Unsubscribe(id=sub_id)
        self.pending[("unsubscribe", sub_id)] = event
        return event

    def publish(self, topic: str, payload: Any, *, ack: bool, msg_id: str | None) -> Publish:
        if not ack:
            return Publish(topic=topic, payload=payload, msg_id=msg_id)
        # An acknowledged publish always carries a msg_id, so resending it after a reconnect
        # can never deliver it twice.
        request_id = next(self._ids)
        event = Publish(topic=topic, payload=payload, id=request_id,
                        msg_id=msg_id or secrets.token_hex(8))
        self.pending[("publish", request_id)] = event
        return event

    def withdraw(self, key: tuple[str, int]) -> None:
        """The caller of request `key` was cancelled: if it was not written yet, it never will
        be, and it is not resent after a reconnect. (Once written, it may have taken effect.)"""
        self.pending.pop(key, None)

    def abandon(self, sub_id: int) -> None:
        """The `unsubscribe` undoing a cancelled subscribe could not be queued: send it when
        the broker answers that subscribe instead."""
        self.pending.pop(("unsubscribe", sub_id), None)
        self._abandoned.add(sub_id)

    def registry(self, make: Callable[[int], SessionRequest]) -> SessionRequest:
        """A registry request, `make` given its id; pending until answered."""
        event = make(next(self._ids))
        self.pending[(event.OP, event.id)] = event
        return event

    def forget(self, filter: str) -> Forget:
        event = Forget(id=next(self._ids), filter=filter)
        self.pending[("forget", event.id)] = event
        return event

    def presence(self, session: str) -> Presence:
        event = Presence(id=next(self._ids), session=session)
        self.pending[("presence", event.id)] = event
        return event

    def latest(self, topic: str) -> Latest:
        event = Latest(id=next(self._ids), topic=topic)
        self.pending[("latest", event.id)] = event
        return event

    def refresh(self, auth: str) -> Refresh:
        """Replace the session's credential with `auth` (answered with the new ttl)."""
        self.auth = auth
        event = Refresh(id=next(self._ids), auth=auth)
        self.pending[("refresh", event.id)] = event
        return event

    # --- what the broker says ----------------------------------------------------------------

    def receive(self, frame: Frame) -> list[Outcome]:
        """Interpret one frame; raises HandshakeFailed if a new connection is refused."""
        outcomes: list[Outcome] = []
        for item in self.connection.receive(frame):
            outcomes.extend(self._interpret(item))
        return outcomes

    def _interpret(self, item: Any) -> list[Outcome]:
        if isinstance(item, Delivery):
            return self._delivered(item)
        if isinstance(item, SubAck):
            return self._subscribed(item)
        if isinstance(item, PubAck):
            return self._settle(("publish", item.id), item.event)
        if isinstance(item, UnsubAck):
            return self._settle(("unsubscribe", item.id), None)
        if isinstance(item, Forgot):
            return self._settle(("forget", item.id), item.topics)
        if isinstance(item, Present):
            return self._present(item)
        if isinstance(item, Refreshed):
            return self._settle(("refresh", item.id), item.ttl)
        if isinstance(item, SessionReply):
            return self._settle((item.ref, item.id), item)
        if isinstance(item, Ended):
            return self._ended(item)
        if isinstance(item, LatestAck):
            return self._settle(("latest", item.id), item.event)
        if isinstance(item, Error):
            return self._failed(item)
        if isinstance(item, Dropped):
            gap = Gap(reason="dropped", count=item.count)
            return [Deliver(sub_id, gap) for sub_id in self.subscriptions]
        if isinstance(item, GapNotice):
            # Exact recorded topics need no resubscription: the broker refills those itself
            # and sends no `gap` for them unless the refill was incomplete.
            gap = Gap(reason=item.reason)
            return [Deliver(sub_id, gap) for sub_id in item.subs if sub_id in self.subscriptions]
        if isinstance(item, Welcome):
            self.welcomed = Limits.of(item.limits)
            return []
        if isinstance(item, Rejected):
            return [Unsolicited(ProtocolViolation(f"the broker sent {item.message}"))]
        return []  # welcome, pong: nothing to settle

    def _delivered(self, item: Delivery) -> list[Outcome]:
        message = Message(topic=item.topic, payload=item.payload, event_id=item.event,
                          published_at=item.time)
        outcomes: list[Outcome] = []
        for sub_id in item.subs:
            sub = self.subscriptions.get(sub_id)
            if sub is not None:
                if sub.gap_due:
                    outcomes += self._owed_gap(sub_id, sub)
                sub.since = item.event
                outcomes.append(Deliver(sub_id, message))
                if not sub.live and sub.boundary == item.event:
                    sub.live = True
                    outcomes.append(Deliver(sub_id, Live()))
        return outcomes

    @staticmethod
    def _owed_gap(sub_id: int, sub: _Subscription) -> list[Outcome]:
        """The Gap a re-established subscription owes its stream, once (see `gap_due`)."""
        if not sub.gap_due:
            return []
        sub.gap_due = False
        return [Deliver(sub_id, Gap(reason="not_resumable"))]

    def _ended(self, item: Ended) -> list[Outcome]:
        """The broker removed these subscriptions: each stream ends with SubscriptionEnded, and
        none is re-established after a reconnect."""
        outcomes: list[Outcome] = []
        for sub_id in item.subs:
            if self.subscriptions.pop(sub_id, None) is None:
                continue
            self.pending.pop(("subscribe", sub_id), None)
            error = SubscriptionEnded(
                f"subscription {sub_id} ended: {item.reason}"
                + (f" (session {item.session})" if item.session else ""),
                reason=item.reason, session=item.session)
            outcomes.append(Deliver(sub_id, error))
        return outcomes

    def _subscribed(self, item: SubAck) -> list[Outcome]:
        sub = self.subscriptions.get(item.id)
        if sub is None:
            if item.id in self._abandoned:  # its caller was cancelled: undo it on the broker
                self._abandoned.discard(item.id)
                event = Unsubscribe(id=item.id)
                self.pending[("unsubscribe", item.id)] = event
                return [Send(event)]
            return []  # unsubscribed meanwhile
        outcomes: list[Outcome] = self._owed_gap(item.id, sub)
        if not outcomes and item.recovered is False:
            outcomes.append(Deliver(item.id, Gap(reason=item.reason or "unknown")))
        sub.established = True
        if not sub.live:
            # A resubscription during the replay moves the boundary to its own replay's end.
            sub.boundary = item.last
            if item.last is None:
                sub.live = True
                outcomes.append(Deliver(item.id, Live()))
        return outcomes + self._settle(("subscribe", item.id), item)

    def _present(self, item: Present) -> list[Outcome]:
        key = ("presence", item.id)
        request = self.pending.get(key)
        if not isinstance(request, Presence):
            return []  # answered twice (resent after a reconnect)
        try:
            entries = [_presence_entry(request.session, entry) for entry in item.entries]
        except (KeyError, TypeError, ValueError) as e:
            del self.pending[key]
            return [Failed(key, ProtocolViolation(f"the broker sent a bad `present`: {e!r}"))]
        return self._settle(key, entries)

    def _settle(self, key: tuple[str, int], value: Any) -> list[Outcome]:
        if self.pending.pop(key, None) is None:
            return []  # a resent request answered twice, or a resubscription
        return [Resolved(key, value)]

    def _failed(self, item: Error) -> list[Outcome]:
        error = error_from_event(item)
        if item.id is None or item.ref is None:
            return [Unsolicited(error)]
        key: tuple[str, int] = (item.ref, item.id)
        request = self.pending.get(key)
        if isinstance(request, Publish):
            error.msg_id = request.msg_id  # what a retry must carry to be delivered once
        if item.ref == "subscribe":
            if item.id in self._abandoned:
                self._abandoned.discard(item.id)
                return []  # a cancelled subscribe that failed anyway: nothing to undo
            sub = self.subscriptions.pop(item.id, None)
            if key not in self.pending and sub is not None:
                return [Deliver(item.id, error)]  # a resubscription failed: end that stream
        if self.pending.pop(key, None) is None:
            return [Unsolicited(error)]
        return [Failed(key, error)]


def _presence_entry(session: str, entry: dict[str, Any] | None) -> PresenceEntry:
    """One entry of a `present` answer; raises KeyError, TypeError or ValueError when the
    broker's map is not one."""
    if entry is None:
        raise TypeError("an entry is a map, not null")
    principal = entry["principal"]
    fields = (entry["instance"], entry["connection"], entry["client"])
    if not all(isinstance(text, str) for text in fields) or not (
            principal is None or isinstance(principal, str)):
        raise TypeError("instance, connection, client and principal are strings")
    return PresenceEntry(session=session, instance=fields[0], connection=fields[1],
                         client=fields[2], principal=principal, expires=float(entry["expires"]))


def _key(event: ClientEvent) -> tuple[str, int] | None:
    """The (op, id) a request is answered by; None for what the broker does not answer."""
    if isinstance(event, _REQUESTS) and event.id is not None:
        return (event.OP, event.id)
    return None


def _withdrawn(event: ClientEvent, pending: dict[tuple[str, int], ClientEvent]) -> bool:
    """A request its caller withdrew (cancelled) before it was written: no longer pending."""
    if type(event) is Publish:  # the hot path: no key unless acknowledged
        return event.id is not None and ("publish", event.id) not in pending
    key = _key(event)
    return key is not None and key not in pending
