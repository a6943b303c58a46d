"""A session's outbox: the bounded queue between the broker and the session's writer task.

The broker puts deliveries with `put_nowait` and never waits on a session. When the outbox is
full the slow-consumer policy applies to that session alone: `disconnect` marks it overflowed
(the writer then closes it with 4008), `drop_oldest` drops the oldest deliveries and counts them
so the writer can tell the client (`dropped`). Replies (acks, errors) are never dropped and go
out before pending deliveries, so a suback always precedes the messages it replays.
"""

from __future__ import annotations

from collections import deque

import trio
from attrs import define, field

from mqbroker.protocol import Frame


class Overflowed(Exception):
    """The outbox overflowed under the `disconnect` policy: the session must be closed."""


@define(eq=False)
class Outbox:
    max_messages: int
    max_bytes: int
    drop_oldest: bool
    _deliveries: deque[Frame] = field(factory=deque)
    _replies: deque[Frame] = field(factory=deque)
    _bytes: int = 0
    #: Deliveries dropped since the writer last reported them.
    _dropped: int = 0
    dropped_total: int = 0
    overflowed: bool = False
    _ready: trio.Event = field(factory=trio.Event)
    _space: trio.Event = field(factory=trio.Event)

    def __len__(self) -> int:
        return len(self._deliveries) + len(self._replies)

    def put_nowait(self, fragment: Frame) -> bool:
        """Queue a delivery; False when the session is overflowed and must be let go."""
        if self.overflowed:
            return False
        if not self._fits(len(fragment)) and not self._make_room(len(fragment)):
            self.overflow()
            return False
        self._deliveries.append(fragment)
        self._bytes += len(fragment)
        self._ready.set()
        return True

    async def put(self, fragment: Frame) -> None:
        """Queue a delivery, waiting for room: for replays, paced by this session's own writer."""
        while not self.overflowed and not self._fits(len(fragment)) and len(self) > 0:
            if self._space.is_set():
                self._space = trio.Event()
            await self._space.wait()
        if self.overflowed:
            raise Overflowed
        self._deliveries.append(fragment)
        self._bytes += len(fragment)
        self._ready.set()

    def reply(self, fragment: Frame) -> None:
        """Queue a reply. Replies answer the client's own requests, so they are bounded by them."""
        self._replies.append(fragment)
        self._ready.set()

    async def take(self, max_bytes: int) -> tuple[list[Frame], int]:
        """Wait for something to send; return what fits in one frame and the count dropped."""
        while not self._replies and not self._deliveries:
            if self.overflowed:
                raise Overflowed
            self._ready = trio.Event()
            await self._ready.wait()
        if self.overflowed:
            raise Overflowed
        batch = self._drain(self._replies, max_bytes, count_bytes=False)
        batch += self._drain(self._deliveries, max_bytes - sum(map(len, batch)), count_bytes=True)
        dropped, self._dropped = self._dropped, 0
        self._space.set()
        return batch, dropped

    def _drain(self, queue: deque[Frame], budget: int, *, count_bytes: bool) -> list[Frame]:
        # The first fragment always goes, even alone over budget: it has to go some time.
        batch: list[Frame] = []
        while queue and (not batch or len(queue[0]) <= budget):
            fragment = queue.popleft()
            budget -= len(fragment)
            if count_bytes:
                self._bytes -= len(fragment)
            batch.append(fragment)
        return batch

    def _fits(self, size: int) -> bool:
        return len(self._deliveries) < self.max_messages and self._bytes + size <= self.max_bytes

    def _make_room(self, size: int) -> bool:
        if not self.drop_oldest:
            return False
        while self._deliveries and not self._fits(size):
            self._bytes -= len(self._deliveries.popleft())
            self._dropped += 1
            self.dropped_total += 1
        return self._fits(size)

    def overflow(self) -> None:
        """Mark the session as let go: the writer stops and closes it with 4008."""
        self.overflowed = True
        self._ready.set()
        self._space.set()
