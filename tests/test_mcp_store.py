"""mqbroker.mcp's EventStore against a real broker: per-session replay, gaps said as a JSON-RPC
error, store_event that never raises nor waits, a session's events forgotten.

The store runs on asyncio (as the SDK under uvicorn does), in a thread, against a broker served
by trio in the test's own loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from mcp.server.streamable_http import EventMessage
from mcp_types import (
    JSONRPCError,
    JSONRPCMessage,
    JSONRPCNotification,
    JSONRPCResponse,
)

from mqbroker.config import Config, HistoryConfig, ServerConfig
from mqbroker.mcp import GAP_ERROR_CODE, BrokerEventStore, EventRef, StoreSettings
from mqbroker.mcp.ids import request_id
from tests.harness import free_port, running_broker

T = TypeVar("T")


def notification(text: str) -> JSONRPCMessage:
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/message",
                               params={"level": "info", "data": text})


def response(request: int, text: str) -> JSONRPCMessage:
    return JSONRPCResponse(jsonrpc="2.0", id=request, result={"text": text})


async def in_asyncio(scenario: Callable[[], Awaitable[T]]) -> T:
    return await trio.to_thread.run_sync(asyncio.run, scenario())


async def replay(store: Any, last_event_id: str) -> tuple[Any, list[EventMessage]]:
    sent: list[EventMessage] = []

    async def send(message: EventMessage) -> None:
        sent.append(message)

    async with asyncio.timeout(10):
        stream = await store.replay_events_after(last_event_id, send)
    return stream, sent


async def settled(store: BrokerEventStore) -> None:
    """Wait until every queued publish is answered (the store acknowledges in the background)."""
    async with asyncio.timeout(10):
        while store._tasks:
            await asyncio.wait(set(store._tasks))


def texts(sent: list[EventMessage]) -> list[Any]:
    out = []
    for event in sent:
        message = event.message
        if isinstance(message, JSONRPCNotification):
            out.append(message.params["data"])  # type: ignore[index]
        elif isinstance(message, JSONRPCResponse):
            out.append(("result", message.id, message.result["text"]))
        else:
            out.append(("error", message.id, message.error.code))
    return out


async def test_stream_ids_repeat_across_sessions_but_replays_never_cross() -> None:
    """Two sessions both use stream "1" (as every SDK session does): a replay from one
    session's event gives that session's events of that stream only, and another session's
    store refuses the id (replays nothing)."""
    async with running_broker() as running:
        async def scenario() -> None:
            async with BrokerEventStore(running.url) as store:
                a, b = store.session("sa"), store.session("sb")
                first_a = await a.store_event("1", notification("a1"))
                await b.store_event("1", notification("b1"))
                await a.store_event("2", notification("a-other-stream"))
                await a.store_event("1", notification("a2"))
                await b.store_event("1", notification("b2"))
                await a.store_event("1", response(1, "a-done"))
                await settled(store)
                stream, sent = await replay(a, first_a)
                assert stream is None  # the response was replayed: the stream is over
                assert texts(sent) == ["a2", ("result", 1, "a-done")]
                assert all(EventRef.parse(e.event_id or "").session == "sa" for e in sent)
                assert await replay(b, first_a) == (None, [])
                # Resuming from a replayed id goes on from there.
                assert texts((await replay(a, sent[0].event_id or ""))[1]) == [
                    ("result", 1, "a-done")]

        await in_asyncio(scenario)


async def test_a_message_over_the_broker_limit_is_a_gap_of_its_stream_only() -> None:
    """Caught before storing: a marker takes its place, so a replay of its stream answers the
    request with the gap error, and other streams replay normally."""
    config = Config(server=ServerConfig(port=0, max_frame_bytes=64 * 1024))
    async with running_broker(config) as running:
        async def scenario() -> None:
            async with BrokerEventStore(running.url) as store:
                s = store.session("s")
                first = await s.store_event("7", notification("small"))
                other = await s.store_event("8", notification("other stream"))
                await s.store_event("7", notification("x" * 100_000))
                await s.store_event("8", notification("still fine"))
                await settled(store)
                assert store.stats["omitted"] == 1
                _, sent = await replay(s, first)
                assert texts(sent) == [("error", 7, GAP_ERROR_CODE)]
                error = sent[0].message
                assert isinstance(error, JSONRPCError) and "too_large" in error.error.message
                _, sent = await replay(s, other)
                assert texts(sent) == ["still fine"]

        await in_asyncio(scenario)


async def test_store_event_never_raises_nor_waits_when_the_broker_is_away() -> None:
    """No broker at all: every store_event returns an id at once (bounded by store_wait), the
    events count as lost, and a replay answers the gap error rather than raising."""
    url = f"ws://127.0.0.1:{free_port()}/"

    async def scenario() -> None:
        settings = StoreSettings(connect_timeout=0.2, store_wait=0.1, max_in_flight=2,
                                 replay_timeout=1.0)
        store = BrokerEventStore(url, settings)
        s = store.session("s")
        started = time.monotonic()
        ids = [await s.store_event("3", notification(f"n{i}")) for i in range(5)]
        assert time.monotonic() - started < 2.0
        assert len(set(ids)) == 5
        await store.aclose()
        assert store.stats["lost"] == 5 and store.stats["stored"] == 0
        stream, sent = await replay(s, ids[0])
        assert stream is None and texts(sent) == [("error", 3, GAP_ERROR_CODE)]

    await in_asyncio(scenario)


async def test_a_hole_in_the_sequence_is_a_gap() -> None:
    """An event that was never stored (here: its publish skipped) leaves a hole in the
    session's sequence numbers; a replay across it reports the gap instead of skipping it."""
    async with running_broker() as running:
        async def scenario() -> None:
            async with BrokerEventStore(running.url) as store:
                s = store.session("s")
                first = await s.store_event("1", notification("one"))
                s._seq += 1  # an event whose publish never happened
                await s.store_event("1", notification("three"))
                await settled(store)
                _, sent = await replay(s, first)
                assert texts(sent) == [("error", 1, GAP_ERROR_CODE)]

        await in_asyncio(scenario)


async def test_a_forgotten_session_replays_as_a_gap() -> None:
    async with running_broker() as running:
        async def scenario() -> None:
            async with BrokerEventStore(running.url) as store:
                s = store.session("s")
                first = await s.store_event("1", notification("one"))
                await s.store_event("1", notification("two"))
                await settled(store)
                await store.end_session("s")
                assert not store.is_bound("s")
                _, sent = await replay(s, first)
                assert texts(sent) == [("error", 1, GAP_ERROR_CODE)]

        await in_asyncio(scenario)


async def test_a_history_trimmed_before_the_client_s_event_is_no_gap() -> None:
    """The broker dropped old events (max_messages) but everything after the client's last
    one is retained: the sequence numbers prove nothing is missing."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(max_messages=5))
    async with running_broker(config) as running:
        async def scenario() -> None:
            async with BrokerEventStore(running.url) as store:
                s = store.session("s")
                ids = [await s.store_event("1", notification(f"n{i}")) for i in range(8)]
                await settled(store)
                _, sent = await replay(s, ids[4])
                assert texts(sent) == ["n5", "n6", "n7"]
                _, sent = await replay(s, ids[0])  # n1..n2 were dropped: a gap
                assert texts(sent) == [("error", 1, GAP_ERROR_CODE)]

        await in_asyncio(scenario)


@pytest.mark.parametrize("last_event_id", ["", "1", "x.y.z.w", "...", "a" * 5000,
                                           "c2Vzc2lvbg.MQ.1.not-an-id", "é.é.1."])
async def test_ids_that_are_not_ours_replay_nothing(last_event_id: str) -> None:
    """Another store's ids, garbage and forged anchors replay nothing and raise nothing."""
    async with running_broker() as running:
        async def scenario() -> tuple[Any, list[EventMessage]]:
            async with BrokerEventStore(running.url) as store:
                return await replay(store.session("session"), last_event_id)

        stream, sent = await in_asyncio(scenario)
        assert stream is None
        assert all(isinstance(e.message, JSONRPCError) for e in sent)


@given(st.text(max_size=300))
def test_parsing_any_text_as_an_event_id_never_raises(text: str) -> None:
    ref = EventRef.parse(text)
    if ref is not None:
        assert EventRef.parse(ref.encode()) == ref


@given(st.text(min_size=1, max_size=60), st.text(max_size=60), st.integers(0, 2**63),
       st.none() | st.just("a1b2c3d4-17"))
def test_event_ids_round_trip(session: str, stream: str, seq: int, anchor: str | None) -> None:
    ref = EventRef(session, stream, seq, anchor)
    assert EventRef.parse(ref.encode()) == ref
    assert "\n" not in ref.encode() and "\r" not in ref.encode()


def test_a_stream_names_its_request_id() -> None:
    assert request_id("12") == 12 and request_id("012") == "012" and request_id("a") == "a"
