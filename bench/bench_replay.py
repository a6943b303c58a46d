"""History end to end: catching up a backlog, and what recording costs publishing.

    python bench/bench_replay.py

One broker process (memory history and fan-out, `max_messages` raised to hold the backlog).
- Catch-up: 10,000 messages (100-byte payloads) are published to a recorded topic; a new
  session then subscribes with `since` = the first message's event id and we time until it
  holds the other 9,999 (subscribe to caught up), over several rounds.
- Recording cost: 1 publisher to 1 subscriber throughput on a recorded topic
  (`mcp/session/+/message`) and on a topic no record filter matches, alternated in rounds in
  the same broker process, so the ratio is measured side by side.
"""

from __future__ import annotations

import statistics
import time

import msgpack
import trio
from bench_e2e import (
    BATCH,
    Broker,
    count_deliveries,
    machine,
    open_session,
    publish_frame,
    throughput,
)

from mqbroker.protocol import ClientConnection, Publish, Subscribe

BACKLOG = 10_000
RECORDED = "mcp/session/bench/message"
NOT_RECORDED = "bench/not/recorded"


async def publish_backlog(url: str, topic: str) -> str:
    """Publish BACKLOG messages; the first one's event id. The first and the last publish are
    acknowledged: the last ack says the broker has recorded them all."""
    encode = ClientConnection().encode_batch
    payload = b"x" * 100
    async with trio.open_nursery() as nursery:
        ws = await open_session(nursery, url)
        await ws.send_message(encode([Publish(topic=topic, payload=payload, id=1)]))
        first = msgpack.unpackb(await ws.get_message())["event"]
        frame = publish_frame(topic, BATCH)
        for _ in range((BACKLOG - 2) // BATCH):
            await ws.send_message(frame)
        rest = BACKLOG - 2 - (BACKLOG - 2) // BATCH * BATCH
        await ws.send_message(encode([Publish(topic=topic, payload=payload)] * rest
                                     + [Publish(topic=topic, payload=payload, id=2)]))
        assert msgpack.unpackb(await ws.get_message())["id"] == 2
        nursery.cancel_scope.cancel()
    return str(first)


async def catch_up(url: str, since: str, topic: str) -> float:
    """Seconds from subscribing with `since` to holding the backlog."""
    async with trio.open_nursery() as nursery:
        ws = await open_session(nursery, url)
        start = time.perf_counter()
        await ws.send_message(ClientConnection().encode(
            Subscribe(id=1, filter=topic, since=since)))
        received = -1  # the suback
        while received < BACKLOG - 1:
            received += count_deliveries(await ws.get_message())
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


async def main(broker: Broker) -> None:
    url = broker.url
    catch_ups = []
    for round_ in range(5):
        topic = f"mcp/session/replay{round_}/message"
        since = await publish_backlog(url, topic)
        catch_ups.append(await catch_up(url, since, topic))
    print(f"catch-up of {BACKLOG:,} messages: median {statistics.median(catch_ups) * 1e3:.1f} ms"
          f" (min {min(catch_ups) * 1e3:.1f}, max {max(catch_ups) * 1e3:.1f}; 5 rounds)")
    rates: dict[str, list[float]] = {RECORDED: [], NOT_RECORDED: []}
    cpu: dict[str, list[float]] = {RECORDED: [], NOT_RECORDED: []}
    messages = 100_000
    for round_ in range(6):
        order = (RECORDED, NOT_RECORDED) if round_ % 2 else (NOT_RECORDED, RECORDED)
        for topic in order:
            before = broker.cpu_seconds()
            rates[topic].append(await throughput(url, 1, messages, topic=topic))
            cpu[topic].append((broker.cpu_seconds() - before) / messages * 1e6)
    on, off = (statistics.median(cpu[t]) for t in (RECORDED, NOT_RECORDED))
    print(f"1 -> 1, {messages:,} messages, median of 6 alternated rounds: recorded "
          f"{statistics.median(rates[RECORDED]):,.0f} msg/s ({on:.2f} us broker CPU/message), "
          f"not recorded {statistics.median(rates[NOT_RECORDED]):,.0f} msg/s "
          f"({off:.2f} us/message)")
    print(f"recording costs {(on - off) / on * 100:.0f}% of the broker's publish capacity "
          f"(CPU per message, recorded vs not)")


if __name__ == "__main__":
    print(f"machine: {machine()}")
    with Broker(outbox=20_000, extra="[history]\nmax_messages = 20000\n") as broker:
        trio.run(main, broker)
