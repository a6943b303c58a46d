"""The monitor: a healthy session beside an attack, checking that it never notices.

A session subscribed to `monitor/#`, fed a steady trickle of numbered messages by a second
session; every message must arrive, in order, and the monitor's session must stay open. Used by
the hostile tests (tests/test_hostile*.py) and by bench/chaos.py, which counts what it lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from mqbroker.protocol import Delivery, Ping, Pong, Publish, SubAck, Subscribe
from tests.rawws import ConnectionEnded, ProtocolSession

#: The monitor's trickle: one message every this many seconds.
TRICKLE = 0.02


@attrs.define(eq=False)
class Monitor:
    """A healthy session beside the attack, and the publisher that feeds it."""

    subscriber: ProtocolSession
    publisher: ProtocolSession
    published: int = 0
    received: list[int] = attrs.field(factory=list)
    failure: str | None = None
    _publishing: bool = True
    _caught_up: trio.Event = attrs.field(factory=trio.Event)

    async def _publish(self) -> None:
        while self._publishing:
            payload = self.published.to_bytes(4, "big")
            try:
                await self.publisher.send(Publish(topic="monitor/trickle", payload=payload))
            except ConnectionEnded as ended:
                self.failure = f"the monitor's publisher lost its connection: {ended}"
                return
            self.published += 1
            await trio.sleep(TRICKLE)

    async def _receive(self) -> None:
        try:
            while True:
                for event in await self.subscriber.receive():
                    if isinstance(event, Delivery):
                        payload = event.payload if isinstance(event.payload, bytes) else b""
                        n = int.from_bytes(payload, "big")
                        if n != len(self.received):
                            self.failure = f"message {n} arrived as number {len(self.received)}"
                        self.received.append(n)
                        if not self._publishing and len(self.received) >= self.published:
                            self._caught_up.set()
                    elif not isinstance(event, Pong):
                        self.failure = f"the monitor was sent {event!r}"
        except ConnectionEnded as ended:
            self.failure = f"the monitor's session ended: {ended}"
            self._caught_up.set()

    async def _keepalive(self) -> None:
        # The subscriber only reads: a ping now and then is its traffic for the idle timeout.
        while True:
            await trio.sleep(0.1)
            await self.subscriber.send(Ping())

    @property
    def lost(self) -> int:
        """Messages published and not received (so far)."""
        return len(set(range(self.published)) - set(self.received))

    async def stop(self, minimum: int = 0) -> None:
        """Stop the trickle (once `minimum` went by) and wait, bounded, for its last messages."""
        with trio.move_on_after(minimum * TRICKLE * 10):
            await wait_until(lambda: self.published >= minimum or self.failure is not None)
        self._publishing = False
        await trio.sleep(TRICKLE)  # the publisher's last send, if it was mid-way
        if len(self.received) >= self.published:
            self._caught_up.set()
        with trio.move_on_after(10):
            await self._caught_up.wait()

    async def check(self, minimum: int = 10) -> None:
        """Stop the trickle and require every message, in order, on a session still open.
        A quick test still sees `minimum` messages go by."""
        await self.stop(minimum)
        assert self.failure is None, self.failure
        assert self.received == list(range(self.published))


@asynccontextmanager
async def monitored(port: int, *, check: bool = True) -> AsyncIterator[Monitor]:
    """A running `Monitor` on the broker at `port`; checked on a normal exit (unless not
    `check`: then the caller stops it and counts)."""
    subscriber = await ProtocolSession.open(port, "monitor")
    publisher = await ProtocolSession.open(port, "monitor-publisher")
    await subscriber.send(Subscribe(id=1, filter="monitor/#"))
    assert isinstance(await subscriber.next_event(), SubAck)
    monitor = Monitor(subscriber, publisher)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor._publish)
            nursery.start_soon(monitor._receive)
            nursery.start_soon(monitor._keepalive)
            yield monitor
            if check:
                await monitor.check()
            nursery.cancel_scope.cancel()
    finally:
        subscriber.close()
        publisher.close()


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll `condition` until it holds, failing after `seconds` (what the hostile tests wait
    for, connections gone or a log line written, has no event to wait on)."""
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.01)
