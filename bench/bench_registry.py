"""The session registry over the wire: registry requests per second through one connection.

    python bench/bench_registry.py [--sessions N]

A broker in this process (memory store, memory fan-out) and one raw WebSocket client in the
same trio loop (so the figures include both ends' Python), sending registry requests in frames
of 100 and reading every answer: N creates (each publishing its `created` event), N touches
and N gets (batches of 100 ids), a full listing (pages of 1000), N updates to active (one
lifecycle event each), and N deletes (each forgetting the session's history and ending its
topics). Prints requests (or sessions) per second for each.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import trio
from trio_websocket import connect_websocket_url

from mqbroker.broker import open_broker
from mqbroker.config import Config, ServerConfig, SessionsConfig
from mqbroker.protocol import (
    ClientConnection,
    ClientEvent,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionTouch,
    SessionUpdate,
)
from mqbroker.server.listener import serve
from mqbroker.server.registry import open_registry

FRAME = 100


async def exchange(ws: Any, connection: ClientConnection, requests: Sequence[ClientEvent]
                   ) -> list[Any]:
    """Send the requests in frames of FRAME; every answer, in order."""
    answers: list[Any] = []
    for start in range(0, len(requests), FRAME):
        await ws.send_message(connection.encode_batch(list(requests[start:start + FRAME])))
    while len(answers) < len(requests):
        answers += connection.receive(await ws.get_message())
    assert all(isinstance(a, SessionReply) for a in answers), answers[:3]
    return answers


async def main(count: int) -> None:
    config = Config(server=ServerConfig(port=0, outbox_messages=1_000_000,
                                        outbox_bytes=1 << 30),
                    sessions=SessionsConfig(reap_interval=3600.0))
    async with open_broker(config, "bench") as broker, open_registry(broker, config), \
            trio.open_nursery() as nursery:
        listener = await nursery.start(serve, broker, config.server)
        ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{listener.port}/",
                                         max_message_size=1 << 30)
        connection = ClientConnection()
        await ws.send_message(connection.hello("bench"))
        connection.receive(await ws.get_message())
        ids = [f"s{n:06}" for n in range(count)]
        batches = [tuple(ids[n:n + 100]) for n in range(0, count, 100)]
        workloads: list[tuple[str, list[ClientEvent], int]] = [
            ("create", [SessionCreate(id=n, session=s, user="u", metadata={"n": n})
                        for n, s in enumerate(ids)], count),
            ("touch (100 ids a request)", [SessionTouch(id=n, sessions=b, user="u")
                                           for n, b in enumerate(batches)], count),
            ("get (100 ids a request)", [SessionGet(id=n, sessions=b, user="u")
                                         for n, b in enumerate(batches)], count),
            ("update to active", [SessionUpdate(id=n, session=s, user="u", state="active")
                                  for n, s in enumerate(ids)], count),
        ]
        for name, requests, sessions in workloads:
            started = time.perf_counter()
            await exchange(ws, connection, requests)
            elapsed = time.perf_counter() - started
            print(f"{name:28} {sessions / elapsed:10,.0f} sessions/s "
                  f"({len(requests) / elapsed:,.0f} requests/s)")
        started, after, listed = time.perf_counter(), None, 0
        while True:
            (page,) = await exchange(ws, connection, [SessionList(id=1, after=after,
                                                                  limit=1000)])
            listed += len(page.sessions)
            if page.next is None:
                break
            after = page.next
        print(f"{'list (pages of 1000)':28} {listed / (time.perf_counter() - started):10,.0f}"
              " sessions/s")
        started = time.perf_counter()
        await exchange(ws, connection, [SessionDelete(id=n, session=s, user="u")
                                        for n, s in enumerate(ids)])
        print(f"{'delete':28} {count / (time.perf_counter() - started):10,.0f} sessions/s")
        await ws.aclose()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    trio.run(main, parser.parse_args().sessions)
