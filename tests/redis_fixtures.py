"""Fixtures for tests that need Redis: private redis-server processes and plugin settings for them.

Import these into tests/conftest.py (`from redis_fixtures import *` names them in `__all__`).
The contract backends open fresh stores through `open_contract_history` and
`open_contract_fanout`: every open gets its own key prefix on one server started on first use,
so each store starts empty without a server per test.
"""

from __future__ import annotations

import atexit
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import redis
import trio
from attrs import define, field

from mqbroker.config import HistoryConfig
from mqbroker.fanout import Deliver, FanoutContext
from mqbroker.message import Draft, Message
from mqbroker_plugins.redis import (
    RedisFanout,
    RedisHistory,
    RedisSettings,
    open_redis_fanout,
    open_redis_history,
)
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.contract.backends import FanoutUnderTest

__all__ = ["redis_server", "redis_settings"]

#: The longest a test waits for a delivery or a state change.
WAIT = 10.0
#: Short waits, so that tests about outages do not sit in backoff.
TEST_RECONNECT_MAX_DELAY = 0.2

_prefixes = itertools.count()


def settings_for(server: RedisServer, **overrides: Any) -> RedisSettings:
    """Settings for `server` with a key prefix no other test uses."""
    settings = RedisSettings(
        url=server.url,
        key_prefix=f"t{next(_prefixes)}:",
        reconnect_max_delay=TEST_RECONNECT_MAX_DELAY,
    )
    return attrs.evolve(settings, **overrides)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, empty redis-server on a free port, stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_settings(redis_server: RedisServer) -> RedisSettings:
    """Plugin settings for `redis_server`."""
    return settings_for(redis_server)


def reset_stats(server: RedisServer) -> None:
    """Zero the server's command statistics (see `command_calls`)."""
    with redis.Redis.from_url(server.url) as client:
        client.config_resetstat()


def command_calls(server: RedisServer) -> dict[str, int]:
    """Commands the server ran since `reset_stats`, by name, those inside scripts included
    (INFO and CONFIG RESETSTAT themselves aside)."""
    with redis.Redis.from_url(server.url) as client:
        stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    calls.pop("info", None)
    calls.pop("config|resetstat", None)
    return calls


# --- The contract backends' server ----------------------------------------------------------

_contract_server: RedisServer | None = None


def contract_server() -> RedisServer:
    """The server the contract suites share, started on first use, stopped at exit."""
    global _contract_server
    if _contract_server is None:
        server = RedisServer()
        server.start()
        atexit.register(server.close)
        _contract_server = server
    return _contract_server


def contract_broker_plugins() -> dict[str, Any]:
    """`[plugins]` for brokers on the contract server, under a key prefix of their own."""
    settings = settings_for(contract_server())
    return {"redis": {"url": settings.url, "key_prefix": settings.key_prefix,
                      "reconnect_max_delay": settings.reconnect_max_delay}}


@asynccontextmanager
async def fresh_registry_settings() -> AsyncIterator[RedisSettings]:
    """Settings for a fresh, empty session registry: a key prefix of its own on the contract
    server (which is stopped, with everything on it, at exit)."""
    yield settings_for(contract_server())


@asynccontextmanager
async def open_contract_history(config: HistoryConfig) -> AsyncIterator[RedisHistory]:
    async with open_redis_history(settings_for(contract_server()), config) as history:
        yield history


@asynccontextmanager
async def open_contract_fanout(
    deliver: Deliver, dedup_window: float, config: HistoryConfig
) -> AsyncIterator[FanoutUnderTest]:
    from tests.contract.backends import FanoutUnderTest

    settings = settings_for(contract_server())
    async with open_redis_history(settings, config) as history:
        context = FanoutContext(
            instance_id="contract", history=history, deliver=deliver, dedup_window=dedup_window
        )
        async with open_redis_fanout(settings, context) as fanout:
            yield FanoutUnderTest(fanout=fanout, history=history)


# --- Broker instances, without a broker: a history, a fan-out and what it delivered ---------


@define
class Inbox:
    """What a fan-out delivered, in delivery order; `wait_until` waits on deliveries."""

    messages: list[Message] = field(factory=list)
    batches: int = 0
    #: Each `interrupted` call: how many messages had been delivered then, and its filters.
    interruptions: list[tuple[int, frozenset[str]]] = field(factory=list)
    _arrived: trio.Event = field(factory=trio.Event)

    def interrupted(self, filters: Sequence[str]) -> None:
        assert filters, "interrupted was called with no filter"
        self.interruptions.append((len(self.messages), frozenset(filters)))
        self._arrived.set()
        self._arrived = trio.Event()

    def deliver(self, messages: Sequence[Message]) -> None:
        assert messages, "deliver was called with an empty batch"
        self.batches += 1
        self.messages.extend(messages)
        self._arrived.set()
        self._arrived = trio.Event()

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds, checked after each delivery (at most WAIT seconds)."""
        with trio.fail_after(WAIT):
            while not condition():
                await self._arrived.wait()

    async def wait_for(self, message: Message) -> None:
        """Until `message` (by topic, payload and position) was delivered."""
        await self.wait_until(lambda: message in self.messages)


@define
class Instance:
    """One broker instance's Redis plugin parts, opened on one server."""

    fanout: RedisFanout
    history: RedisHistory
    inbox: Inbox

    async def publish(self, *drafts: Draft) -> list[Message]:
        with trio.fail_after(WAIT):
            return list(await self.fanout.publish(drafts))

    async def watch(self, *filters: str) -> None:
        with trio.fail_after(WAIT):
            for filter in filters:
                await self.fanout.watch(filter)


@asynccontextmanager
async def open_instance(
    settings: RedisSettings,
    instance_id: str,
    *,
    dedup_window: float = 60.0,
    config: HistoryConfig | None = None,
) -> AsyncIterator[Instance]:
    """A RedisHistory and a RedisFanout on `settings`, delivering into a fresh Inbox."""
    inbox = Inbox()
    async with open_redis_history(settings, config or HistoryConfig()) as history:
        context = FanoutContext(
            instance_id=instance_id,
            history=history,
            deliver=inbox.deliver,
            dedup_window=dedup_window,
            interrupted=inbox.interrupted,
        )
        async with open_redis_fanout(settings, context) as fanout:
            yield Instance(fanout=fanout, history=history, inbox=inbox)


def draft(topic: str, payload: Any, *, msg_id: str | None = None, record: bool = False) -> Draft:
    return Draft(
        topic=topic, payload=payload, published_at=time.time(), msg_id=msg_id, record=record
    )
