"""Sessions without a connection: the broker driven in process, for tests and benchmarks.

`MemorySession` implements the broker's `Session` protocol (mqbroker.broker.Session) by keeping
the frames it is sent, so that a test can assert on the broker's behaviour (routing, replies,
replay, the slow-consumer policy) without sockets, and a benchmark can measure the broker's
own cost.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import trio
from attrs import define, field

from mqbroker.protocol import EncodedMessage, Format, Frame, ServerEvent, Subscribe
from mqbroker.protocol.codec import SERVER_SPECS, decode, encode, join

if TYPE_CHECKING:
    from mqbroker.broker import Broker


@define(eq=False)
class MemorySession:
    """An attached session whose connection is a list of frames; hashable by identity, like a
    real one. Past `max_queued` unflushed fragments a delivery counts as slow (`slow_count`)."""

    format: Format = Format.MSGPACK
    max_queued: int = 1_000_000
    id: str = field(factory=lambda: secrets.token_hex(6))
    close_code: int | None = None
    #: Fragments queued and not yet flushed.
    queued: list[Frame] = field(factory=list)
    #: Flushed frames, in order.
    frames: list[Frame] = field(factory=list)
    slow_count: int = 0
    #: What presence reads (as on mqbroker.server.session.Session).
    client_name: str = ""
    principal_name: str | None = None

    def deliver(self, message: EncodedMessage, subs: tuple[int, ...]) -> bool:
        if len(self.queued) >= self.max_queued:
            self.slow()
            return False
        self.queued.append(message.fragment(self.format, subs))
        return len(self.queued) == 1

    def reply(self, event: ServerEvent) -> None:
        self.queued.append(encode(event, self.format))

    def signal(self, event: ServerEvent) -> None:
        self.queued.append(encode(event, self.format))

    def flush(self) -> None:
        if self.queued:
            self.frames.append(join(self.queued, self.format))
            self.queued = []

    def slow(self, droppable: bool = True) -> None:
        self.slow_count += 1

    async def replay(self, message: EncodedMessage, sub: int) -> bool:
        await trio.lowlevel.checkpoint()  # a real session may wait here for room
        if self.close_code is not None:
            return False
        self.queued.append(message.fragment(self.format, (sub,)))
        return True

    def events(self) -> list[Any]:
        """Every event flushed so far, decoded as a client would."""
        return [event for frame in self.frames for event in decode(frame, SERVER_SPECS)]

    def take_events(self) -> list[Any]:
        """The events flushed since the last call."""
        events = self.events()
        self.frames.clear()
        return events


async def watching(broker: Broker, *filters: str, **session: Any) -> MemorySession:
    """A `MemorySession` attached to `broker` and subscribed to `filters` (ids 1, 2, ...),
    its acknowledgements already taken: what it holds from now on is what was delivered."""
    watcher = MemorySession(**session)
    broker.attach(watcher)
    for sub_id, filter in enumerate(filters, start=1):
        await broker.subscribe(watcher, Subscribe(id=sub_id, filter=filter))
    watcher.flush()
    watcher.take_events()
    return watcher
