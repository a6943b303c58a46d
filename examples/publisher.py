"""Publish numbered messages to an MCP session's topic (and a broadcast), printing event ids.

    python examples/publisher.py --broker ws://127.0.0.1:7878/ --session s1 --count 10
    python examples/publisher.py --session s1 --count 0 --broadcast "maintenance at noon"

Each line of output is `<event id> <topic>`: the event id is what an SSE client would send back
as `Last-Event-ID` to resume after that message.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import trio

from mqbroker.client import Client, ClientError, connect

BROADCAST_TOPIC = "mcp/broadcast/notification"


def session_topic(session: str) -> str:
    return f"mcp/session/{session}/message"


async def publish_numbered(client: Client, session: str, count: int) -> list[str]:
    """Publish `{"n": 1..count, ...}` to the session's topic, in order; their event ids."""
    topic = session_topic(session)
    event_ids = []
    for n in range(1, count + 1):
        payload = {"n": n, "text": f"message {n} of {count}"}
        event_ids.append(await _publish(client, topic, payload))
    return event_ids


async def publish_broadcast(client: Client, text: str) -> str:
    return await _publish(client, BROADCAST_TOPIC, {"text": text})


async def _publish(client: Client, topic: str, payload: object) -> str:
    event_id = await client.publish(topic, payload)
    # An acknowledged publish always answers with the message's event id.
    assert event_id is not None
    print(event_id, topic, flush=True)
    return event_id


async def run(broker_url: str, session: str, count: int, broadcast: str | None) -> None:
    async with connect(broker_url, name="publisher") as client:
        await publish_numbered(client, session, count)
        if broadcast is not None:
            await publish_broadcast(client, broadcast)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish numbered messages to an MCP session.")
    parser.add_argument("--broker", default="ws://127.0.0.1:7878/", help="the broker's URL")
    parser.add_argument("--session", required=True, help="the session id (one topic level)")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--broadcast", metavar="TEXT", help="also broadcast this text")
    args = parser.parse_args(argv)
    status = 0
    try:
        trio.run(partial(run, args.broker, args.session, args.count, args.broadcast))
    except* KeyboardInterrupt:
        status = 130  # the shell's code for "stopped by SIGINT"
    except* (ClientError, OSError) as group:
        print(f"publisher: {_first_cause(group)}", file=sys.stderr)
        status = 1
    return status


def _first_cause(error: BaseException) -> BaseException:
    # Nested nurseries wrap what they raise in nested exception groups.
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
