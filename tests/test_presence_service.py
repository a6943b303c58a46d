"""The presence service without sockets: brokers driven with in-memory sessions
(mqbroker.testing), on trio's virtual clock, so that heartbeats, expiry and reaping run through
hours of presence_ttl in milliseconds. Two brokers sharing one presence store stand for two
instances; one of them dying is its service being cancelled without a word."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from attrs import define, field

from mqbroker.broker import Broker, open_broker
from mqbroker.config import Config, ServerConfig, SessionsConfig
from mqbroker.plugins import Plugin
from mqbroker.protocol import Delivery, Error, Presence, Present, Subscribe, Unsubscribe
from mqbroker.server.presence import ANNOUNCE_BATCH, PresenceService, open_presence
from mqbroker.sessions import PresenceEntry, PresenceKey, StoreUnavailable
from mqbroker.testing import MemorySession, watching
from mqbroker_plugins.memory import MemoryPresence
from tests.entry_points import install_plugin

TTL = 9.0
WATCHED = "mcp/session/S/message"
PRESENCE = "mcp/session/S/presence"


def config(**sessions: Any) -> Config:
    settings = {"presence_ttl": TTL, "reap_interval": 1.0, **sessions}
    return Config(server=ServerConfig(port=0, max_subscriptions=5000),
                  sessions=SessionsConfig(**settings))


@define
class CountingStore:
    """A presence store that counts and sizes the calls made to it, and fails on demand."""

    inner: MemoryPresence = field(factory=MemoryPresence)
    calls: list[tuple[str, int]] = field(factory=list)
    failing: bool = False

    def _call(self, name: str, size: int) -> None:
        self.calls.append((name, size))
        if self.failing:
            raise StoreUnavailable("the store is down (test)")

    async def announce(self, entries: Sequence[PresenceEntry]) -> None:
        self._call("announce", len(entries))
        await self.inner.announce(entries)

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        self._call("withdraw", len(keys))
        await self.inner.withdraw(keys)

    async def query(self, session: str, now: float) -> Sequence[PresenceEntry]:
        self._call("query", 1)
        return await self.inner.query(session, now)

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]:
        self._call("reap", limit)
        return await self.inner.reap(now, limit)


@define(eq=False)
class Instance:
    broker: Broker
    service: PresenceService
    scope: trio.CancelScope

    async def attach(self, *filters: str, client: str = "app", principal: str | None = None
                     ) -> MemorySession:
        session = MemorySession(client_name=client, principal_name=principal)
        self.broker.attach(session)
        for sub_id, filter in enumerate(filters, start=1):
            await self.broker.subscribe(session, Subscribe(id=sub_id, filter=filter))
        session.flush()
        session.take_events()
        return session

    def die(self) -> None:
        """The instance stops without a word: nothing withdrawn, nothing announced again."""
        self.scope.cancel()


@asynccontextmanager
async def instance(store: Any, name: str = "a", **sessions: Any) -> AsyncIterator[Instance]:
    cfg = config(**sessions)
    async with open_broker(cfg, name) as broker, trio.open_nursery() as nursery:
        service = PresenceService(broker, store, cfg.sessions, clock=trio.current_time)
        with trio.CancelScope() as scope:
            await nursery.start(service.run)
            broker.presence = service
            yield Instance(broker, service, scope)
        nursery.cancel_scope.cancel()


async def serve(nursery: trio.Nursery, service: PresenceService) -> None:
    """Start `service` in `nursery` as open_presence does (cancelling the nursery is then the
    shutdown that interrupts it)."""
    await nursery.start(service.run)
    service.broker.presence = service


async def settle() -> None:
    """Let the service's task run its round (the virtual clock jumps when all are idle)."""
    await trio.sleep(0.01)


def presence_events(watcher: MemorySession) -> list[dict[str, Any]]:
    watcher.flush()
    return [e.payload for e in watcher.take_events() if isinstance(e, Delivery)]


async def test_a_subscription_joins_and_its_entry_is_queried(autojump_clock: Any) -> None:
    """A literal session filter makes the connection present: the store has its entry (instance,
    connection, client, principal), and the session's presence topic gets a join."""
    async with instance(MemoryPresence()) as a:
        watcher = await a.attach(PRESENCE)
        member = await a.attach(WATCHED, client="app/2", principal="alice")
        await settle()
        (join,) = presence_events(watcher)
        assert join == {"event": "join", "session": "S", "instance": "a",
                        "connection": member.id, "client": "app/2", "principal": "alice"}
        (entry,) = await a.service.query("S")
        assert (entry.instance, entry.connection, entry.client, entry.principal) == (
            "a", member.id, "app/2", "alice")
        assert a.broker.stats()["presence_announced"] == 1
        assert "presence_announced" in a.broker.gauges()


async def test_the_last_unsubscribe_leaves_and_a_close_leaves(autojump_clock: Any) -> None:
    async with instance(MemoryPresence()) as a:
        watcher = await a.attach(PRESENCE)
        member = await a.attach(WATCHED, "mcp/session/S/#")
        other = await a.attach(WATCHED)
        await settle()
        assert [e["event"] for e in presence_events(watcher)] == ["join", "join"]
        await a.broker.unsubscribe(member, Unsubscribe(id=1))
        await settle()
        assert presence_events(watcher) == []  # still subscribed with mcp/session/S/#
        await a.broker.unsubscribe(member, Unsubscribe(id=2))
        await settle()
        (leave,) = presence_events(watcher)
        assert (leave["event"], leave["connection"], leave["reason"]) == (
            "leave", member.id, "unsubscribed")
        await a.broker.detach(other)
        await settle()
        (leave,) = presence_events(watcher)
        assert (leave["connection"], leave["reason"]) == (other.id, "closed")
        assert await a.service.query("S") == []


async def test_wildcard_ids_and_presence_watchers_are_present_nowhere(autojump_clock: Any
                                                                      ) -> None:
    store = CountingStore()
    async with instance(store) as a:
        await a.attach("mcp/session/+/message", "mcp/session/#", PRESENCE,
                       "mcp/session/S/lifecycle", "other/S/x")
        await settle()
        assert a.service.stats()["announced"] == 0
        assert [name for name, _ in store.calls if name != "reap"] == []


async def test_entries_live_while_announced_again(autojump_clock: Any) -> None:
    """Ten TTLs later the entry is still there, no leave was published, and each re-announce
    round was one store call."""
    store = CountingStore()
    async with instance(store) as a:
        watcher = await a.attach(PRESENCE)
        await a.attach(WATCHED)
        await trio.sleep(10 * TTL)
        assert len(await a.service.query("S")) == 1
        assert [e["event"] for e in presence_events(watcher)] == ["join"]
        announces = [size for name, size in store.calls if name == "announce"]
        assert len(announces) >= 3 * 10 - 1 and set(announces) == {1}


async def test_a_dead_instance_leaves_the_other_s_view_within_the_ttl(autojump_clock: Any
                                                                       ) -> None:
    """Instance A dies without a word: within presence_ttl (plus one reap interval) its entry
    is gone from B's query, and B's subscribers get a leave with reason expired, once."""
    shared = MemoryPresence()
    async with instance(shared, "a") as a, instance(shared, "b") as b:
        watcher = await b.attach(PRESENCE)
        member = await a.attach(WATCHED)
        await settle()
        (entry,) = await b.service.query("S")
        assert (entry.instance, entry.connection) == ("a", member.id)
        a.die()
        died = trio.current_time()
        while await b.service.query("S"):  # noqa: ASYNC110  (polling the store is the test)
            await trio.sleep(0.1)
        assert trio.current_time() - died <= TTL
        await trio.sleep(1.0 + 0.1)  # one reap interval
        (leave,) = presence_events(watcher)
        assert leave == {"event": "leave", "session": "S", "instance": "a",
                         "connection": member.id, "client": "app", "principal": None,
                         "reason": "expired"}
        await trio.sleep(5 * TTL)
        assert presence_events(watcher) == []


async def test_churn_is_coalesced_and_bounded(autojump_clock: Any) -> None:
    """Ten thousand subscribe/unsubscribe pairs with no checkpoint between them: one dirty key
    at most, whatever the churn, and the store hears nothing of a presence that came and went
    between two of its writes."""
    store = CountingStore()
    async with instance(store) as a:
        watcher = await a.attach(PRESENCE)
        member = await a.attach()
        for n in range(10_000):
            a.broker.index.add(member, n, WATCHED)  # what subscribe does, without awaiting
            a.service.subscribed(member, WATCHED)
            a.broker.index.remove(member, n)
            a.service.unsubscribed(member, WATCHED)
            assert a.service.tracker.pending <= 1
        await settle()
        assert presence_events(watcher) == []
        assert [name for name, _ in store.calls if name != "reap"] == []


async def test_thousands_of_session_ids_are_announced_in_bounded_batches(autojump_clock: Any
                                                                         ) -> None:
    """One connection subscribing to 3000 distinct session ids: every store call carries at most
    ANNOUNCE_BATCH entries, all 3000 are present, and 3000 joins are published."""
    store = CountingStore()
    async with instance(store) as a:
        watcher = await a.attach("mcp/session/+/presence")
        member = await a.attach()
        for n in range(3000):  # what subscribe does, all before the service's task runs
            a.broker.index.add(member, n, f"mcp/session/s{n}/message")
            a.service.subscribed(member, f"mcp/session/s{n}/message")
        assert a.service.tracker.pending == 3000
        await trio.sleep(2 * TTL)
        sizes = [size for name, size in store.calls if name in ("announce", "withdraw")]
        assert max(sizes) == ANNOUNCE_BATCH
        assert a.service.stats()["announced"] == 3000
        assert len(await a.service.query("s2999")) == 1
        assert len(presence_events(watcher)) == 3000


async def test_a_store_outage_is_retried_and_nothing_is_lost(autojump_clock: Any) -> None:
    """While the store fails, joins wait (retried, not queued twice); the query answers
    StoreUnavailable; once it is back, each join is written and published once."""
    store = CountingStore()
    async with instance(store) as a:
        watcher = await a.attach(PRESENCE)
        store.failing = True
        member = await a.attach(WATCHED)
        await trio.sleep(5.0)
        assert a.service.stats()["store_errors"] >= 1
        assert a.service.tracker.pending == 1
        assert presence_events(watcher) == []
        with pytest.raises(StoreUnavailable):
            await a.service.query("S")
        await a.broker.presence_query(member, Presence(id=4, session="S"))
        member.flush()
        (error,) = member.take_events()
        assert isinstance(error, Error) and (error.code, error.id) == ("unavailable", 4)
        store.failing = False
        await trio.sleep(2.0)
        assert [e["event"] for e in presence_events(watcher)] == ["join"]
        assert len(await a.service.query("S")) == 1


async def test_an_own_entry_that_ran_out_is_announced_again(autojump_clock: Any) -> None:
    """The store was out longer than presence_ttl: the entry ran out and a reaper reported it
    (leave, expired); this instance, still holding the subscription, announces it again
    (join)."""
    store = CountingStore()
    async with instance(store) as a:
        watcher = await a.attach(PRESENCE)
        await a.attach(WATCHED)
        await settle()
        store.failing = True
        await trio.sleep(TTL + 1)
        store.failing = False
        await trio.sleep(TTL)
        events = [(e["event"], e.get("reason")) for e in presence_events(watcher)]
        assert events == [("join", None), ("leave", "expired"), ("join", None)]
        assert len(await a.service.query("S")) == 1


async def test_the_query_over_the_broker(autojump_clock: Any) -> None:
    async with instance(MemoryPresence()) as a:
        member = await a.attach(WATCHED, client="c", principal="p")
        await settle()
        await a.broker.presence_query(member, Presence(id=7, session="S"))
        await a.broker.presence_query(member, Presence(id=8, session="nobody"))
        await a.broker.presence_query(member, Presence(id=9, session="bad/id"))
        member.flush()
        present, empty, error = member.take_events()
        assert isinstance(present, Present) and present.id == 7
        (entry,) = present.entries
        assert entry["instance"] == "a" and entry["connection"] == member.id
        assert (entry["client"], entry["principal"]) == ("c", "p")
        assert entry["expires"] > trio.current_time()
        assert isinstance(empty, Present) and (empty.id, empty.entries) == (8, ())
        assert isinstance(error, Error) and (error.code, error.id, error.ref) == (
            "bad_event", 9, "presence")


async def test_no_presence_served_answers_unavailable() -> None:
    async with open_broker(config(), "x") as broker:
        session = MemorySession()
        broker.attach(session)
        await broker.presence_query(session, Presence(id=1, session="S"))
        session.flush()
        (error,) = session.take_events()
        assert isinstance(error, Error) and error.code == "unavailable"


async def test_shutdown_writes_the_leaves_of_closed_connections(autojump_clock: Any) -> None:
    """open_presence, as the daemon uses it: connections closed by a shutdown leave (closed)
    before the store is let go, so other instances see them leave at once."""
    shared = MemoryPresence()
    cfg = attrs.evolve(config(), sessions=attrs.evolve(config().sessions, plugin="memory"))
    async with instance(shared, "b") as b:
        async with open_broker(cfg, "a") as broker:
            service = PresenceService(broker, shared, cfg.sessions, clock=trio.current_time)
            async with trio.open_nursery() as nursery:
                await serve(nursery, service)
                session = MemorySession()
                broker.attach(session)
                await broker.subscribe(session, Subscribe(id=1, filter=WATCHED))
                await settle()
                assert len(await b.service.query("S")) == 1
                await broker.detach(session)
                nursery.cancel_scope.cancel()  # before the service wrote the leave
            await service.flush()
        assert await b.service.query("S") == []


async def test_open_presence_serves_and_unregisters() -> None:
    cfg = config()
    async with open_broker(cfg, "a") as broker:
        async with open_presence(broker, cfg) as service:
            assert broker.presence is service
            session = MemorySession()
            broker.attach(session)
            await broker.subscribe(session, Subscribe(id=1, filter=WATCHED))
            with trio.fail_after(5):
                while not await service.query("S"):  # noqa: ASYNC110  (the store's view)
                    await trio.sleep(0.01)
            await broker.detach(session)
        assert broker.presence is None
        assert service.tracker.present == 0  # the leave was written on the way out


async def test_join_and_leave_topics_stay_out_of_the_match_cache(autojump_clock: Any) -> None:
    """The broker's one-off event topics (a join or leave per session) are matched without
    being kept: 10,000 idle sessions joining neither grow the match cache by 10,000 topics
    nor push the topics published on again and again out of it."""
    async with instance(MemoryPresence()) as a:
        watcher = await a.attach("mcp/session/+/presence")
        members = [await a.attach(f"mcp/session/{n}/message") for n in range(20)]
        await settle()
        assert len(presence_events(watcher)) == 20  # delivered all the same
        for member in members:
            await a.broker.detach(member)
        await settle()
        assert len(presence_events(watcher)) == 20
        cached = list(a.broker.index._cache)
        assert not [topic for topic in cached if topic.endswith("/presence")]


@define
class SlowToAnswer(CountingStore):
    """A store that carries out `slow_call` (announce or withdraw), then is slow to say so: a
    shutdown that cancels the service's task in between finds the store changed and the
    change taken from the tracker, its event not yet published."""

    slow_call: str = "withdraw"
    answer_delay: float = 0.5

    async def announce(self, entries: Sequence[PresenceEntry]) -> None:
        await super().announce(entries)
        await self._late("announce")

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        await super().withdraw(keys)
        await self._late("withdraw")

    async def _late(self, call: str) -> None:
        if call == self.slow_call:
            await trio.sleep(self.answer_delay)


async def test_a_shutdown_in_the_middle_of_a_write_still_publishes_the_leave(
        autojump_clock: Any) -> None:
    """The service's task is cancelled while the store is writing a leave (the daemon closes
    its connections, then leaves open_presence at once): the flush on the way out writes the
    leave again (withdraw is idempotent) and publishes it, rather than finding nothing pending
    and saying nothing (other instances would wait for no event)."""
    store = SlowToAnswer(slow_call="withdraw")
    cfg = config()
    async with open_broker(cfg, "a") as broker:
        watcher = await watching(broker, PRESENCE)
        service = PresenceService(broker, store, cfg.sessions, clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            await serve(nursery, service)
            session = await watching(broker, WATCHED)
            await settle()
            assert [e["event"] for e in presence_events(watcher)] == ["join"]
            await broker.detach(session)
            await trio.sleep(0.1)  # the service is inside the withdraw's slow answer
            assert store.calls[-1] == ("withdraw", 1)
            nursery.cancel_scope.cancel()
        await service.flush()
        assert await store.inner.query("S", trio.current_time()) == []
        events = presence_events(watcher)
        assert [(e["event"], e["reason"]) for e in events] == [("leave", "closed")]


async def test_a_shutdown_in_the_middle_of_a_join_still_withdraws_the_entry(
        autojump_clock: Any) -> None:
    """The service's task is cancelled while the store is writing a join, and the connection
    closes after: the flush withdraws the entry (the store may have it) and publishes the
    leave; the entry is not left in the store for other instances to see until presence_ttl."""
    store = SlowToAnswer(slow_call="announce")
    cfg = config()
    async with open_broker(cfg, "a") as broker:
        watcher = await watching(broker, PRESENCE)
        service = PresenceService(broker, store, cfg.sessions, clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            await serve(nursery, service)
            session = await watching(broker, WATCHED)
            await trio.sleep(0.1)  # the service is inside the announce's slow answer
            assert store.calls[-1] == ("announce", 1)
            nursery.cancel_scope.cancel()
        await broker.detach(session)
        await service.flush()
        assert await store.inner.query("S", trio.current_time()) == []
        events = [(e["event"], e["reason"]) for e in presence_events(watcher)]
        assert events[-1] == ("leave", "closed")


@define
class SlowReaps(CountingStore):
    """A store that removes what ran out at once and is slow to answer the reaper."""

    answer_delay: float = 1.0

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]:
        reaped = await super().reap(now, limit)
        await trio.sleep(self.answer_delay)
        return reaped


#: The stores the `slowreaps` plugin opened, newest last.
slow_stores: list[SlowReaps] = []


@asynccontextmanager
async def open_slow_reaps(settings: Any, config: SessionsConfig) -> AsyncIterator[SlowReaps]:
    slow_stores.append(SlowReaps())
    yield slow_stores[-1]


#: `[sessions] plugin = "slowreaps"`, installed by the `slow_reaps` fixture.
plugin = Plugin(name="slowreaps", open_presence=open_slow_reaps)


@pytest.fixture
def slow_reaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(monkeypatch, tmp_path / "site", "slowreaps",
                   "tests.test_presence_service:plugin")


async def test_open_presence_left_by_a_cancel_still_tells_its_leaves(
        autojump_clock: Any, slow_reaps: None) -> None:
    """open_presence ended by a cancel (not only by its block returning) while the reaper
    waits for the store's answer and a connection has just closed: the reaper's round is
    finished (its answer awaited, request_timeout at most), then the way out writes the
    closed connection's leave and publishes both leaves; without that, the store would have
    neither entry and no other instance would ever hear of them."""
    cfg = config(plugin="slowreaps", reap_interval=1.0)
    async with open_broker(cfg, "a") as broker:
        watcher = await watching(broker, PRESENCE)
        session = MemorySession()
        with trio.move_on_after(1.5):
            async with open_presence(broker, cfg):
                dead = PresenceEntry(session="S", instance="x", connection="c-dead",
                                     expires=time.time() - 1)
                await slow_stores[-1].inner.announce([dead])
                broker.attach(session)
                await broker.subscribe(session, Subscribe(id=1, filter=WATCHED))
                await trio.sleep(1.25)  # the reaper, from 1.0, waits for the store's answer
                await broker.detach(session)
                await trio.sleep_forever()
        events = [(e["event"], e["connection"], e.get("reason")) for e in
                  presence_events(watcher)]
        assert events[0] == ("join", session.id, None)
        assert len(events) == 3 and set(events[1:]) == {("leave", "c-dead", "expired"),
                                                        ("leave", session.id, "closed")}
        assert await slow_stores[-1].inner.query("S", time.time()) == []
