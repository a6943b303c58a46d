"""An MCP server made resumable across instances with mqbroker (docs/mcp.md).

Run two of them beside one broker, and a client cut mid-call resumes on either:

    mqbroker serve &
    PORT=8001 python examples/mcp/server.py &
    PORT=8002 python examples/mcp/server.py &

The lines marked `# +` are all it takes on top of a plain MCPServer (MQBROKER_URL: the broker,
by default ws://127.0.0.1:7878/).
"""

import asyncio
import os

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


app = resumable(mcp, os.environ.get("MQBROKER_URL", "ws://127.0.0.1:7878/"))  # +

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8001")),
                log_level="warning")
