"""The floor under a paced message on trio: the least a trio program pays per message for the
same I/O as the broker (wake on a readable socket, `recv`, `send` to another socket), with no
WebSocket, no protocol and no broker. Compare its instructions per message with the broker's.

    python bench/trio_floor.py serve            # the echo server, on 127.0.0.1:18899
    python bench/trio_floor.py load [N] [GAP]   # N messages (1000), one every GAP s (0.02)

Instructions per message, the way docs/performance.md measured both (callgrind counts
instructions, so the figure does not depend on what else the machine is doing):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/floor.out \\
        python bench/trio_floor.py serve &
    callgrind_control -i on <pid>; python bench/trio_floor.py load 1000; callgrind_control -d <pid>
    callgrind_annotate /tmp/floor.out.1 | grep TOTALS     # divided by 1000

The broker's figure is taken the same way, with `mqbroker serve` under valgrind and the paced
load generator of ../shared/bench (`node mqload.mjs ... p2p msgs=1000 rate=50`).
"""

from __future__ import annotations

import socket
import sys
import time

import trio

PORT = 18899


async def serve() -> None:
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", PORT))
    listening.listen()
    listening.setblocking(False)
    connections: list[socket.socket] = []
    while len(connections) < 2:
        await trio.lowlevel.wait_readable(listening)
        connection, _ = listening.accept()
        connection.setblocking(False)
        connections.append(connection)
    publisher, subscriber = connections
    while True:
        try:
            data = publisher.recv(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(publisher)
            continue
        if not data:
            return
        subscriber.send(data)


def load(count: int, gap: float) -> None:
    publisher = socket.create_connection(("127.0.0.1", PORT))
    subscriber = socket.create_connection(("127.0.0.1", PORT))
    time.sleep(0.5)
    for _ in range(count):
        publisher.send(b"x" * 120)
        subscriber.recv(1000)
        time.sleep(gap)
    publisher.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        trio.run(serve)
    elif sys.argv[1:2] == ["load"]:
        load(int(sys.argv[2]) if len(sys.argv) > 2 else 1000,
             float(sys.argv[3]) if len(sys.argv) > 3 else 0.02)
    else:
        sys.exit(__doc__)
