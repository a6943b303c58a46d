"""A change the session store has carried out is always told, even when a shutdown cancels
the task that asked for it: the lifecycle event of a delete whose caller's connection closes,
or of a reaper round the shutdown interrupts, still goes out. Brokers driven with in-memory
sessions (mqbroker.testing) and a memory store that answers slowly, on trio's virtual clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mqbroker.broker import open_broker
from mqbroker.config import Config, HistoryConfig, ServerConfig, SessionsConfig
from mqbroker.message import Draft, Message
from mqbroker.plugins import Plugin
from mqbroker.protocol import Delivery, SessionCreate, SessionDelete, SessionReply
from mqbroker.registry import Caller, Rules
from mqbroker.server.registry import Registry, open_registry
from mqbroker.sessions import Reaped, SessionRecord, SessionState, StoreUnavailable
from mqbroker.testing import MemorySession, watching
from mqbroker_plugins.memory_history import BoundedHistory, MemoryHistory
from mqbroker_plugins.memory_sessions import MemorySessions
from tests.entry_points import install_plugin

#: How long the store takes to answer, after it has carried a call out.
ANSWER_DELAY = 1.0
EVERY_LIFECYCLE = "mcp/session/+/lifecycle"
REAP_INTERVAL = 0.5
#: How long the `slow` history takes to answer an append.
HISTORY_DELAY = 1.0


class SlowAnswers(MemorySessions):
    """A memory store that carries out a delete or a reap at once and answers late: a cancel
    in between finds the store changed and nothing yet told."""

    async def delete(self, session_id: str, user: str | None) -> SessionRecord | None:
        record = await super().delete(session_id, user)
        await trio.sleep(ANSWER_DELAY)
        return record

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        reaped = await super().reap(now, limit, retain)
        await trio.sleep(ANSWER_DELAY)
        return reaped


@asynccontextmanager
async def watched_registry() -> AsyncIterator[tuple[Registry, MemorySession]]:
    """A registry over a slow store, and a session watching every lifecycle topic."""
    config = Config(server=ServerConfig(port=0),
                    sessions=SessionsConfig(request_timeout=10 * ANSWER_DELAY))
    async with open_broker(config, "a") as broker:
        registry = Registry(store=SlowAnswers(), broker=broker, rules=Rules(config.sessions))
        watcher = await watching(broker, EVERY_LIFECYCLE)
        yield registry, watcher


def record(session_id: str, expires: float) -> SessionRecord:
    now = time.time()
    return SessionRecord(id=session_id, user="u", state=SessionState.ACTIVE, created=now,
                         updated=now, expires=expires, ttl=60.0, metadata={})


def lifecycle(watcher: MemorySession) -> list[tuple[str, str]]:
    watcher.flush()
    return [(e.payload["event"], e.payload["session"]) for e in watcher.take_events()
            if isinstance(e, Delivery)]


async def cancelled_midway(work: Any) -> None:
    """Run `work()` and cancel it once the store has carried it out, before its answer."""
    with trio.move_on_after(ANSWER_DELAY / 2):
        await work()


async def test_a_delete_cancelled_after_the_store_deleted_still_publishes_deleted(
        autojump_clock: Any) -> None:
    async with watched_registry() as (registry, watcher):
        await registry.store.create(record("s1", time.time() + 60))
        await cancelled_midway(lambda: registry.answer(
            Caller(principal=None), SessionDelete(id=1, session="s1", user="u")))
        assert await registry.store.get(["s1"], "u") == [None]
        assert lifecycle(watcher) == [("deleted", "s1")]


@asynccontextmanager
async def open_slow_sessions(settings: Any, config: SessionsConfig) -> AsyncIterator[SlowAnswers]:
    yield SlowAnswers()


class SlowHistory(MemoryHistory):
    """A history store that answers each append after HISTORY_DELAY, as a Redis that stopped
    answering does after its socket_timeout."""

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        await trio.sleep(HISTORY_DELAY)
        return await super().append(drafts)


@asynccontextmanager
async def open_slow_history(settings: Any, config: HistoryConfig) -> AsyncIterator[SlowHistory]:
    yield SlowHistory(BoundedHistory(config))


#: `[sessions] plugin = "slow"` and `[history] plugin = "slow"`, installed by the
#: `slow_plugin` fixture.
plugin = Plugin(name="slow", open_sessions=open_slow_sessions, open_history=open_slow_history)


@pytest.fixture
def slow_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(monkeypatch, tmp_path / "site", "slow", "tests.test_registry_shutdown:plugin")


async def test_a_shutdown_during_a_reaper_round_still_publishes_expired(
        autojump_clock: Any, slow_plugin: None) -> None:
    """open_registry is left (the daemon shutting down) while the store has expired a session
    and not yet answered the reaper: the way out waits for the answer (request_timeout at
    most) and publishes `expired`, which other instances would otherwise never see."""
    config = Config(server=ServerConfig(port=0),
                    sessions=SessionsConfig(plugin="slow", reap_interval=REAP_INTERVAL,
                                            request_timeout=10 * ANSWER_DELAY))
    async with open_broker(config, "a") as broker:
        watcher = await watching(broker, EVERY_LIFECYCLE)
        with trio.move_on_after(REAP_INTERVAL + ANSWER_DELAY / 2):
            async with open_registry(broker, config) as registry:
                await registry.store.create(record("s1", time.time() - 1))
                await trio.sleep_forever()
        (found,) = await registry.store.get(["s1"], "u")
        assert found is not None and found.state is SessionState.EXPIRED
        assert lifecycle(watcher) == [("expired", "s1")]
        assert broker.registry is None


class FirstReapUnanswered(SlowAnswers):
    """A slow store whose first reaper round gets no answer (Redis cut off for a moment): the
    registry remembers that round as lost and looks for what it did at the next one."""

    reaps: int = 0

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        self.reaps += 1
        if self.reaps == 1:
            raise StoreUnavailable("no answer (test)")
        return await super().reap(now, limit, retain)


async def test_a_shutdown_during_a_round_after_a_lost_one_still_publishes_expired(
        autojump_clock: Any) -> None:
    """The round after a lost one expires a session and answers while a shutdown cancels the
    reaper: looking for what the lost round did (a store call, cut by the cancel) does not
    drop what this round expired; `tell_reaped` on the way out still publishes `expired`."""
    async with watched_registry() as (registry, watcher):
        registry.store = FirstReapUnanswered()
        await registry.store.create(record("s1", time.time() - 1))
        await registry.reap()  # lost: no answer
        await cancelled_midway(registry.reap)  # expires s1, answers after the cancel
        (found,) = await registry.store.get(["s1"], "u")
        assert found is not None and found.state is SessionState.EXPIRED
        await registry.tell_reaped()
        assert lifecycle(watcher) == [("expired", "s1")]


async def test_changes_a_shutdown_cuts_short_are_each_bounded_by_request_timeout(
        autojump_clock: Any, slow_plugin: None) -> None:
    """Many connections have a create in flight when the shutdown closes them, with a history
    that answers slowly (a Redis history under the memory fan-out, Redis stopped) and recorded
    lifecycle topics: each change finishes shielded, but its publish keeps request_timeout, so
    the stop waits about one request_timeout for them all, not one history answer after the
    other (the memory fan-out publishes one at a time) for every connection a client opened."""
    timeout = 2.0
    config = Config(server=ServerConfig(port=0),
                    history=HistoryConfig(plugin="slow", record=(EVERY_LIFECYCLE,)),
                    sessions=SessionsConfig(request_timeout=timeout))
    replies: list[Any] = []
    async with open_broker(config, "a") as broker:
        registry = Registry(store=MemorySessions(), broker=broker, rules=Rules(config.sessions))

        async def create(n: int) -> None:
            replies.append(await registry.answer(
                Caller(principal=None), SessionCreate(id=n, session=f"s{n}", user="u")))

        start = trio.current_time()
        with trio.move_on_after(HISTORY_DELAY / 2):  # the shutdown closes the connections
            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(create, n)
        assert trio.current_time() - start <= 2 * timeout  # the store call, then the publish
        assert len(replies) == 20 and all(type(r) is SessionReply for r in replies)
