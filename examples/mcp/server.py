"""An MCP server made resumable across instances with mqbroker (docs/mcp.md).

Run two of them beside one broker, and a client cut mid-call resumes on either:

    mqbroker serve &
    python examples/mcp/server.py --port 8001 &
    python examples/mcp/server.py --port 8002 &

The lines marked `# +` are all it takes on top of a plain MCPServer.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from mqbroker.mcp import resumable  # +

mcp = MCPServer("counter")


@mcp.tool()
async def count(ctx: Context, n: int, delay: float = 0.0) -> str:
    """Send n log notifications ("tick 1" ... "tick n"), `delay` seconds apart, then answer."""
    for i in range(1, n + 1):
        await ctx.info(f"tick {i}")
        if delay:
            await asyncio.sleep(delay)
    return f"counted to {n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--broker", default="ws://127.0.0.1:7878/")
    args = parser.parse_args()
    app = resumable(mcp, args.broker)  # +
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
