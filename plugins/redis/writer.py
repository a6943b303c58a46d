"""The single writer: publish requests queue up and run as one thread hop and one script call.

Whoever calls `write` waits for its own drafts only; the writer task drains every request that
queued up meanwhile into the next batch. So under load a batch grows, and the per-message cost
falls from a thread hop and a round trip (~0.3 ms) towards the script's own work (bench/
bench_redis_bridge.py measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import trio
from attrs import define, field

from mqbroker.message import Message

from .bridge import RedisBridge, RedisUnavailable
from .scripts import InstanceClock, Outbound, PublishCall, Written

#: Drafts per script call at most: one call blocks Redis for its whole run.
MAX_BATCH = 256
#: Requests waiting for the writer; past this, `write` waits (back-pressure on publishers).
QUEUE_REQUESTS = 1024


@define(eq=False)
class _Request:
    batch: Sequence[Outbound]
    done: trio.Event = field(factory=trio.Event)
    messages: Sequence[Message] = ()
    error: RedisUnavailable | None = None


@define(eq=False)
class ScriptWriter:
    """Runs `call` over queued batches, in queue order; `serve` is the writer task.

    Drafts that Redis does not record and that come without a position are stamped from
    `clock` when their batch is sent, so positions follow the order Redis applies them in.
    """

    bridge: RedisBridge
    call: PublishCall
    clock: InstanceClock = field(factory=InstanceClock)
    written: int = field(default=0, init=False)
    recorded: int = field(default=0, init=False)
    duplicates: int = field(default=0, init=False)
    evicted: int = field(default=0, init=False)
    calls: int = field(default=0, init=False)
    _send: trio.MemorySendChannel[_Request] = field(init=False)
    _receive: trio.MemoryReceiveChannel[_Request] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Request](QUEUE_REQUESTS)

    async def write(self, batch: Sequence[Outbound]) -> Sequence[Message]:
        """The messages for `batch`, in order; raises RedisUnavailable if the call failed."""
        request = _Request(batch)
        await self._send.send(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.messages

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for request in self._receive:
            await self._flush(self._gather(request))

    def _gather(self, first: _Request) -> list[_Request]:
        requests, size = [first], len(first.batch)
        while size < MAX_BATCH:
            try:
                request = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            requests.append(request)
            size += len(request.batch)
        return requests

    async def _flush(self, requests: list[_Request]) -> None:
        batch = [self._stamped(o) for request in requests for o in request.batch]
        try:
            written = await self.bridge.run(lambda: self._run(batch))
        except RedisUnavailable as error:
            for request in requests:
                request.error = error
                request.done.set()
            return
        self._count(written)
        ends = list(accumulate(len(request.batch) for request in requests))
        for request, start, end in zip(requests, [0, *ends], ends, strict=False):
            request.messages = written.messages[start:end]
            request.done.set()

    def _run(self, batch: Sequence[Outbound]) -> Written:
        return self.call.written(self.bridge.script_sync("publish", self.call.args(batch)), batch)

    def _stamped(self, outbound: Outbound) -> Outbound:
        if outbound.position is not None or self.call.records(outbound.draft):
            return outbound
        return outbound.stamped(self.clock.next())

    def _count(self, written: Written) -> None:
        self.calls += 1
        self.written += len(written.messages)
        self.recorded += written.recorded
        self.duplicates += written.duplicates
        self.evicted += written.evicted
