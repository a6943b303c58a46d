"""Presence over real sockets: a broker serving presence as the daemon does, real clients (trio
and asyncio) and raw sessions. Join and leave events reach the session's presence topic, the
`presence` query answers who is there, authorization guards it, and hostile clients (garbage
queries, thousands of session ids, churn) neither crash the broker nor disturb anyone else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from mqbroker.auth import token_hash
from mqbroker.client import BrokerError, Message, ProtocolViolation, Unavailable, aio, connect
from mqbroker.config import (
    AuthConfig,
    Config,
    LimitsConfig,
    RoleConfig,
    ServerConfig,
    TokenConfig,
)
from mqbroker.protocol import (
    Error,
    Format,
    Ping,
    Pong,
    Presence,
    Present,
    Subscribe,
    Unsubscribe,
)
from mqbroker.server.presence import ANNOUNCE_BATCH
from mqbroker.sessions import PresenceEntry
from tests.harness import RunningBroker, raw_session, running_broker, tcp_proxy

TOPIC = "mcp/session/S/message"
PRESENCE = "mcp/session/S/presence"
WAIT = 10


@asynccontextmanager
async def presence_broker(config: Config | None = None) -> AsyncIterator[RunningBroker]:
    async with running_broker(config or Config(server=ServerConfig(port=0)), presence=True,
                              instance_id="i1") as broker:
        yield broker


async def next_event(subscription: Any) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        item = await subscription.__anext__()
    assert isinstance(item, Message), item
    assert isinstance(item.payload, dict)
    return item.payload


async def present(client: Any, session: str, count: int) -> list[PresenceEntry]:
    """The query's answer once it has `count` entries (the store is written just after the
    subscribe is acknowledged, by the presence task)."""
    with trio.fail_after(WAIT):
        while len(entries := await client.presence(session)) != count:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return entries


async def test_join_query_unsubscribe_and_close() -> None:
    """The polite paths, end to end: a subscription joins (an event and an entry with the
    hello's client name), the last unsubscribe leaves at once (unsubscribed), and so does a
    close (closed)."""
    async with presence_broker() as broker, connect(broker.url, name="watcher") as watcher:
        events = await watcher.subscribe(PRESENCE)
        async with connect(broker.url, name="mcp-server/1.4") as member:
            sub = await member.subscribe(TOPIC)
            join = await next_event(events)
            assert join["event"] == "join" and join["client"] == "mcp-server/1.4"
            assert (join["session"], join["instance"], join["principal"]) == ("S", "i1", None)
            (entry,) = await present(watcher, "S", 1)
            assert entry == PresenceEntry(session="S", instance="i1",
                                          connection=join["connection"],
                                          client="mcp-server/1.4", expires=entry.expires)
            await sub.unsubscribe()
            leave = await next_event(events)
            assert (leave["event"], leave["reason"]) == ("leave", "unsubscribed")
            assert await watcher.presence("S") == []
            await member.subscribe(TOPIC)
            assert (await next_event(events))["event"] == "join"
        leave = await next_event(events)
        assert (leave["event"], leave["reason"]) == ("leave", "closed")
        assert await watcher.presence("S") == []


async def test_a_connection_cut_without_a_close_leaves() -> None:
    """The client's TCP connection is cut (no close frame): its instance notices and the entry
    leaves at once, reason closed."""
    async with presence_broker() as broker, connect(broker.url) as watcher, \
            tcp_proxy(broker.listener.port) as proxy:
        events = await watcher.subscribe(PRESENCE)
        async with raw_session(f"ws://127.0.0.1:{proxy.port}/") as member:
            await member.send(Subscribe(id=1, filter=TOPIC))
            await member.receive()
            assert (await next_event(events))["event"] == "join"
            await proxy.cut()
            leave = await next_event(events)
            assert (leave["event"], leave["reason"]) == ("leave", "closed")
        assert await watcher.presence("S") == []


async def test_the_query_over_the_wire_in_json() -> None:
    """The `present` reply as docs/protocol.md shows it, and the errors of the query."""
    async with presence_broker() as broker, raw_session(broker.url, fmt=Format.JSON) as raw:
        await raw.send(Subscribe(id=1, filter=TOPIC), Presence(id=2, session="nobody"),
                       Presence(id=3, session="x" * 200), Presence(id=4, session="a/b"))
        answers = [await raw.next_event() for _ in range(4)]
        assert answers[1] == Present(id=2, entries=())
        for answer, request_id in zip(answers[2:], (3, 4), strict=True):
            assert isinstance(answer, Error) and answer.code == "bad_event"
            assert (answer.id, answer.ref) == (request_id, "presence")
        await raw.send(Presence(id=5, session="S"))
        with trio.fail_after(WAIT):
            while True:
                (answer,) = await raw.receive()
                assert isinstance(answer, Present)
                if answer.entries:
                    break
                await trio.sleep(0.01)
                await raw.send(Presence(id=5, session="S"))
        (entry,) = answer.entries
        assert sorted(entry) == ["client", "connection", "expires", "instance", "principal"]
        assert (entry["client"], entry["principal"], entry["instance"]) == ("raw", None, "i1")


@pytest.mark.parametrize("frame", [
    '{"op": "presence", "id": 1}',
    '{"op": "presence", "id": 1, "session": 7}',
    '{"op": "presence", "id": 1, "session": ["S"]}',
    '{"op": "presence", "session": "S"}',
    '{"op": "presence", "id": -1, "session": "S"}',
    '{"op": "present", "id": 1, "entries": []}',
])
async def test_malformed_queries_are_refused_and_the_session_goes_on(frame: str) -> None:
    async with presence_broker() as broker, raw_session(broker.url, fmt=Format.JSON) as raw:
        await raw.send_frame(frame)
        (error,) = await raw.receive()
        assert isinstance(error, Error) and error.code in ("bad_event", "unknown_op")
        await raw.send(Ping(id=9))
        assert await raw.receive() == [Pong(id=9)]


async def test_queries_count_towards_the_request_rate_limit() -> None:
    """`presence` is a request like `subscribe`: past requests_per_second it is answered
    rate_limited, not carried out."""
    config = Config(server=ServerConfig(port=0),
                    limits=LimitsConfig(requests_per_second=1.0, requests_burst=2.0))
    async with presence_broker(config) as broker, raw_session(broker.url) as raw:
        await raw.send(*(Presence(id=n, session="S") for n in range(3)))
        answers = [await raw.next_event() for _ in range(3)]
        assert [type(a).__name__ for a in answers] == ["Present", "Present", "Error"]
        assert isinstance(answers[2], Error) and (answers[2].code, answers[2].id) == (
            "rate_limited", 2)


async def test_a_huge_session_id_is_refused_with_a_short_message() -> None:
    async with presence_broker() as broker, raw_session(broker.url) as raw:
        await raw.send(Presence(id=1, session="s" * 500_000))
        (error,) = await raw.receive()
        assert isinstance(error, Error) and error.code == "bad_event"
        assert len(error.message) < 300


async def test_without_presence_the_query_is_unavailable() -> None:
    async with running_broker() as broker, connect(broker.url) as client:
        with pytest.raises(Unavailable):
            await client.presence("S")
        with pytest.raises(ProtocolViolation):  # bad_event, checked before
            await client.presence("not/an/id")


async def test_the_asyncio_client_queries_presence() -> None:
    """asyncio's client has the same `presence` (mqbroker.client.operations)."""
    async with presence_broker() as broker, connect(broker.url) as member:
        await member.subscribe(TOPIC)
        url = broker.url

        async def scenario() -> list[PresenceEntry]:
            async with aio.connect(url, name="aio") as client:
                async with asyncio.timeout(WAIT):
                    while not (entries := await client.presence("S")):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    return entries

        (entry,) = await trio.to_thread.run_sync(asyncio.run, scenario())
        assert (entry.session, entry.instance) == ("S", "i1")


async def test_subscriptions_ended_with_their_session_leave_with_reason_ended() -> None:
    """The registry ends a deleted session's subscriptions: their connections leave it, reason
    ended (seen by a watcher of every session's presence, whose own subscription lies outside
    the ended session's topics)."""
    async with presence_broker() as broker, connect(broker.url) as watcher, \
            connect(broker.url) as member:
        events = await watcher.subscribe("mcp/session/+/presence")
        await member.create_session(session="S", user="u")
        await member.subscribe(TOPIC)
        assert (await next_event(events))["event"] == "join"
        await member.delete_session("S", user="u")
        leave = await next_event(events)
        assert (leave["event"], leave["session"], leave["reason"]) == ("leave", "S", "ended")
        assert await watcher.presence("S") == []


# --- authorization -----------------------------------------------------------------------------

TOKENS = {"alice": "token-of-alice-0123", "bob": "token-of-bob-456789",
          "admin": "token-of-admin-99999"}


def auth_config() -> Config:
    own = "mcp/session/{session}/#"
    roles = {"server": RoleConfig(publish=(own,), subscribe=(own,)),
             "admin": RoleConfig(subscribe=("#",))}
    tokens = (
        TokenConfig(sha256=token_hash(TOKENS["alice"]), principal="alice", roles=("server",),
                    sessions=("s-alice",)),
        TokenConfig(sha256=token_hash(TOKENS["bob"]), principal="bob", roles=("server",),
                    sessions=("s-bob",)),
        TokenConfig(sha256=token_hash(TOKENS["admin"]), principal="admin", roles=("admin",)),
    )
    return Config(server=ServerConfig(port=0),
                  auth=AuthConfig(mode="token", roles=roles, tokens=tokens))


async def test_only_those_who_may_subscribe_to_the_presence_topic_may_query() -> None:
    """alice sees her session's presence (her principal in the entry) but not bob's: forbidden;
    an admin subscribed to `#` sees any; bob cannot even ask about a malformed id."""
    async with presence_broker(auth_config()) as broker, \
            connect(broker.url, auth=TOKENS["alice"]) as alice, \
            connect(broker.url, auth=TOKENS["bob"]) as bob, \
            connect(broker.url, auth=TOKENS["admin"]) as admin:
        await alice.subscribe("mcp/session/s-alice/message")
        (entry,) = await present(alice, "s-alice", 1)
        assert entry.principal == "alice"
        await bob.subscribe("mcp/session/s-bob/message")
        with pytest.raises(BrokerError) as refused:
            await alice.presence("s-bob")
        assert refused.value.code == "forbidden"
        assert [e.principal for e in await present(admin, "s-bob", 1)] == ["bob"]
        assert broker.broker.counters["security_forbidden"] == 1


# --- hostile clients ---------------------------------------------------------------------------


async def test_thousands_of_session_ids_cost_bounded_batches_and_nobody_waits() -> None:
    """One client subscribes to 1000 distinct session ids (max_subscriptions) in one frame and
    leaves: every store call stays within ANNOUNCE_BATCH, all 1000 entries come and go, and
    another client's ping is answered meanwhile within a bound."""
    config = Config(server=ServerConfig(port=0))
    calls: list[int] = []
    async with presence_broker(config) as broker, connect(broker.url) as watcher:
        service = broker.broker.presence
        assert service is not None
        store = service.store  # type: ignore[attr-defined]
        announce, withdraw = store.announce, store.withdraw

        async def counted_announce(entries: Any) -> None:
            calls.append(len(entries))
            await announce(entries)

        async def counted_withdraw(keys: Any) -> None:
            calls.append(len(keys))
            await withdraw(keys)

        store.announce, store.withdraw = counted_announce, counted_withdraw
        async with raw_session(broker.url) as flood:
            await flood.send(*(Subscribe(id=n, filter=f"mcp/session/s{n}/message")
                               for n in range(1000)))
            with trio.fail_after(WAIT):
                while service.stats()["announced"] < 1000:
                    await trio.sleep(0.01)
                    with trio.fail_after(1):
                        await watcher.presence("s0")  # answered while the flood is written
        with trio.fail_after(WAIT):
            while service.stats()["announced"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert sum(calls) >= 2000 and max(calls) <= ANNOUNCE_BATCH
        assert await watcher.presence("s999") == []


async def test_churn_does_not_grow_anything() -> None:
    """A client subscribing and unsubscribing one session's topic as fast as it can: what waits
    to be written stays at one key, and when it stops, the store, the counters and the events
    agree (joins and leaves alternate, the last one a leave)."""
    seen: list[str] = []
    async with presence_broker() as broker, connect(broker.url) as watcher, \
            raw_session(broker.url) as churner, trio.open_nursery() as nursery:
        service = broker.broker.presence
        assert service is not None
        events = await watcher.subscribe(PRESENCE)

        async def collect() -> None:
            async for item in events:
                assert isinstance(item, Message)
                seen.append(item.payload["event"])

        nursery.start_soon(collect)
        for round_ in range(50):
            batch: list[Any] = []
            for n in range(100):
                sub_id = round_ * 100 + n
                batch += [Subscribe(id=sub_id, filter=TOPIC), Unsubscribe(id=sub_id)]
            await churner.send(*batch)
            assert service.stats()["pending"] <= 1
            with trio.fail_after(WAIT):
                for _ in batch:
                    await churner.next_event()
        with trio.fail_after(WAIT):
            # The last change written: nothing pending, and no join without its leave.
            while service.stats()["pending"] or (  # noqa: ASYNC110
                    service.stats()["joins"] != service.stats()["leaves"]):
                await trio.sleep(0.01)
        assert await watcher.presence("S") == []
        stats = service.stats()
        assert stats["joins"] == stats["leaves"]
        with trio.fail_after(WAIT):
            while len(seen) < 2 * stats["joins"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert seen == ["join", "leave"] * stats["joins"]
        nursery.cancel_scope.cancel()
