"""Lifecycle events, the reaper and the end of a session's subscriptions, on one instance
(memory stores), over real sockets; and a slow or failing store costing only its requests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import structlog.testing
import trio

from mqbroker.protocol import (
    Delivery,
    Ended,
    Error,
    Ping,
    Pong,
    Publish,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionReply,
    SessionUpdate,
    SubAck,
    Subscribe,
)
from mqbroker.sessions import SessionRecord, StoreUnavailable
from tests.harness import RawSession, raw_session, running_broker
from tests.test_registry_protocol import answer, create, only, registry, sessions_config

#: Waits on the real clock (the reaper uses wall time) are bounded by this.
BOUND = 5.0


async def events_until(session: RawSession, last: type, count: int = 1) -> list[Any]:
    """Every event up to and including the `count`-th of type `last`."""
    seen: list[Any] = []
    with trio.fail_after(BOUND):
        while sum(type(e) is last for e in seen) < count:
            seen.append(await session.next_event())
    return seen


async def eventually(holds: Callable[[], bool]) -> None:
    """Wait until `holds()` (what the reaper does on its own schedule), bounded."""
    for _ in range(int(BOUND / 0.02)):
        if holds():
            return
        await trio.sleep(0.02)
    raise AssertionError("never came true")


def lifecycle(events: Sequence[Any]) -> list[tuple[str, str]]:
    return [(e.payload["event"], e.payload["session"]) for e in events
            if type(e) is Delivery and e.topic.endswith("/lifecycle")]


async def test_every_change_publishes_its_lifecycle_event() -> None:
    """created, activated, suspended, invalidated and deleted reach a subscriber of
    `{prefix}/+/lifecycle`, each with session, user, state, version, time and instance; a
    metadata-only update and a touch publish none."""
    async with registry() as (broker, session), raw_session(broker.url) as watcher:
        assert await answer(watcher, Subscribe(id=1, filter="mcp/session/+/lifecycle")) == \
            SubAck(id=1)
        await create(session, session="a", user="u")
        for n, state in enumerate(["active", "suspended"], start=2):
            only(await answer(session, SessionUpdate(id=n, session="a", user="u", state=state)))
        only(await answer(session, SessionUpdate(id=5, session="a", user="u", metadata={"k": 1})))
        only(await answer(session, SessionUpdate(id=6, session="a", user="u",
                                                 state="invalidated")))
        await create(session, 7, session="b", user="u")
        only(await answer(session, SessionDelete(id=8, session="b", user="u")))
        seen = await events_until(watcher, Delivery, 5)
        assert lifecycle(seen) == [("created", "a"), ("activated", "a"), ("suspended", "a"),
                                   ("invalidated", "a"), ("created", "b")]
        seen = await events_until(watcher, Delivery, 1)
        assert lifecycle(seen) == [("deleted", "b")]
        payload = seen[-1].payload
        assert payload["user"] == "u" and payload["state"] == "pending"
        assert payload["instance"] == "test" and payload["version"] == 1
        assert isinstance(payload["time"], float)


async def test_deleting_a_session_ends_its_subscriptions_after_the_final_event() -> None:
    """Subscribers of the session's topics get the final lifecycle event, then `ended` with
    reason session_ended naming every subscription inside `{prefix}/{id}/#`; subscriptions
    outside (another session, the wildcard over every session) stay; the ended ones are gone
    (a later publish there reaches no one) and their ids are free again."""
    async with registry() as (broker, session), raw_session(broker.url) as watcher:
        filters = {1: "mcp/session/a/lifecycle", 2: "mcp/session/a/#", 3: "mcp/session/b/x",
                   4: "mcp/session/+/lifecycle", 5: "mcp/session/a"}
        for sub, filter in filters.items():
            assert await answer(watcher, Subscribe(id=sub, filter=filter)) == SubAck(id=sub)
        await create(session, session="a", user="u")
        await events_until(watcher, Delivery, 1)  # created: one delivery naming subs 1, 2, 4
        only(await answer(session, SessionDelete(id=2, session="a", user="u")))
        seen = await events_until(watcher, Ended)
        final, ended = seen[-2], seen[-1]
        assert type(final) is Delivery and final.payload["event"] == "deleted"
        assert final.subs == (1, 2, 4)
        assert ended == Ended(subs=(1, 2, 5), reason="session_ended", session="a")
        assert broker.broker.counters["subscriptions_ended"] == 3
        await session.send(Publish(topic="mcp/session/a/x", payload=1),
                           Publish(topic="mcp/session/b/x", payload=2))
        (delivery,) = await events_until(watcher, Delivery)
        assert delivery.subs == (3,) and delivery.payload == 2
        assert await answer(watcher, Subscribe(id=2, filter="mcp/session/a/#")) == SubAck(id=2)


async def test_the_session_history_is_forgotten_when_it_ends() -> None:
    """Recorded messages of `{prefix}/{id}/#` are forgotten when the session ends, and the final
    lifecycle event is not recorded: nothing of it is left to replay."""
    async with registry() as (broker, session):
        await create(session, session="a", user="u")
        await answer(session, Publish(id=2, topic="mcp/session/a/message", payload="m"))
        await answer(session, Publish(id=3, topic="mcp/session/b/message", payload="m"))
        history = broker.broker.history
        assert history.stats()["topics"] == 3  # a/lifecycle (created), a/message, b/message
        await answer(session, SessionUpdate(id=4, session="a", user="u", state="invalidated"))
        assert history.stats()["topics"] == 1


async def test_the_reaper_expires_sessions_and_ends_their_subscriptions() -> None:
    """A session whose TTL runs out is expired by the reaper: `expired` is published, its
    subscriptions end with session_ended, get answers state expired until retain_ended, then
    it is purged; counts follow and are logged."""
    config = sessions_config(reap_interval=0.05, retain_ended=0.3)
    async with running_broker(config) as broker, raw_session(broker.url) as session, \
            raw_session(broker.url) as watcher:
        assert await answer(watcher, Subscribe(id=1, filter="mcp/session/short/#")) == \
            SubAck(id=1)
        with structlog.testing.capture_logs() as logs:
            await create(session, session="short", user="u", ttl=0.2, state="active")
            await create(session, 2, session="long", user="u", ttl=60.0)
            seen = await events_until(watcher, Ended)
            assert lifecycle(seen) == [("created", "short"), ("expired", "short")]
            assert seen[-1] == Ended(subs=(1,), reason="session_ended", session="short")
            gone = only(await answer(session, SessionGet(id=3, sessions=("short",), user="u")))
            assert gone["state"] == "expired"
            registry = broker.broker.registry
            assert registry is not None
            assert registry.counts["expired"] == 1 and registry.counts["pending"] == 1
            await eventually(lambda: not registry.counts["expired"])
        assert next(e for e in logs if e["event"] == "registry.reaped")["expired"] == 1
        assert broker.broker.counters["registry_expired"] == 1
        assert broker.broker.counters["registry_purged"] == 1
        reply = await answer(session, SessionGet(id=4, sessions=("short", "long"), user="u"))
        assert isinstance(reply, SessionReply)
        assert reply.sessions[0] is None and reply.sessions[1] is not None


async def test_the_reaper_does_at_most_reap_batch_per_round() -> None:
    """reap_batch bounds one round: 30 sessions due at once with a batch of 10 take three
    rounds, all expired in the end."""
    config = sessions_config(reap_interval=0.2, reap_batch=10)
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        registry = broker.broker.registry
        assert registry is not None
        with structlog.testing.capture_logs() as logs:
            for n in range(30):
                await create(session, n + 1, session=f"s{n:02}", user="u", ttl=0.05)
            await eventually(lambda: registry.counts["expired"] == 30)
        rounds = [e["expired"] for e in logs if e["event"] == "registry.reaped"]
        assert max(rounds) == 10 and sum(rounds) == 30


# --- a slow or failing store -----------------------------------------------------------------


@attrs.define
class Stalling:
    """Wraps a store: `get` and `create` wait until released (or for ever), or fail."""

    inner: Any
    release: trio.Event = attrs.field(factory=trio.Event)
    fail: bool = False

    async def get(self, ids: Sequence[str], user: str | None) -> Sequence[SessionRecord | None]:
        await self._wait()
        result: Sequence[SessionRecord | None] = await self.inner.get(ids, user)
        return result

    async def create(self, record: SessionRecord) -> None:
        await self._wait()
        await self.inner.create(record)

    async def _wait(self) -> None:
        if self.fail:
            raise StoreUnavailable("the test's store is down")
        await self.release.wait()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_stalled_store_costs_only_its_requests_within_the_timeout() -> None:
    """While the store does not answer, the connection still reads and answers pings and
    publishes, another connection too; past request_timeout a read is `unavailable` and a
    change `outcome_unknown`, in request order."""
    async with registry(request_timeout=0.5) as (broker, session), \
            raw_session(broker.url) as other:
        registry_ = broker.broker.registry
        assert registry_ is not None
        registry_.store = Stalling(registry_.store)
        await session.send(SessionGet(id=1, sessions=("a",), user="u"),
                           SessionCreate(id=2, user="u"), Ping(id=3))
        assert await session.next_event() == Pong(id=3)
        assert await answer(other, Ping(id=1)) == Pong(id=1)
        first, second = await session.next_event(), await session.next_event()
        assert isinstance(first, Error) and (first.code, first.id) == ("unavailable", 1)
        assert isinstance(second, Error) and (second.code, second.id) == ("outcome_unknown", 2)
        assert broker.broker.counters["registry_store_failures"] == 2


async def test_a_store_that_is_down_answers_unavailable() -> None:
    """StoreUnavailable from the store is the protocol's `unavailable`; the session stays."""
    async with registry() as (broker, session):
        registry_ = broker.broker.registry
        assert registry_ is not None
        registry_.store = Stalling(registry_.store, fail=True)
        refused = await answer(session, SessionGet(id=1, sessions=("a",), user="u"))
        assert isinstance(refused, Error) and refused.code == "unavailable"
        assert await answer(session, Ping(id=2)) == Pong(id=2)


async def test_a_flood_of_creates_is_bounded_by_the_request_rate_limit() -> None:
    """Registry requests count as requests for [limits]: a flood of creates past the burst is
    refused with rate_limited (and closes the session past max_violations, 4029); the store
    holds only what was admitted."""
    config = attrs.evolve(sessions_config(), limits=attrs.evolve(
        sessions_config().limits, requests_per_second=1.0, requests_burst=20.0,
        max_violations=1000))
    async with running_broker(config) as broker, raw_session(broker.url) as session:
        frame = json.dumps([{"op": "session_create", "id": n, "user": "u"}
                            for n in range(1, 1001)])
        await session.send_frame(frame)
        replies = [await session.next_event() for _ in range(1000)]
        created = [r for r in replies if isinstance(r, SessionReply)]
        limited = [r for r in replies if isinstance(r, Error) and r.code == "rate_limited"]
        assert len(created) <= 22 and len(created) + len(limited) == 1000
        registry_ = broker.broker.registry
        assert registry_ is not None
        assert len((await registry_.store.list(limit=1000)).records) == len(created)


async def test_the_metrics_count_sessions_by_state() -> None:
    """/metrics exports the reaper's counts as mqbroker_registry_sessions{state=...}."""
    from mqbroker.server.http import exposition

    async with registry() as (broker, session):
        await create(session, session="a", user="u", state="active")
        await create(session, 2, session="b", user="u")
        registry_ = broker.broker.registry
        assert registry_ is not None
        assert registry_.counts["active"] == 0  # not counted per request ...
        await registry_.reap()  # ... but by the reaper's round
        text = exposition(broker.broker.stats(), instance="test", healthy=True,
                          labeled=broker.broker.labeled_gauges())
        assert '\nmqbroker_registry_sessions{state="active"} 1\n' in text
        assert '\nmqbroker_registry_sessions{state="pending"} 1\n' in text
        assert '\nmqbroker_registry_sessions{state="expired"} 0\n' in text
        assert text.count("# TYPE mqbroker_registry_sessions gauge") == 1
        assert not math.isnan(broker.broker.counters["registry_requests"])


async def test_a_broker_without_a_registry_answers_unavailable() -> None:
    """A broker served without open_registry (embedded use) answers registry requests with
    `unavailable`, and the session goes on."""
    from mqbroker.broker import open_broker
    from mqbroker.server.listener import serve

    config = sessions_config()
    async with open_broker(config, "bare") as broker, trio.open_nursery() as nursery:
        listener = await nursery.start(serve, broker, config.server)
        async with raw_session(f"ws://127.0.0.1:{listener.port}/") as session:
            refused = await answer(session, SessionGet(id=1, sessions=("a",), user="u"))
            assert isinstance(refused, Error)
            assert (refused.code, refused.id, refused.ref) == ("unavailable", 1, "session_get")
            assert await answer(session, Ping(id=2)) == Pong(id=2)
        nursery.cancel_scope.cancel()


@attrs.define
class LosingReaps:
    """Wraps a store: the next `lose` reaps that expire sessions are carried out but their
    answer is lost (as when Redis runs the script and the connection breaks before the reply)."""

    inner: Any
    lose: int = 1

    async def reap(self, now: float, limit: int, retain: float) -> Any:
        reaped = await self.inner.reap(now, limit, retain)
        if self.lose and reaped.expired:
            self.lose -= 1
            raise StoreUnavailable("the answer was lost")
        return reaped

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_sessions_expired_by_a_reap_whose_answer_was_lost_still_end() -> None:
    """A reap the store carried out but whose answer never came back expired sessions that
    nobody was told about: the next round finds them (the failed round's time is their
    `updated`) and publishes `expired` and ends their subscriptions, once."""
    config = sessions_config(reap_interval=0.05, retain_ended=60.0)
    async with running_broker(config) as broker, raw_session(broker.url) as session, \
            raw_session(broker.url) as watcher:
        registry_ = broker.broker.registry
        assert registry_ is not None
        registry_.store = LosingReaps(registry_.store)
        assert await answer(watcher, Subscribe(id=1, filter="mcp/session/lost/#")) == \
            SubAck(id=1)
        await create(session, session="lost", user="u", ttl=0.2, state="active")
        seen = await events_until(watcher, Ended)
        assert lifecycle(seen) == [("created", "lost"), ("expired", "lost")]
        assert seen[-1] == Ended(subs=(1,), reason="session_ended", session="lost")
        assert registry_.store.lose == 0
        with trio.move_on_after(0.5):  # several more rounds: told once only
            extra = await watcher.next_event()
            raise AssertionError(f"told again: {extra}")
