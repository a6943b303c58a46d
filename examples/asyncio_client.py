"""A short asyncio client: subscribe, publish, print what arrives.

Start a broker first (`mqbroker serve` listens on ws://127.0.0.1:7878/ by default), then run
`python examples/asyncio_client.py`.
"""

from __future__ import annotations

import asyncio

from mqbroker.client.aio import Gap, connect

URL = "ws://127.0.0.1:7878/"


async def main() -> None:
    async with connect(URL, name="asyncio-example") as client:
        subscription = await client.subscribe("mcp/session/+/message")
        for n in range(3):
            event_id = await client.publish("mcp/session/s1/message", {"text": f"hello {n}"})
            print("published", event_id)
        async with asyncio.timeout(5):
            for _ in range(3):
                item = await anext(subscription)
                if isinstance(item, Gap):
                    print("gap:", item.reason)
                else:
                    print("received", item.topic, item.payload, item.event_id)


if __name__ == "__main__":
    asyncio.run(main())
