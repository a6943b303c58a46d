"""A session's outbox: what waits to be framed and written to the session's connection.

Everything the broker sends a session waits here until the connection can take it: deliveries
and replies alike, both counted against the same bounds (`max_messages`, `max_bytes`), so a
client that sends requests and reads nothing fills its outbox like one that reads too slowly.
When a fragment does not fit, the slow-consumer policy applies to that session alone:
`disconnect` lets it go (4008); `drop_oldest` drops the oldest deliveries, counted, so the client
can be told (`dropped`). Replies are never dropped: a client waits for each; when replies alone
fill the outbox the session is let go under either policy.

Replies go out before pending deliveries, so a suback always precedes the messages it replays.
Sync, except `wait_room`: whoever puts never waits, but a replay paces itself on the writer.
"""

from __future__ import annotations

from collections import deque

import trio
from attrs import define, field

from mqbroker.protocol import Frame


@define(eq=False)
class Outbox:
    max_messages: int
    max_bytes: int
    drop_oldest: bool
    # Created on first use: most sessions are idle most of the time, and an empty deque is
    # over half a kilobyte.
    _deliveries: deque[Frame] | None = None
    _replies: deque[Frame] | None = None
    _count: int = 0
    _bytes: int = 0
    #: Deliveries dropped since they were last reported.
    dropped: int = 0
    dropped_total: int = 0
    #: Set when something did not fit under `disconnect` (or replies alone overflowed).
    overflowed: bool = False
    #: Set when the connection broke: no room will ever come (see `gone_away`).
    gone: bool = False
    _room: trio.Event | None = field(default=None)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0 or self.dropped > 0

    def put(self, fragment: Frame) -> bool:
        """Queue a delivery; False when it did not fit and the session must be let go."""
        if self.overflowed:
            return False
        size = len(fragment)
        if not self._fits(size) and not self._make_room(size):
            self.overflowed = True
            return False
        if self._deliveries is None:
            self._deliveries = deque()
        self._deliveries.append(fragment)
        self._count += 1
        self._bytes += size
        return True

    def reply(self, fragment: Frame) -> bool:
        """Queue a reply; False when even dropping deliveries leaves no room for it."""
        if self.overflowed:
            return False
        size = len(fragment)
        if not self._fits(size) and not self._make_room(size):
            self.overflowed = True
            return False
        if self._replies is None:
            self._replies = deque()
        self._replies.append(fragment)
        self._count += 1
        self._bytes += size
        return True

    def has_room(self, size: int = 1) -> bool:
        """Whether a replayed delivery of `size` bytes may be queued now: a slot, and room for
        its bytes (some room only would let `put` fail, and mark the outbox overflowed)."""
        return self._count < self.max_messages and self._bytes + size <= self.max_bytes

    async def wait_room(self, size: int = 1) -> None:
        """Wait until `has_room(size)`, or the outbox is empty (a fragment over max_bytes never
        fits), or the session is let go: for replays, paced by the writer."""
        while (not self.has_room(size) and self._count and not self.overflowed
               and not self.gone):
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def take(self, max_bytes: int) -> list[Frame]:
        """What fits in one frame of `max_bytes`, replies first; empty when nothing waits."""
        batch: list[Frame] = []
        budget = max_bytes
        for queue in (self._replies, self._deliveries):
            # The first fragment always goes, even alone over budget: it has to go some time.
            while queue and (not batch or len(queue[0]) <= budget):
                fragment = queue.popleft()
                budget -= len(fragment)
                self._bytes -= len(fragment)
                self._count -= 1
                batch.append(fragment)
        if self._room is not None and self.has_room():
            self._room.set()
            self._room = None
        return batch

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def clear(self) -> None:
        """Forget every queued fragment (a session let go sends none of them)."""
        self._deliveries = self._replies = None
        self._count = self._bytes = 0
        self.let_go()

    def let_go(self) -> None:
        """Wake whoever waits for room: the session is ending."""
        self.overflowed = True
        if self._room is not None:
            self._room.set()
            self._room = None

    def gone_away(self) -> None:
        """The connection broke: wake whoever waits for room, which will never come. Unlike
        `let_go` this is no overflow: the session ends as the peer left it, not as slow."""
        self.gone = True
        if self._room is not None:
            self._room.set()
            self._room = None

    def _fits(self, size: int) -> bool:
        return self._count < self.max_messages and self._bytes + size <= self.max_bytes

    def _make_room(self, size: int) -> bool:
        if not self.drop_oldest:
            return False
        deliveries = self._deliveries
        while deliveries and not self._fits(size):
            self._bytes -= len(deliveries.popleft())
            self._count -= 1
            self.dropped += 1
            self.dropped_total += 1
        return self._fits(size)
