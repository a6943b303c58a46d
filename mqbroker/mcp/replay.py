"""Reading a session's stored events back from the broker: what a resuming client missed.

One reader for both ways of resuming: the SDK's `EventStore.replay_events_after` (replay, then
stop at the broker's replay boundary) and the resume route (replay, then the live messages until
the request's response). Sequence numbers decide what is new and whether
anything is missing: a gap is reported, never skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from attrs import define, field, frozen

from mqbroker.client.aio import Gap, Message, Subscription
from mqbroker.client.errors import ClientError
from mqbroker.mcp.ids import EventRef

#: Suback reasons after which an empty replay proves nothing (the history could not be read,
#: or does not record the topic).
_BLIND = frozenset({"unavailable", "not_recorded"})


@frozen
class Replayed:
    """An event of the resumed stream: its JSON-RPC message as JSON text, and its SSE id."""

    json: str
    event_id: str
    #: The message is the response (or error) of the stream's request: the stream is over.
    final: bool


@frozen
class Lost:
    """Events of the session may be missing here: the stream cannot continue faithfully."""

    reason: str


Item = Replayed | Lost


@define
class SessionReader:
    """Reads one stream of a session after the event `ref` from a subscription to the session's
    topic made with `since=ref.since`. The session's sequence numbers after `ref.seq` must come
    in order with no hole; the events of other streams are read past."""

    ref: EventRef
    #: The next sequence number expected.
    _expected: int = field(init=False)
    #: A sequence number at or right after the client's last one was seen: nothing is missing
    #: up to the next one expected.
    _proven: bool = field(default=False, init=False)
    #: The broker event id of the last message read (a later event's anchor).
    _previous: str | None = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._expected = self.ref.seq + 1
        self._previous = self.ref.anchor

    async def replay(self, subscription: Subscription) -> AsyncIterator[Item]:
        """What the broker's history holds after `ref`, ending with a `Lost` if any of it may
        be missing; stops at the replay's end (the suback names it: no timeout)."""
        blind = False
        async for item in subscription.replay():
            if isinstance(item, Gap):
                blind = blind or item.reason in _BLIND
                continue
            out = self._read(item)
            if out is not None:
                yield out
                if isinstance(out, Lost):
                    return
        ack = subscription.ack
        incomplete = blind or (ack is not None and ack.recovered is False)
        if incomplete and not self._proven:
            reason = ack.reason if ack is not None and ack.reason else "unknown"
            yield Lost(f"the broker's history of the session is incomplete ({reason})")

    async def live(self, subscription: Subscription) -> AsyncIterator[Item]:
        """The live events after the replay, until a `Lost` or the stream's final event."""
        async for item in subscription:
            if isinstance(item, Gap):
                yield Lost(f"live delivery was interrupted ({item.reason})")
                return
            live = self._read(item)
            if live is not None:
                yield live
                if isinstance(live, Lost) or live.final:
                    return

    def _read(self, message: Message) -> Item | None:
        payload: Any = message.payload
        previous, self._previous = self._previous, message.event_id
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if type(seq) is not int:
            return None  # not one of the adapter's records: someone else published here
        if seq == self.ref.seq:
            self._proven = True
        if seq < self._expected:
            return None  # the client has it already
        if seq > self._expected:
            return Lost(f"event {self._expected} of the session is missing")
        self._proven = True
        self._expected += 1
        if payload.get("stream") != self.ref.stream:
            return None
        if "omitted" in payload:
            return Lost(f"event {seq} of the session was not stored ({payload['omitted']})")
        json = payload.get("json")
        if not isinstance(json, str):
            return None  # a priming event: no message
        event_id = EventRef(self.ref.session, self.ref.stream, seq, previous).encode()
        return Replayed(json, event_id, final=payload.get("final") is True)


async def unsubscribe(subscription: Subscription) -> None:
    """Unsubscribe, bounded; a failure is harmless (the broker drops it with the connection)."""
    try:
        async with asyncio.timeout(1.0):
            await subscription.unsubscribe()
    except (ClientError, TimeoutError):
        pass  # the broker drops it with the connection anyway
