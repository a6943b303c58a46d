"""The client library's send path: the sans-IO core packing queued events into frames, and the
trio client end to end.

    python bench/bench_client.py [--rounds 3]

Workloads (100-byte binary payloads, msgpack):
- core: `ClientCore.encode_queued` packing 200,000 queued publishes into frames, acknowledged
  (each a pending request, checked for withdrawal and size) and fire-and-forget; microseconds
  per publish, in process, no sockets.
- e2e: one trio client bursts 50,000 fire-and-forget publishes (`ack=False`) to a broker in
  the same process, another receives them: messages per second (both cores of a 2-core machine
  are shared by broker and clients, so this is the client library and the broker together).
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import Any

import trio

from mqbroker.client import Message, connect
from mqbroker.client.core import ClientCore
from mqbroker.config import Config, ServerConfig
from mqbroker.protocol import Format, Welcome
from mqbroker.protocol.codec import encode
from tests.harness import running_broker

PAYLOAD = b"x" * 100
CORE_EVENTS = 200_000
E2E_MESSAGES = 50_000


def bench_core(ack: bool) -> float:
    """Microseconds per publish to pack CORE_EVENTS queued publishes into frames."""
    core = ClientCore()
    core.open_connection()
    core.receive(encode(Welcome(version=1, instance="i", session="s",
                                limits={"max_frame_bytes": 1 << 20}), Format.MSGPACK))
    queue: deque[Any] = deque(core.publish("bench/t", PAYLOAD, ack=ack, msg_id=None)
                              for _ in range(CORE_EVENTS))

    def next_queued() -> Any:
        return queue.popleft() if queue else None

    started = time.perf_counter()
    while queue:
        core.encode_queued(queue.popleft(), next_queued)
    return (time.perf_counter() - started) / CORE_EVENTS * 1e6


async def bench_e2e() -> float:
    """Messages per second, a fire-and-forget burst to one subscriber through a broker."""
    # Outbox room for the whole burst: the subscriber shares the process with the publisher,
    # and the slow-consumer policy is not what is measured here.
    config = Config(server=ServerConfig(port=0, outbox_messages=E2E_MESSAGES * 2,
                                        outbox_bytes=1 << 28))
    async with running_broker(config) as broker, connect(broker.url) as subscriber, \
            connect(broker.url, buffer=10_000) as publisher:
        subscription = await subscriber.subscribe("bench/t")

        async def produce() -> None:
            for _ in range(E2E_MESSAGES):
                await publisher.publish("bench/t", PAYLOAD, ack=False)  # waits for queue room

        started = time.perf_counter()
        received = 0
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async for item in subscription:
                    assert isinstance(item, Message), item  # a Gap would spoil the figure
                    received += 1
                    if received == E2E_MESSAGES:
                        break
        return E2E_MESSAGES / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        acked, fire = bench_core(ack=True), bench_core(ack=False)
        rate = trio.run(bench_e2e)
        print(f"core acked {acked:.2f} us/publish  core fire-and-forget {fire:.2f} us/publish  "
              f"e2e {rate:,.0f} msg/s", flush=True)


if __name__ == "__main__":
    main()
