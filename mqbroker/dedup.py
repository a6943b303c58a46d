"""The dedup window: which (topic, msg_id) pairs were published recently, and as what message.

Pure: no clock of its own. The caller passes `now` (any monotonic clock, in seconds) to every
call, so the window is tested without one and the fan-out can use trio's clock.
"""

from __future__ import annotations

from attrs import define, field

from mqbroker.message import Message

#: (topic, msg_id): a publisher's idempotency key is only unique within its topic.
DedupKey = tuple[str, str]


@define
class DedupWindow:
    """Remembers each (topic, msg_id) for `window` seconds after its first publish, bounded.

    A pair stays a duplicate while `now < put_time + window`; the caller puts only first
    publishes, so a repeat does not extend the window. At most `max_entries` pairs are kept:
    past that the oldest is forgotten before its window ends, and `evicted` counts those early
    losses (a sign the window is effectively shorter than configured). `now` must not
    decrease between calls.
    """

    window: float
    max_entries: int
    #: Pairs forgotten early because of `max_entries`.
    evicted: int = field(default=0, init=False)
    # Insertion order is publish-time order, so the oldest entry is always first.
    _entries: dict[DedupKey, tuple[float, Message]] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {self.max_entries}")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, topic: str, msg_id: str, now: float) -> Message | None:
        """The message first published with this pair, if that was less than `window` ago."""
        entry = self._entries.get((topic, msg_id))
        if entry is None or not now < entry[0] + self.window:
            return None
        return entry[1]

    def put(self, topic: str, msg_id: str, message: Message, now: float) -> None:
        """Remember `message` as the first publish of this pair, from `now` on."""
        key = (topic, msg_id)
        # Re-inserting moves the pair to the end, keeping the dict in publish-time order.
        self._entries.pop(key, None)
        self._entries[key] = (now, message)
        self._expire(now)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]
            self.evicted += 1

    def _expire(self, now: float) -> None:
        while self._entries:
            key = next(iter(self._entries))
            if now < self._entries[key][0] + self.window:
                return
            del self._entries[key]
