"""Attacks on what issues 10, 11 and 12 added (credential refresh, the session registry,
presence, `latest`), each against a real broker over real sockets, with a healthy session
beside the attacker that must notice nothing."""

from __future__ import annotations

from typing import Any

import trio

from mqbroker.client import Message, connect
from mqbroker.config import Config, ServerConfig
from mqbroker.message import Draft
from mqbroker.protocol import (
    CloseCode,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Presence,
    Present,
    SessionCreate,
    SessionDelete,
    SessionReply,
    SubAck,
    Subscribe,
)
from mqbroker.protocol.codec import payload_size
from mqbroker.protocol.connection import MAX_CLIENT_CHARS, HandshakeFailed
from tests.harness import RunningBroker, raw_session, running_broker
from tests.rawws import BINARY, CLOSE, ProtocolSession, RawWebSocket
from tests.test_hostile import _healthy_round_trips

TOPIC = "mcp/session/S/message"
PRESENCE = "mcp/session/S/presence"
WAIT = 10


async def _hello(port: int, client: str) -> tuple[list[Any], int | None]:
    """Send a hello naming `client`; the events answered and the close code."""
    session = ProtocolSession(await RawWebSocket.open_tcp(port))
    try:
        assert await session.ws.handshake() == 101
        await session.ws.send_frame(BINARY, session.connection.hello(client))
        events: list[Any] = []
        with trio.fail_after(WAIT):
            while True:
                frame = await session.ws.read_frame()
                if frame.opcode == CLOSE:
                    return events, frame.close_code
                try:
                    events.extend(session.connection.receive(frame.payload))
                except HandshakeFailed as e:
                    events.append(e.error)
                if events and not isinstance(events[0], Error):
                    return events, None
    finally:
        session.close()


async def test_a_huge_client_name_is_refused_at_the_hello() -> None:
    """The hello's `client` ends up in every presence entry and event of the connection (one
    per session it subscribes to) and in the logs: a client named with most of a frame
    (a megabyte) could make each of its thousand joins a megabyte for every instance and every
    presence watcher. A `client` longer than MAX_CLIENT_CHARS is refused (bad_event, 4000);
    one of exactly that length is welcome, and a presence watcher beside it sees nothing
    bigger."""
    async with running_broker(Config(server=ServerConfig(port=0)), presence=True,
                              instance_id="i1") as broker:
        port = broker.listener.port
        events, code = await _hello(port, "x" * 1_000_000)
        assert code == CloseCode.HANDSHAKE_FAILED, (events, code)
        assert isinstance(events[0], Error) and events[0].code == ErrorCode.BAD_EVENT
        assert f"at most {MAX_CLIENT_CHARS}" in events[0].message
        events, code = await _hello(port, "y" * (MAX_CLIENT_CHARS + 1))
        assert code == CloseCode.HANDSHAKE_FAILED
        async with connect(broker.url) as watcher, \
                connect(broker.url, name="z" * MAX_CLIENT_CHARS) as longest:
            joins = await watcher.subscribe(PRESENCE)
            await longest.subscribe(TOPIC)
            with trio.fail_after(WAIT):
                join = await joins.__anext__()
            assert isinstance(join, Message) and isinstance(join.payload, dict)
            assert join.payload["client"] == "z" * MAX_CLIENT_CHARS
        assert broker.broker.counters["sessions_opened"] == 2


async def test_a_crowd_in_one_session_cannot_make_a_presence_answer_overflow_the_querier(
) -> None:
    """Anyone who may subscribe to a session's topics adds an entry to its presence, one per
    connection (up to max_connections per instance: 50,000 by default). The `present` answer
    listed them all in one frame: a crowd of long-named connections made it larger than the
    querier's outbox, and the healthy querier was let go as a slow consumer (4008). It is now
    cut to half a frame, like a `session_list` page, with `more: true`; the querier stays."""
    config = Config(server=ServerConfig(port=0, max_frame_bytes=8192, outbox_bytes=16384))
    async with running_broker(config, presence=True, instance_id="i1") as broker:
        port = broker.listener.port
        crowd = [await ProtocolSession.open(port, client="c" * MAX_CLIENT_CHARS)
                 for _ in range(80)]
        try:
            for member in crowd:
                await member.send(Subscribe(id=1, filter=TOPIC))
            for member in crowd:
                assert isinstance(await member.next_event(), SubAck)
            async with raw_session(broker.url) as querier:
                with trio.fail_after(WAIT):
                    while True:
                        await querier.send(Presence(id=2, session="S"))
                        answer = await querier.next_event()
                        assert isinstance(answer, Present), answer
                        if answer.more:
                            break
                        await trio.sleep(0.05)
                assert 0 < len(answer.entries) < len(crowd)
                assert payload_size(list(answer.entries)) <= config.server.max_frame_bytes // 2
                await querier.send(Ping(id=3))
                assert await querier.next_event() == Pong(id=3)
            assert broker.broker.counters["sessions_closed_slow_consumer"] == 0
        finally:
            for member in crowd:
                member.close()


async def _fill_history(broker: RunningBroker, topics: int) -> None:
    """Retain one message on each of `topics` session topics (the default max_topics is
    100,000: what a busy broker holds)."""
    history = broker.broker.history
    for start in range(0, topics, 1000):
        await history.append([
            Draft(topic=f"mcp/session/s{n}/message", payload=b"m", published_at=0.0,
                  record=True) for n in range(start, min(start + 1000, topics))])


async def test_ending_sessions_in_a_loop_does_not_starve_a_healthy_session() -> None:
    """Every session that ends has its history forgotten (`{prefix}/{id}/#`, a wildcard). The
    memory history found a wildcard's topics by testing every retained one, without yielding:
    with 100,000 retained topics each session end held the whole broker for about 0.2 s, so
    a client creating and deleting sessions in a loop (its own, no rights needed beyond that)
    left a healthy session a few round trips per second. Forgetting now visits only the
    topics under the filter's literal levels."""
    async with running_broker(Config(server=ServerConfig(port=0))) as broker:
        await _fill_history(broker, 100_000)
        port = broker.listener.port
        attacker = await ProtocolSession.open(port, client="attacker")
        ended = 0

        async def churn() -> None:
            nonlocal ended
            for n in range(1_000_000):
                await attacker.send(SessionCreate(id=2 * n, session=f"x{n}", user="mallory"),
                                    SessionDelete(id=2 * n + 1, session=f"x{n}",
                                                  user="mallory"))
                for _ in range(2):
                    answer = await attacker.next_event()
                    assert isinstance(answer, SessionReply), answer
                ended += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            await trio.sleep(0.2)
            round_trips = await _healthy_round_trips(port, 2.0)
            nursery.cancel_scope.cancel()
        attacker.close()
        assert len(round_trips) >= 100, (len(round_trips), round_trips[-5:])
        assert round_trips[len(round_trips) // 2] < 0.02, round_trips[-5:]
        assert ended >= 20, ended  # the attack ran
        assert broker.broker.history.stats()["topics"] == 100_000

