"""mqbroker.mcp with the session registry and presence, end to end: two examples/mcp/server.py
instances (uvicorn processes), a broker, and the MCP SDK's client. A session is registered
while its SDK session lives (its owner named) and deleted when the SDK ends it; a resume of a
session the registry does not know, or no longer knows, is a 404; an owner killed (SIGKILL) mid
tool call makes the stream resumed on the other instance end with the gap error within
presence_ttl, instead of waiting until the client gives up."""

from __future__ import annotations

import signal
import threading
import time
from functools import partial
from typing import Any

import anyio
import httpx2
import trio
from hypothesis import given
from hypothesis import strategies as st
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import LoggingMessageNotificationParams

from mqbroker.client import Message, connect
from mqbroker.config import SessionsConfig
from mqbroker.mcp import GAP_ERROR_CODE, EventRef
from mqbroker.mcp.registry import ANONYMOUS_USER, CLIENT_PREFIX, Owner, is_leave_of
from tests.test_mcp_example import broker_of, example_client, mcp_server_processes, mcp_servers

#: Short, so that a dead owner's entries would run out fast (the test's bound is this).
PRESENCE_TTL = 3.0
HEADERS = {"accept": "text/event-stream", "mcp-protocol-version": "2025-11-25"}


class SessionIds(httpx2.AsyncBaseTransport):
    """Records the session id the server gives (the mcp-session-id of its answers)."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.session: str | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        self.session = response.headers.get("mcp-session-id", self.session)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def resume(url: str, session: str, last: str) -> tuple[int, str]:
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.get(url, headers={**HEADERS, "mcp-session-id": session,
                                                "last-event-id": last})
        return response.status_code, response.text


async def call_then_end(url: str, second: str) -> dict[str, Any]:
    """Open a session on `url`, call the tool, resume its call stream on `second` while the
    session lives, end the session (the client's DELETE), and resume it again."""
    ids = SessionIds()
    async with (httpx2.AsyncClient(transport=ids, timeout=30) as http,
                streamable_http_client(url, http_client=http) as (read, write),
                ClientSession(read, write) as session):
        await session.initialize()
        await session.call_tool("count", {"n": 2})
        assert ids.session is not None
        # The call is request 2 (initialize is 1): its stream "2", resumed after the
        # session's first event.
        last = EventRef(ids.session, "2", 1, None).encode()
        live = await resume(second, ids.session, last)
    ended = await resume(second, ids.session, last)
    return {"session": ids.session, "live": live, "ended": ended}


async def test_a_resume_of_an_unknown_or_deleted_session_is_a_404() -> None:
    """The registry decides on any instance: a well-formed id of a session nobody opened is a
    404 (before the registry it was replayed); the same resume of a real session is served
    while the session lives (the other instance replays its call), and a 404 once the SDK
    ended it (the session deleted from the registry)."""
    async with broker_of("memory") as broker_url, mcp_servers(broker_url) as (first, second):
        unknown = EventRef("nobody-opened-this", "1", 1, None).encode()
        with trio.fail_after(60):
            status, body = await trio.to_thread.run_sync(
                anyio.run, partial(resume, second, "nobody-opened-this", unknown))
            outcome = await trio.to_thread.run_sync(anyio.run, call_then_end, first, second)
        assert status == 404 and "Session not found" in body
        status, body = outcome["live"]
        assert status == 200 and "counted to 2" in body
        assert outcome["ended"][0] == 404
        async with connect(broker_url) as broker:
            assert await broker.get_sessions([outcome["session"]],
                                             user=ANONYMOUS_USER) == [None]


async def test_a_session_is_registered_with_its_owner_and_its_owner_is_present() -> None:
    """While the SDK session lives, the registry names its owner (instance and client name)
    and the owner's broker connection is present in the session."""
    async with broker_of("memory") as broker_url, mcp_servers(broker_url) as (first, _):

        async def opened() -> str:
            ids = SessionIds()
            async with (httpx2.AsyncClient(transport=ids, timeout=30) as http,
                        streamable_http_client(first, http_client=http,
                                               terminate_on_close=False) as (read, write),
                        ClientSession(read, write) as session):
                await session.initialize()
            assert ids.session is not None
            return ids.session

        async with connect(broker_url) as broker:
            joins = await broker.subscribe("mcp/session/+/presence")
            with trio.fail_after(60):
                session = await trio.to_thread.run_sync(anyio.run, opened)
                record = await broker.get_session(session, user=ANONYMOUS_USER)
                join = await anext(aiter(joins))  # written by the presence task soon after
            entries = await broker.presence(session)
        assert record.state == "active" and record.metadata["present"] is True
        client = record.metadata["client"]
        assert client == CLIENT_PREFIX + record.metadata["instance"]
        assert isinstance(join, Message)
        assert join.payload["event"] == "join" and join.payload["client"] == client
        assert [entry.client for entry in entries] == [client]


async def test_an_owner_killed_mid_call_ends_the_resumed_stream_with_the_gap_error() -> None:
    """The call's stream is cut on instance A and resumed on B, which follows it live; A is
    then killed (SIGKILL) mid call. B sees A's presence leave the session and answers the
    resumed request with the gap error within presence_ttl of the kill, every tick it did
    deliver once and in order, instead of following a stream nobody will ever finish."""
    example = example_client()
    sessions = SessionsConfig(presence_ttl=PRESENCE_TTL)
    async with (broker_of("memory", sessions) as broker_url,
                mcp_server_processes(broker_url) as servers):
        (first, owner), (second, _) = servers
        ticks: list[Any] = []
        outcome: dict[str, Any] = {}
        live = threading.Event()

        async def call() -> None:
            async def collect(params: LoggingMessageNotificationParams) -> None:
                ticks.append(params.data)
                if len(ticks) == 10:  # past the cut (after 3 events): followed live on B
                    live.set()

            transport = example.CutAndMove(first, second, 3, example.Outcome())
            async with (httpx2.AsyncClient(transport=transport, timeout=60) as http,
                        streamable_http_client(first, http_client=http,
                                               terminate_on_close=False) as (read, write),
                        ClientSession(read, write, logging_callback=collect) as session):
                await session.initialize()
                try:
                    await session.call_tool("count", {"n": 400, "delay": 0.05})
                except MCPError as e:
                    outcome["error"], outcome["at"] = e, time.monotonic()
                outcome["resumes"] = transport.outcome.resumes

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, anyio.run, call)
            with trio.fail_after(30):
                await trio.to_thread.run_sync(live.wait, abandon_on_cancel=True)
            owner.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with trio.fail_after(30):
                await trio.to_thread.run_sync(owner.wait)
        error = outcome.get("error")
        assert error is not None, outcome
        assert error.code == GAP_ERROR_CODE and "owner" in error.data["reason"]
        latency = outcome["at"] - killed
        print(f"the gap error came {latency:.2f} s after the owner's SIGKILL")
        assert latency < PRESENCE_TTL
        assert outcome["resumes"] == 1
        assert ticks == [f"tick {i}" for i in range(1, len(ticks) + 1)]


@given(st.dictionaries(st.sampled_from(["instance", "client", "present", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                                 st.lists(st.integers(), max_size=2))))
def test_a_record_names_an_owner_only_with_well_typed_metadata(metadata: dict[str, Any]) -> None:
    """Anyone with registry rights can write a record's metadata: an owner is read from it
    only when `instance` and `client` are strings and `present` is true; anything else names
    no owner (no presence is watched), and nothing raises."""
    owner = Owner.from_metadata(metadata)
    wellformed = (isinstance(metadata.get("instance"), str)
                  and isinstance(metadata.get("client"), str) and metadata.get("present") is True)
    assert (owner is not None) == wellformed
    assert Owner.from_metadata(Owner.of("a1").metadata(present=True)) == Owner.of("a1")
    assert Owner.from_metadata(Owner.of("a1").metadata(present=False)) is None


def test_only_a_leave_of_the_owner_s_client_counts() -> None:
    owner = Owner.of("a1")
    leave = {"event": "leave", "client": owner.client, "reason": "closed"}
    assert is_leave_of(leave, owner)
    assert not is_leave_of({**leave, "event": "join"}, owner)
    assert not is_leave_of({**leave, "client": "mqbroker.mcp/b2"}, owner)
    assert not any(is_leave_of(garbage, owner) for garbage in (None, 3, "leave", [leave], {}))
