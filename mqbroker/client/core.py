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

from mqbroker.client.errors import BrokerError, ProtocolViolation, error_from_event
from mqbroker.protocol import (
    ClientConnection,
    ClientEvent,
    Delivery,
    Dropped,
    Error,
    Forget,
    Forgot,
    Format,
    Frame,
    GapNotice,
    PubAck,
    Publish,
    Rejected,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    join,
)
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


#: What a subscription's stream yields; a BrokerError item ends the stream by being raised.
StreamItem = Message | Gap | BrokerError


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


Outcome = Resolved | Failed | Deliver | Unsolicited


@define
class _Subscription:
    filter: str
    #: Where to resume: the last delivered event id, or the `since` the app asked for.
    since: str | None
    #: Established on a connection at least once (so a reconnect may have lost messages).
    established: bool = False


@define
class ClientCore:
    format: Format = Format.MSGPACK
    client_name: str = ""
    connection: ClientConnection = field(init=False)
    subscriptions: dict[int, _Subscription] = field(factory=dict)
    #: (op, id) -> the request, until its answer arrives.
    pending: dict[tuple[str, int], ClientEvent] = field(factory=dict)
    _ids: Iterator[int] = field(factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        self.connection = ClientConnection(format=self.format)

    # --- connections -----------------------------------------------------------------------

    def open_connection(self) -> Frame:
        """Start a new connection: the `hello` frame to send first."""
        self.connection = ClientConnection(format=self.format)
        return self.connection.hello(self.client_name)

    def resume(self) -> tuple[list[ClientEvent], list[Outcome]]:
        """Once a new connection is open: what to send again, and what that settles at once."""
        events: list[ClientEvent] = [
            # Only exact topics resume from a position (the broker refuses `since` on a
            # wildcard filter); the others are re-established and report a Gap.
            Subscribe(id=sub_id, filter=sub.filter,
                      since=None if is_wildcard(sub.filter) else sub.since)
            for sub_id, sub in self.subscriptions.items()
        ]
        outcomes: list[Outcome] = []
        for key, event in sorted(self.pending.items(), key=lambda item: item[0][1]):
            if isinstance(event, Subscribe):
                continue  # sent above, with its subscription
            if isinstance(event, Unsubscribe):
                # The new session never had that subscription: nothing left to undo.
                del self.pending[key]
                outcomes.append(Resolved(key, None))
            else:
                events.append(event)
        return events, outcomes

    # --- what the drivers send --------------------------------------------------------------

    @property
    def ping_interval(self) -> float:
        """How often to ping while connected, as the broker's welcome asks."""
        welcome = self.connection.welcome
        return float(welcome.limits.get("ping_interval", 20.0)) if welcome else 20.0

    def encode_queued(self, first: ClientEvent,
                      next_queued: Callable[[], ClientEvent | None]) -> Frame:
        """One frame: `first`, then queued events (`next_queued` gives None when there are no
        more) up to half the broker's frame limit and its item limit. Coalescing what queued up
        while the previous frame was being sent is what lets throughput grow with load."""
        welcome = self.connection.welcome
        limits = welcome.limits if welcome else {}
        budget = int(limits.get("max_frame_bytes", 1 << 20))
        # Brokers before max_frame_items took any batch; 1000 is what they all take.
        max_items = int(limits.get("max_frame_items", 1000))
        fragments = [self.connection.encode(first)]
        size = len(fragments[0])
        while size < budget // 2 and len(fragments) < max_items:
            event = next_queued()
            if event is None:
                break
            fragments.append(self.connection.encode(event))
            size += len(fragments[-1])
        return join(fragments, self.format)

    # --- requests ----------------------------------------------------------------------------

    def subscribe(self, filter: str, since: str | None = None) -> Subscribe:
        event = Subscribe(id=next(self._ids), filter=filter, since=since)
        self.subscriptions[event.id] = _Subscription(filter=filter, since=since)
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

    def forget(self, filter: str) -> Forget:
        event = Forget(id=next(self._ids), filter=filter)
        self.pending[("forget", event.id)] = event
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
                sub.since = item.event
                outcomes.append(Deliver(sub_id, message))
        return outcomes

    def _subscribed(self, item: SubAck) -> list[Outcome]:
        sub = self.subscriptions.get(item.id)
        if sub is None:
            return []  # unsubscribed meanwhile
        outcomes: list[Outcome] = []
        if sub.established and (is_wildcard(sub.filter) or sub.since is None):
            # Re-established with nothing to resume from: whatever was published while
            # disconnected is not replayed, and the stream says so.
            outcomes.append(Deliver(item.id, Gap(reason="not_resumable")))
        elif item.recovered is False:
            outcomes.append(Deliver(item.id, Gap(reason=item.reason or "unknown")))
        sub.established = True
        return outcomes + self._settle(("subscribe", item.id), item)

    def _settle(self, key: tuple[str, int], value: Any) -> list[Outcome]:
        if self.pending.pop(key, None) is None:
            return []  # a resent request answered twice, or a resubscription
        return [Resolved(key, value)]

    def _failed(self, item: Error) -> list[Outcome]:
        error = error_from_event(item)
        if item.id is None or item.ref is None:
            return [Unsolicited(error)]
        key: tuple[str, int] = (item.ref, item.id)
        if item.ref == "subscribe":
            sub = self.subscriptions.pop(item.id, None)
            if key not in self.pending and sub is not None:
                return [Deliver(item.id, error)]  # a resubscription failed: end that stream
        if self.pending.pop(key, None) is None:
            return [Unsolicited(error)]
        return [Failed(key, error)]

