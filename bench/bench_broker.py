"""The broker's own per-message cost, in process and without sockets.

    python bench/bench_broker.py

Decodes batches of publish frames, publishes them through the broker (memory fan-out and
history) and queues the deliveries on subscribed sessions' outboxes, as the server does, but
with no connection in between (mqbroker.testing.MemorySession): the broker's own Python.
Workloads: 1 publisher to 1 subscriber on per-session topics (recorded and not), and 1 to 100.
"""

from __future__ import annotations

import time

import trio

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.protocol import ClientConnection, Publish, ServerConnection, Subscribe
from mqbroker.testing import MemorySession

BATCH = 200
PAYLOAD = b"x" * 100


def new_session() -> MemorySession:
    return MemorySession()


async def measure(record: bool, subscribers: int, batches: int) -> float:
    """Microseconds of CPU time per published message (CPU time: steadier when busy)."""
    history = HistoryConfig(record=("bench/#",) if record else ())
    config = Config(server=ServerConfig(port=0, outbox_messages=1_000_000,
                                        outbox_bytes=1 << 34), history=history)
    async with open_broker(config, "bench") as broker:
        sessions = [new_session() for _ in range(subscribers)]
        for session in sessions:
            broker.attach(session)
            await broker.subscribe(session, Subscribe(id=1, filter="bench/+/message"))
        publisher = new_session()
        protocol = ServerConnection()
        protocol.receive(ClientConnection().hello("bench"))
        frame = ClientConnection().encode_batch(
            [Publish(topic=f"bench/{n % 50}/message", payload=PAYLOAD) for n in range(BATCH)])
        start = time.process_time()
        for _ in range(batches):
            await publish_frame(broker, protocol, publisher, frame)
            for session in sessions:
                session.frames.clear()
        return (time.process_time() - start) / (batches * BATCH) * 1e6


async def publish_frame(broker: Broker, protocol: ServerConnection, publisher: MemorySession,
                        frame: bytes) -> None:
    events = protocol.receive(frame)
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
