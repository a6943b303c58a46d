"""The broker's own per-message cost, in process and without sockets.

    python bench/bench_broker.py

Decodes batches of publish frames, publishes them through the broker (memory fan-out and
history) and queues the deliveries on subscribed sessions' outboxes, as the server does, but
with no WebSocket in between: what this measures is mqbroker's Python, not trio-websocket.
Workloads: 1 publisher to 1 subscriber on per-session topics (recorded and not), and 1 to 100.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import trio

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.protocol import ClientConnection, Publish, Subscribe
from mqbroker.server.session import Session

BATCH = 200
PAYLOAD = b"x" * 100


@attrs.define
class _Endpoint:
    address: str = "127.0.0.1"
    port: int = 0


@attrs.define
class _NoSocket:
    """Stands in for the WebSocket: the benchmark never sends, it drains outboxes itself."""

    remote: Any = attrs.field(factory=_Endpoint)


def new_session(config: ServerConfig) -> Session:
    session = Session(_NoSocket(), config)  # type: ignore[arg-type]
    session.protocol.receive(ClientConnection().hello("bench"))
    return session


async def measure(record: bool, subscribers: int, batches: int) -> float:
    """Microseconds of CPU time per published message (CPU time: steadier when busy)."""
    history = HistoryConfig(record=("bench/#",) if record else ())
    config = Config(server=ServerConfig(port=0, outbox_messages=1_000_000,
                                        outbox_bytes=1 << 34), history=history)
    async with open_broker(config, "bench") as broker:
        sessions = [new_session(config.server) for _ in range(subscribers)]
        for session in sessions:
            broker.attach(session)
            await broker.subscribe(session, Subscribe(id=1, filter="bench/+/message"))
        publisher = new_session(config.server)
        frame = ClientConnection().encode_batch(
            [Publish(topic=f"bench/{n % 50}/message", payload=PAYLOAD) for n in range(BATCH)])
        start = time.process_time()
        for _ in range(batches):
            await publish_frame(broker, publisher, frame)
            for session in sessions:
                await session.outbox.take(1 << 30)
        return (time.process_time() - start) / (batches * BATCH) * 1e6


async def publish_frame(broker: Broker, publisher: Session, frame: bytes) -> None:
    events = publisher.protocol.receive(frame)
    await broker.publish(publisher, events)  # type: ignore[arg-type]


def main() -> None:
    print(f"batches of {BATCH} publishes, {len(PAYLOAD)}-byte payloads, memory plugins")
    for record in (False, True):
        for subscribers, batches in ((1, 1000), (100, 100)):
            cost = trio.run(measure, record, subscribers, batches)
            print(f"history {'on ' if record else 'off'}  1 -> {subscribers:<3}: "
                  f"{cost:6.2f} us per message ({1e6 / cost:>10,.0f} messages/s)")


if __name__ == "__main__":
    main()
