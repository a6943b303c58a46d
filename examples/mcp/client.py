"""An MCP client whose tool-call stream is cut, and resumed on another instance.

`call_cut(first, second, cut_after=k)` connects to the server at `first`, calls the `count`
tool, and cuts the call's SSE stream after its k-th event, as a dropped connection would. The
SDK's client then resumes with `Last-Event-ID`, and this client's HTTP transport sends that
resume to `second`, as a load balancer could. It returns what the call delivered: the ticks
(each once, in order, if nothing was lost or repeated) and the result.

    python examples/mcp/client.py http://127.0.0.1:8001/mcp http://127.0.0.1:8002/mcp 3
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
from attrs import define, field
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import LoggingMessageNotificationParams


@define
class Outcome:
    ticks: list[Any] = field(factory=list)
    result: str | None = None
    #: How many resumes went to the second instance.
    resumes: int = 0


class _CutStream(httpx2.AsyncByteStream):
    """A response body that ends in a read error after its `events`-th SSE event."""

    def __init__(self, inner: httpx2.AsyncByteStream, events: int) -> None:
        self.inner, self.events = inner, events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.inner:
            while chunk:
                end = _event_end(chunk)
                if end == -1:
                    yield chunk
                    break
                yield chunk[:end]
                chunk = chunk[end:]
                seen += 1
                if seen >= self.events:
                    raise httpx2.ReadError("cut by the example (a dropped connection)")

    async def aclose(self) -> None:
        await self.inner.aclose()


def _event_end(chunk: bytes) -> int:
    """Where the first SSE event of `chunk` ends (past its blank line), or -1. (A simplification
    that holds for the SDK's server: an event never straddles two chunks' blank line.)"""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := chunk.find(sep)) != -1]
    return min(ends, default=-1)


class CutAndMove(httpx2.AsyncBaseTransport):
    """Cuts the first tool call's SSE stream after `cut_after` events, and sends every request
    carrying `Last-Event-ID` (a resume) to `second` instead of `first`."""

    def __init__(self, first: str, second: str, cut_after: int, outcome: Outcome) -> None:
        self.first, self.second = httpx2.URL(first), httpx2.URL(second)
        self.cut_after, self.outcome = cut_after, outcome
        self.inner = httpx2.AsyncHTTPTransport()
        self.cut = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if "last-event-id" in request.headers:
            self.outcome.resumes += 1
            request.url = request.url.copy_with(host=self.second.host, port=self.second.port)
        response = await self.inner.handle_async_request(request)
        if (not self.cut and request.method == "POST" and b"tools/call" in request.content
                and response.headers.get("content-type", "").startswith("text/event-stream")):
            self.cut = True
            assert isinstance(response.stream, httpx2.AsyncByteStream)
            response.stream = _CutStream(response.stream, self.cut_after)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def call_cut(first: str, second: str, *, cut_after: int, n: int = 5,
                   delay: float = 0.0) -> Outcome:
    """Call `count(n, delay)` on `first`, cut after `cut_after` SSE events, resume on `second`."""
    outcome = Outcome()

    async def collect(params: LoggingMessageNotificationParams) -> None:
        outcome.ticks.append(params.data)

    transport = CutAndMove(first, second, cut_after, outcome)
    async with (httpx2.AsyncClient(transport=transport, timeout=30) as http,
                streamable_http_client(first, http_client=http) as (read, write),
                ClientSession(read, write, logging_callback=collect) as session):
        await session.initialize()
        result = await session.call_tool("count", {"n": n, "delay": delay})
        outcome.result = result.content[0].text if result.content else None  # type: ignore[union-attr]
        if result.is_error:
            outcome.result = f"error: {outcome.result}"
    return outcome


if __name__ == "__main__":
    print(anyio.run(lambda: call_cut(sys.argv[1], sys.argv[2], cut_after=int(sys.argv[3]))))
