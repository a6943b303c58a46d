"""A session's publishes in flight: queued in order by its reader, published in batches.

The reader does not wait for a publish to be carried (through Redis, say) before reading the
next frame: it queues it here, and one task publishes whatever has queued meanwhile as one
batch. Under load the batches grow by themselves, so a session sending one message per frame
costs one fan-out round trip per batch, not per message, while its publishes keep their order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from mqbroker.protocol import Publish

T = TypeVar("T")

#: How many events one fan-out call carries at most.
MAX_BATCH = 1000
#: How many runs of publishes may wait before the reader waits too (pushing back on the peer).
MAX_QUEUED_RUNS = 64


class OrderedQueue(Generic[T]):
    """Items a connection's reader queues in order, for one task of the connection to carry
    out; the reader waits only when `max_queued` are waiting (pushing back on the peer)."""

    def __init__(self, max_queued: int) -> None:
        self._send, self._receive = trio.open_memory_channel[T](max_queued)
        self._unfinished = 0
        self._drained = trio.Event()
        self._drained.set()

    async def put(self, item: T) -> None:
        """Queue an item, after every item queued before it."""
        self._unfinished += 1
        if self._drained.is_set():
            self._drained = trio.Event()
        try:
            # No checkpoint when there is room: the reader goes on to its next frame, and the
            # carrying task runs at the reader's next wait, one task switch per frame.
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send.send(item)

    async def drained(self) -> None:
        """Wait until every queued item has been carried out (or refused)."""
        await self._drained.wait()

    def _finished(self, count: int) -> None:
        self._unfinished -= count
        if not self._unfinished:
            self._drained.set()


class PublishQueue(OrderedQueue[list[Publish]]):
    def __init__(self) -> None:
        super().__init__(MAX_QUEUED_RUNS)

    async def run(self, publish: Callable[[list[Publish]], Awaitable[None]]) -> None:
        """Publish queued runs, as many together as have queued, in order, until cancelled."""
        async for first in self._receive:
            batch, runs = list(first), 1
            while len(batch) < MAX_BATCH:
                try:
                    batch += self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                runs += 1
            await publish(batch)
            self._finished(runs)
