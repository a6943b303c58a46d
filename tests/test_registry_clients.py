"""The registry in both clients: typed records and errors, paging, and a subscription ended by
its session's end (SubscriptionEnded), against a real broker; the core's resend rules."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio

from mqbroker.client import (
    IllegalTransition,
    Message,
    ReservedTopic,
    SessionExists,
    SessionNotFound,
    SessionRecord,
    SubscriptionEnded,
    VersionConflict,
    aio,
    connect,
)
from mqbroker.client.core import ClientCore, Failed, Resolved
from mqbroker.client.errors import OutcomeUnknown
from mqbroker.protocol import (
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionUpdate,
    State,
    Welcome,
)
from mqbroker.sessions import SessionState
from tests.harness import running_broker
from tests.test_registry_protocol import sessions_config


async def test_the_trio_client_covers_every_registry_operation() -> None:
    """create/get/touch/update/delete/list return SessionRecord values; each broker error is
    its typed exception."""
    async with running_broker(sessions_config(max_page=2)) as broker, \
            connect(broker.url) as client:
        record = await client.create_session(user="u", metadata={"k": 1}, ttl=30)
        assert isinstance(record, SessionRecord)
        assert (record.user, record.state, record.ttl, record.version) == (
            "u", SessionState.PENDING, 30.0, 1)
        with pytest.raises(SessionExists):
            await client.create_session(session=record.id, user="v")
        assert await client.get_session(record.id, user="u") == record
        assert await client.get_sessions([record.id, "nope"], user="u") == [record, None]
        with pytest.raises(SessionNotFound):
            await client.get_session(record.id, user="someone-else")
        (touched,) = await client.touch_sessions([record.id], user="u", ttl=60)
        assert touched is not None and touched.ttl == 60.0 and touched.version == 2
        active = await client.update_session(record.id, user="u", state="active", version=2)
        assert active.state is SessionState.ACTIVE
        with pytest.raises(VersionConflict):
            await client.update_session(record.id, user="u", metadata={}, version=1)
        with pytest.raises(IllegalTransition):
            await client.update_session(record.id, user="u", state="pending")
        for n in range(4):
            await client.create_session(session=f"s{n}", user="w")
        page = await client.list_sessions_page(user="w")
        assert [r.id for r in page.records] == ["s0", "s1"] and page.next == "s1"
        assert [r.id async for r in client.list_sessions(user="w")] == ["s0", "s1", "s2", "s3"]
        assert (await client.delete_session(record.id, user="u")).id == record.id
        with pytest.raises(SessionNotFound):
            await client.delete_session(record.id, user="u")


async def test_a_trio_subscription_ends_with_its_session() -> None:
    """Deleting the session delivers the final lifecycle message, then the stream raises
    SubscriptionEnded (reason, session) and is over; the client forgets the subscription, so a
    reconnect does not re-establish it. Publishing on the lifecycle topic is ReservedTopic."""
    async with running_broker(sessions_config()) as broker, connect(broker.url) as client:
        await client.create_session(session="s", user="u")
        subscription = await client.subscribe("mcp/session/s/#")
        other = await client.subscribe("mcp/session/other/x")
        with pytest.raises(ReservedTopic):
            await client.publish("mcp/session/s/lifecycle", {"event": "deleted"})
        await client.delete_session("s", user="u")
        with trio.fail_after(5):
            item = await subscription.__anext__()
            assert isinstance(item, Message) and item.payload["event"] == "deleted"
            with pytest.raises(SubscriptionEnded) as ended:
                await subscription.__anext__()
            assert (ended.value.reason, ended.value.session) == ("session_ended", "s")
            with pytest.raises(StopAsyncIteration):
                await subscription.__anext__()
        assert subscription.id not in client.core.subscriptions
        assert other.id in client.core.subscriptions


def test_the_asyncio_client_covers_the_registry_and_ended_subscriptions() -> None:
    """The same operations and the same end of a subscription through the asyncio client."""
    with broker_thread() as url:
        asyncio.run(asyncio.wait_for(_asyncio_scenario(url), 30))


async def _asyncio_scenario(url: str) -> None:
    async with aio.connect(url, format="json") as client:
        record = await client.create_session(session="s", user="u", state="active")
        assert isinstance(record, aio.SessionRecord) and record.state is SessionState.ACTIVE
        with pytest.raises(aio.SessionExists):
            await client.create_session(session="s", user="u")
        with pytest.raises(aio.IllegalTransition):
            await client.update_session("s", user="u", state="pending")
        with pytest.raises(aio.VersionConflict):
            await client.update_session("s", user="u", metadata={"a": 1}, version=9)
        assert [r.id async for r in client.list_sessions()] == ["s"]
        subscription = await client.subscribe("mcp/session/s/message")
        await client.update_session("s", user="u", state="invalidated")
        items: list[Any] = []
        with pytest.raises(aio.SubscriptionEnded):
            async for item in subscription:
                items.append(item)
        assert items == []  # the final event was published on .../lifecycle, not subscribed
        with pytest.raises(aio.SessionNotFound):
            await client.delete_session("nope", user="u")
        assert (await client.delete_session("s", user="u")).state is SessionState.INVALIDATED


class broker_thread:
    """A broker with its registry under trio in a thread, for the asyncio client's tests."""

    def __enter__(self) -> str:
        ready: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=trio.run, args=(self._main, ready), daemon=True)
        self._thread.start()
        url = ready.get(timeout=10)
        if isinstance(url, BaseException):
            raise url
        return str(url)

    async def _main(self, ready: queue.Queue[Any]) -> None:
        try:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with running_broker(sessions_config()) as broker:
                ready.put(broker.url)
                await self._stop.wait()
        except BaseException as e:
            ready.put(e)
            raise

    def __exit__(self, *_: object) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


# --- the core -------------------------------------------------------------------------------


def _opened_core() -> ClientCore:
    core = ClientCore()
    core.open_connection()
    core.connection.welcome = Welcome(version=1, instance="i", session="c")
    core.connection.state = State.OPEN
    return core


def test_changes_are_not_resent_after_a_reconnect_and_reads_are() -> None:
    """A create, update or delete unanswered when the connection dropped fails OutcomeUnknown
    (carried out twice it would make a second session, or fail); get and list are resent."""
    core = _opened_core()
    made: dict[str, Any] = {}
    requests: list[Callable[[int], Any]] = [
        lambda id: SessionCreate(id=id, user="u"),
        lambda id: SessionUpdate(id=id, session="s", user="u", state="active"),
        lambda id: SessionDelete(id=id, session="s", user="u"),
        lambda id: SessionGet(id=id, sessions=("s",), user="u"),
        lambda id: SessionList(id=id),
    ]
    for make in requests:
        event = core.registry(make)
        made[event.OP] = event
    core.open_connection()  # the connection dropped; a new one opens
    core.connection.state = State.OPEN
    resent, outcomes = core.resume()
    assert [e.OP for e in resent] == ["session_get", "session_list"]
    failed = {o.key[0]: o.error for o in outcomes if isinstance(o, Failed)}
    assert sorted(failed) == ["session_create", "session_delete", "session_update"]
    assert all(isinstance(error, OutcomeUnknown) for error in failed.values())
    reply = SessionReply(id=made["session_get"].id, ref="session_get", sessions=(None,))
    frame = _server_frame(reply)
    assert core.receive(frame) == [Resolved(("session_get", reply.id), reply)]


def _server_frame(event: Any) -> bytes:
    from mqbroker.protocol.codec import Format, encode

    frame = encode(event, Format.MSGPACK)
    assert isinstance(frame, bytes)
    return frame
