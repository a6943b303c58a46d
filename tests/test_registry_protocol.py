"""The session registry over the wire: every `session_*` op, every error, user scoping and
batches, against a real broker over real sockets (the memory store), as docs/protocol.md
("Sessions") and docs/sessions.md describe them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import pytest

from mqbroker.config import Config, HistoryConfig, ServerConfig, SessionsConfig
from mqbroker.protocol import (
    Delivery,
    Ended,
    Error,
    Ping,
    Pong,
    PubAck,
    Publish,
    ServerEvent,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionTouch,
    SessionUpdate,
    SubAck,
    Subscribe,
)
from mqbroker.registry import MAX_SESSION_BATCH
from tests.harness import RawSession, RunningBroker, raw_session, running_broker


def sessions_config(**sessions: Any) -> Config:
    return Config(server=ServerConfig(port=0), sessions=SessionsConfig(**sessions),
                  history=HistoryConfig(record=("mcp/session/#",)))


@asynccontextmanager
async def registry(**sessions: Any) -> AsyncIterator[tuple[RunningBroker, RawSession]]:
    async with running_broker(sessions_config(**sessions)) as broker, \
            raw_session(broker.url) as session:
        yield broker, session


async def answer(session: RawSession, event: Any) -> ServerEvent:
    """Send one request; the next event that is not a delivery."""
    await session.send(event)
    return await reply_of(session)


async def reply_of(session: RawSession) -> ServerEvent:
    while True:
        event = await session.next_event()
        if type(event) not in (Delivery, Ended):
            return event


def records(reply: ServerEvent) -> tuple[Any, ...]:
    assert isinstance(reply, SessionReply), reply
    return reply.sessions


def only(reply: ServerEvent) -> dict[str, Any]:
    (record,) = records(reply)
    assert record is not None
    return record


async def create(raw: RawSession, id: int = 1, **fields: Any) -> dict[str, Any]:
    return only(await answer(raw, SessionCreate(id=id, **fields)))


# --- each op ---------------------------------------------------------------------------------


async def test_create_makes_an_id_and_answers_the_record() -> None:
    """Without `session`, the broker makes an unguessable id; the record carries the user, the
    state (pending by default), the default TTL and version 1, and the reply names the op."""
    async with registry(default_ttl=60.0) as (_, session):
        before = time.time()
        reply = await answer(session, SessionCreate(id=7, user="u1"))
        assert isinstance(reply, SessionReply)
        assert (reply.id, reply.ref, reply.next) == (7, "session_create", None)
        record = only(reply)
        assert len(record["id"]) >= 20
        assert (record["user"], record["state"], record["ttl"], record["version"]) == (
            "u1", "pending", 60.0, 1)
        assert record["metadata"] == {}
        assert before <= record["created"] == record["updated"] <= time.time()
        assert record["expires"] == pytest.approx(record["created"] + 60.0)
        other = await create(session, 8, user="u1")
        assert other["id"] != record["id"]


async def test_create_with_every_field_and_an_id_taken() -> None:
    """A given id, state active, a TTL and metadata are kept; the same id again (whoever asks)
    is `session_exists`."""
    async with registry() as (_, session):
        record = await create(session, session="s-1", user="u1", state="active", ttl=5.0,
                              metadata={"client": "cli", "n": [1, 2]})
        assert (record["id"], record["state"], record["ttl"]) == ("s-1", "active", 5.0)
        assert record["metadata"] == {"client": "cli", "n": [1, 2]}
        again = await answer(session, SessionCreate(id=2, session="s-1", user="u2"))
        assert isinstance(again, Error)
        assert (again.code, again.id, again.ref) == ("session_exists", 2, "session_create")


async def test_get_is_a_batch_scoped_by_user() -> None:
    """`session_get` answers in the order asked, null for an unknown id and for another user's
    session: a session id alone is not enough."""
    async with registry() as (_, session):
        await create(session, session="a", user="u1")
        await create(session, 2, session="b", user="u2")
        reply = await answer(session, SessionGet(id=3, sessions=("b", "zz", "a"), user="u1"))
        found = records(reply)
        assert found[0] is None and found[1] is None
        assert found[2] is not None and found[2]["id"] == "a"


async def test_touch_extends_live_sessions_and_bounds_the_ttl() -> None:
    """A touch sets expires = now + ttl (its own ttl, or the one given, kept from then on),
    one more version; an ended or absent session answers null; a TTL over max_ttl is
    `bad_event`."""
    async with registry(max_ttl=100.0) as (_, session):
        first = await create(session, session="a", user="u", ttl=10.0)
        await create(session, 2, session="gone", user="u")
        await answer(session, SessionUpdate(id=3, session="gone", user="u", state="invalidated"))
        reply = await answer(session, SessionTouch(id=4, sessions=("a", "gone", "x"), user="u",
                                                   ttl=50.0))
        touched, ended, absent = records(reply)
        assert ended is None and absent is None
        assert touched["ttl"] == 50.0 and touched["version"] == 2
        assert touched["expires"] == pytest.approx(touched["updated"] + 50.0)
        assert touched["expires"] > first["expires"]
        over = await answer(session, SessionTouch(id=5, sessions=("a",), user="u", ttl=101.0))
        assert isinstance(over, Error) and over.code == "bad_event" and "max_ttl" in over.message


async def test_update_follows_the_states_and_versions() -> None:
    """pending -> active -> suspended -> active; an illegal step is `illegal_transition`; a
    stale `version` is `version_conflict`; metadata is replaced whole; `expired` is the
    reaper's alone, and an update changing nothing is refused (`bad_event`)."""
    async with registry() as (_, session):
        await create(session, session="a", user="u", metadata={"k": 1})
        steps = ["active", "suspended", "active"]
        for n, state in enumerate(steps, start=2):
            record = only(await answer(session, SessionUpdate(id=n, session="a", user="u",
                                                              state=state, version=n - 1)))
            assert (record["state"], record["version"]) == (state, n)
        illegal = await answer(session, SessionUpdate(id=9, session="a", user="u",
                                                      state="pending"))
        assert isinstance(illegal, Error) and illegal.code == "illegal_transition"
        stale = await answer(session, SessionUpdate(id=10, session="a", user="u",
                                                    metadata={"k": 2}, version=1))
        assert isinstance(stale, Error) and stale.code == "version_conflict"
        record = only(await answer(session, SessionUpdate(id=11, session="a", user="u",
                                                          metadata={"j": 3}, version=4)))
        assert record["metadata"] == {"j": 3} and record["state"] == "active"
        for n, bad in enumerate([SessionUpdate(id=0, session="a", user="u", state="expired"),
                                 SessionUpdate(id=0, session="a", user="u")], start=12):
            refused = await answer(session, attrs.evolve(bad, id=n))
            assert isinstance(refused, Error) and refused.code == "bad_event", refused
        missing = await answer(session, SessionUpdate(id=20, session="a", user="other",
                                                      state="suspended"))
        assert isinstance(missing, Error) and missing.code == "session_not_found"


async def test_delete_answers_the_record_once() -> None:
    """`session_delete` answers the record it removed; after it, get answers null and a second
    delete is `session_not_found`."""
    async with registry() as (_, session):
        await create(session, session="a", user="u")
        assert only(await answer(session, SessionDelete(id=2, session="a", user="u")))["id"] == "a"
        assert records(await answer(session, SessionGet(id=3, sessions=("a",), user="u"))) == (
            None,)
        again = await answer(session, SessionDelete(id=4, session="a", user="u"))
        assert isinstance(again, Error) and again.code == "session_not_found"


async def test_list_pages_in_id_order_by_user_and_state() -> None:
    """Pages of `limit` in id order with `next` until the last; filtered by user and state;
    in anonymous mode no user (or "*") lists every user's sessions."""
    async with registry(max_page=3) as (_, session):
        for n in range(7):
            await create(session, n + 1, session=f"s{n}", user="u" if n < 5 else "v",
                         state="active" if n % 2 else "pending")
        seen: list[str] = []
        after = None
        for n in range(10):
            reply = await answer(session, SessionList(id=100 + n, user="u", after=after))
            assert isinstance(reply, SessionReply)
            assert len(reply.sessions) <= 3
            seen += [r["id"] for r in reply.sessions]
            after = reply.next
            if after is None:
                break
        assert seen == ["s0", "s1", "s2", "s3", "s4"]
        active = records(await answer(session, SessionList(id=200, state="active", limit=3)))
        assert [r["id"] for r in active] == ["s1", "s3", "s5"]
        every = records(await answer(session, SessionList(id=201, user="*", after="s4")))
        assert [r["id"] for r in every] == ["s5", "s6"]
        over = await answer(session, SessionList(id=202, limit=4))
        assert isinstance(over, Error) and over.code == "bad_event" and "max_page" in over.message


async def test_a_page_of_large_metadata_is_cut_to_fit_a_frame() -> None:
    """A list page whose records would exceed half a frame is cut, its `next` resuming right
    after the last record sent, so that listing never sends an oversized frame."""
    config = attrs.evolve(sessions_config(max_metadata_bytes=60_000),
                          server=ServerConfig(port=0, max_frame_bytes=131072))
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        for n in range(5):
            await create(session, n + 1, session=f"s{n}", user="u", metadata={"x": "y" * 50_000})
        reply = await answer(session, SessionList(id=10, user="u", limit=5))
        assert isinstance(reply, SessionReply)
        assert 1 <= len(reply.sessions) < 5
        assert reply.next == reply.sessions[-1]["id"]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    SessionCreate(id=1), SessionGet(id=1, sessions=("a",)), SessionTouch(id=1, sessions=("a",)),
    SessionUpdate(id=1, session="a", state="active"), SessionDelete(id=1, session="a"),
], ids=lambda r: r.OP)
async def test_anonymous_mode_needs_a_user(request_: Any) -> None:
    """In anonymous mode (trusted) `user` is still required on every op but list: a session id
    alone is never enough."""
    async with registry() as (_, session):
        refused = await answer(session, request_)
        assert isinstance(refused, Error)
        assert (refused.code, refused.id, refused.ref) == ("bad_event", 1, request_.OP)
        assert "user" in refused.message


#: Frames (JSON) whose one event the broker refuses with bad_event, keeping the session open.
GARBAGE = [
    {"op": "session_create", "id": 1, "user": 5},
    {"op": "session_create", "id": 1, "user": ""},
    {"op": "session_create", "id": 1, "user": "u" * 257},
    {"op": "session_create", "id": 1, "user": "*"},
    {"op": "session_create", "id": 1, "user": "u", "session": "has/slash"},
    {"op": "session_create", "id": 1, "user": "u", "session": "+"},
    {"op": "session_create", "id": 1, "user": "u", "session": ""},
    {"op": "session_create", "id": 1, "user": "u", "session": "x" * 129},
    {"op": "session_create", "id": 1, "user": "u", "session": 12},
    {"op": "session_create", "id": 1, "user": "u", "ttl": -1},
    {"op": "session_create", "id": 1, "user": "u", "ttl": 0},
    {"op": "session_create", "id": 1, "user": "u", "ttl": "10"},
    {"op": "session_create", "id": 1, "user": "u", "ttl": 1e300},
    {"op": "session_create", "id": 1, "user": "u", "state": "suspended"},
    {"op": "session_create", "id": 1, "user": "u", "state": "ACTIVE"},
    {"op": "session_create", "id": 1, "user": "u", "state": 1},
    {"op": "session_create", "id": 1, "user": "u", "metadata": [1, 2]},
    {"op": "session_create", "id": 1, "user": "u", "metadata": "text"},
    {"op": "session_create", "id": 1, "user": "u", "metadata": {"$base64": "AAAA"}},
    {"op": "session_create", "id": -1, "user": "u"},
    {"op": "session_create", "user": "u"},
    {"op": "session_get", "id": 1, "user": "u"},
    {"op": "session_get", "id": 1, "user": "u", "sessions": []},
    {"op": "session_get", "id": 1, "user": "u", "sessions": "a"},
    {"op": "session_get", "id": 1, "user": "u", "sessions": ["a", None]},
    {"op": "session_get", "id": 1, "user": "u", "sessions": ["a", ["b"]]},
    {"op": "session_get", "id": 1, "user": "u", "sessions": ["a/b"]},
    {"op": "session_get", "id": 1, "user": "u",
     "sessions": [f"s{n}" for n in range(MAX_SESSION_BATCH + 1)]},
    {"op": "session_touch", "id": 1, "user": "u", "sessions": ["a"], "ttl": True},
    {"op": "session_update", "id": 1, "user": "u"},
    {"op": "session_update", "id": 1, "user": "u", "session": "a", "state": "gone"},
    {"op": "session_update", "id": 1, "user": "u", "session": "a", "version": "1"},
    {"op": "session_update", "id": 1, "user": "u", "session": "a", "metadata": {"a": 1},
     "version": 1.5},
    {"op": "session_delete", "id": 1, "user": "u", "session": None},
    {"op": "session_delete", "id": 1, "user": {"a": 1}, "session": "a"},
    {"op": "session_list", "id": 1, "state": "nope"},
    {"op": "session_list", "id": 1, "limit": 0},
    {"op": "session_list", "id": 1, "limit": -5},
    {"op": "session_list", "id": 1, "after": "a b"},
    {"op": "session_list", "id": 1, "user": ""},
]


@pytest.mark.parametrize("event", GARBAGE, ids=lambda e: f"{e['op']}-{sorted(e)}")
async def test_garbage_in_any_field_is_bad_event_and_the_session_carries_on(
        event: dict[str, Any]) -> None:
    """Each malformed registry request is answered with `bad_event` naming the op (and the id
    when it is valid); nothing is stored, and the session goes on (a ping is answered)."""
    import json

    async with registry() as (broker, session):
        await session.send_frame(json.dumps(event))
        refused = await reply_of(session)
        assert isinstance(refused, Error), refused
        assert refused.code == "bad_event", refused
        assert refused.ref == event["op"]
        assert refused.id == (1 if event.get("id") == 1 else None)
        assert await answer(session, Ping(id=99)) == Pong(id=99)
        assert broker.broker.registry is not None
        page = await broker.broker.registry.store.list()
        assert not page.records


async def test_metadata_over_the_limit_or_not_a_string_keyed_map_is_refused() -> None:
    """Metadata is bounded by max_metadata_bytes (packed) and must be a map with string keys
    that any session can receive; a msgpack frame with integer keys is refused whole (the
    codec's `bad_frame`, before the registry sees it)."""
    async with registry(max_metadata_bytes=1000) as (_, session):
        huge = await answer(session, SessionCreate(id=1, user="u", metadata={"x": "y" * 1000}))
        assert isinstance(huge, Error) and "max_metadata_bytes" in huge.message
        frame = msgpack.packb({"op": "session_create", "id": 2, "user": "u",
                               "metadata": {1: "integer key"}})
        await session.send_frame(frame)
        refused = await reply_of(session)
        assert isinstance(refused, Error) and refused.code == "bad_frame"
        assert "key" in refused.message
        just = await create(session, 3, user="u", metadata={"x": "y" * 900})
        assert len(just["metadata"]["x"]) == 900


async def test_a_huge_metadata_frame_does_not_disturb_other_sessions() -> None:
    """A frame near max_frame_bytes of metadata is refused for its size; another session's
    requests are answered meanwhile and after."""
    async with registry() as (broker, session), raw_session(broker.url) as other:
        await session.send(SessionCreate(id=1, user="u", metadata={"x": "y" * 1_000_000}))
        await other.send(SessionCreate(id=1, user="v"))
        assert only(await reply_of(other))["user"] == "v"
        refused = await reply_of(session)
        assert isinstance(refused, Error) and refused.code == "bad_event"


async def test_requests_pipelined_in_one_frame_are_answered_in_order() -> None:
    """Registry requests are answered in the order they were sent, among themselves."""
    async with registry() as (_, session):
        await session.send(SessionCreate(id=1, session="a", user="u"),
                           SessionUpdate(id=2, session="a", user="u", state="active"),
                           SessionGet(id=3, sessions=("a",), user="u"),
                           SessionDelete(id=4, session="a", user="u"),
                           SessionGet(id=5, sessions=("a",), user="u"))
        replies = [await reply_of(session) for _ in range(5)]
        assert [r.id for r in replies] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
        assert records(replies[2])[0]["state"] == "active"
        assert records(replies[4]) == (None,)


async def test_clients_may_not_publish_on_lifecycle_or_presence_topics() -> None:
    """`{prefix}/{id}/lifecycle` and `.../presence` are the broker's: a publish there is
    `reserved_topic` (every time, never cached as valid); deeper topics and subscribing are
    fine."""
    async with registry() as (broker, session):
        for n, topic in enumerate(["mcp/session/a/lifecycle", "mcp/session/a/presence",
                                   "mcp/session/a/lifecycle"], start=1):
            refused = await answer(session, Publish(id=n, topic=topic, payload=1))
            assert isinstance(refused, Error), refused
            assert (refused.code, refused.id) == ("reserved_topic", n)
        assert broker.broker.counters["reserved_topic_refused"] == 3
        for n, topic in enumerate(["mcp/session/a/lifecycle/x", "mcp/session/lifecycle",
                                   "other/a/lifecycle"], start=10):
            assert isinstance(await answer(session, Publish(id=n, topic=topic)), PubAck)
        assert await answer(session, Subscribe(id=20, filter="mcp/session/a/lifecycle")) == \
            SubAck(id=20)
