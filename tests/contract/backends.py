"""The backends the contract suites run against, and the fixtures that open them.

Adding a backend is one line in `BACKENDS` (history and fan-out) or in `REGISTRY_BACKENDS`
(the session registry's stores). A backend opens fresh, empty instances of the extension
points through whatever it needs (a plugin, a server it starts); the suites only use what the
Protocols in `mqbroker.history`, `mqbroker.fanout` and `mqbroker.sessions` promise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
from attrs import frozen
from trio.testing import MockClock

from mqbroker.config import Config, FanoutConfig, HistoryConfig, ServerConfig, SessionsConfig
from mqbroker.fanout import Deliver, Fanout, FanoutContext
from mqbroker.history import HistoryStore
from mqbroker.plugins import Plugin, load_plugin
from mqbroker.sessions import PresenceStore, SessionStore
from tests.redis_fixtures import (
    contract_broker_plugins,
    fresh_registry_settings,
    open_contract_fanout,
    open_contract_history,
)
from tests.sql_fixtures import fresh_postgresql, fresh_sqlite


@frozen(kw_only=True)
class FanoutUnderTest:
    """A fan-out and the history store it records into, opened together."""

    fanout: Fanout
    history: HistoryStore


#: Opens a fresh, empty history store with these bounds.
OpenHistory = Callable[[HistoryConfig], AbstractAsyncContextManager[HistoryStore]]
#: Opens a fresh fan-out that delivers to `deliver`, with this dedup window and history bounds.
OpenFanout = Callable[[Deliver, float, HistoryConfig], AbstractAsyncContextManager[FanoutUnderTest]]


@frozen(kw_only=True)
class Backend:
    name: str
    open_history: OpenHistory
    open_fanout: OpenFanout
    #: Whether the backend reads no clock but trio's, so tests that let time pass can run
    #: on `autojump_clock`. A backend that waits on threads or servers must say False:
    #: autojump would fire every timeout while a thread works.
    trio_clock_only: bool
    #: `[plugins]` tables for a broker on a fresh, empty instance of this backend (called once
    #: per broker cluster; every broker given the same tables shares the backend's data).
    broker_plugins: Callable[[], dict[str, Any]] = dict

    def broker_config(self, plugins: dict[str, Any], history: HistoryConfig,
                      server: ServerConfig) -> Config:
        """A broker's configuration with this backend as its history and fan-out."""
        return Config(server=server, history=attrs.evolve(history, plugin=self.name),
                      fanout=FanoutConfig(plugin=self.name), plugins=plugins)


def _load(name: str) -> Plugin:
    plugin = load_plugin(name)
    if plugin.open_history is None or plugin.open_fanout is None:
        pytest.fail(f"plugin {name!r} must provide both open_history and open_fanout")
    return plugin


@asynccontextmanager
async def _open_plugin_history(
    name: str, settings: Any, config: HistoryConfig
) -> AsyncIterator[HistoryStore]:
    plugin = _load(name)
    assert plugin.open_history is not None
    async with plugin.open_history(settings, config) as store:
        yield store


@asynccontextmanager
async def _open_plugin_fanout(
    name: str, settings: Any, deliver: Deliver, dedup_window: float, config: HistoryConfig
) -> AsyncIterator[FanoutUnderTest]:
    plugin = _load(name)
    assert plugin.open_fanout is not None
    async with _open_plugin_history(name, settings, config) as history:
        context = FanoutContext(
            instance_id="contract", history=history, deliver=deliver, dedup_window=dedup_window
        )
        async with plugin.open_fanout(settings, context) as fanout:
            yield FanoutUnderTest(fanout=fanout, history=history)


def plugin_backend(name: str, settings: Any = None, *, trio_clock_only: bool) -> Backend:
    """A backend opened through the installed plugin `name`, as the broker opens it."""
    return Backend(
        name=name,
        open_history=partial(_open_plugin_history, name, settings),
        open_fanout=partial(_open_plugin_fanout, name, settings),
        trio_clock_only=trio_clock_only,
    )


BACKENDS: dict[str, Backend] = {
    "memory": plugin_backend("memory", trio_clock_only=True),
    # A fresh key prefix per open on one private redis-server (tests/redis_fixtures.py).
    "redis": Backend(
        name="redis",
        open_history=open_contract_history,
        open_fanout=open_contract_fanout,
        trio_clock_only=False,
        broker_plugins=contract_broker_plugins,
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn."""
    return BACKENDS[request.param]


@pytest.fixture
def backend_clock(backend: Backend) -> MockClock | None:
    """`autojump_clock` where the backend allows it, else the real clock (None).

    pytest-trio runs a test on any Clock among its arguments, so a test that lets time pass
    takes this fixture and sleeps: instantly on memory, for real on the others.
    """
    return MockClock(autojump_threshold=0) if backend.trio_clock_only else None


# --- The session registry's backends ---------------------------------------------------------

#: Opens `count` store instances sharing one fresh, empty registry, as `count` broker
#: instances configured alike would (for an in-process backend: one object, `count` times).
OpenSessions = Callable[[int], AbstractAsyncContextManager[Sequence[SessionStore]]]
OpenPresence = Callable[[int], AbstractAsyncContextManager[Sequence[PresenceStore]]]
#: Yields `[plugins.NAME]` settings for a fresh, empty registry (a new database, a new key
#: prefix), and removes what it made afterwards.
FreshSettings = Callable[[], AbstractAsyncContextManager[Any]]


@frozen(kw_only=True)
class RegistryBackend:
    name: str
    open_sessions: OpenSessions
    open_presence: OpenPresence


@asynccontextmanager
async def _no_settings() -> AsyncIterator[None]:
    yield None


@asynccontextmanager
async def _open_registry_stores(
    name: str, factory_name: str, fresh_settings: FreshSettings, in_process: bool, count: int
) -> AsyncIterator[Sequence[Any]]:
    factory = getattr(load_plugin(name), factory_name)
    if factory is None:
        pytest.fail(f"plugin {name!r} does not provide {factory_name}")
    async with fresh_settings() as settings, AsyncExitStack() as stack:
        opens = 1 if in_process else count
        stores = [
            await stack.enter_async_context(factory(settings, SessionsConfig()))
            for _ in range(opens)
        ]
        yield stores * count if in_process else stores


def plugin_registry_backend(
    name: str, fresh_settings: FreshSettings = _no_settings, *, in_process: bool = False
) -> RegistryBackend:
    """The session and presence stores of the installed plugin `name`, opened as the broker
    opens them. `in_process`: the stores live in the object the plugin opens, so instances
    share data by sharing that object."""
    return RegistryBackend(
        name=name,
        open_sessions=partial(
            _open_registry_stores, name, "open_sessions", fresh_settings, in_process
        ),
        open_presence=partial(
            _open_registry_stores, name, "open_presence", fresh_settings, in_process
        ),
    )


REGISTRY_BACKENDS: dict[str, RegistryBackend] = {
    "memory": plugin_registry_backend("memory", in_process=True),
    # A fresh key prefix per registry on one private redis-server (tests/redis_fixtures.py).
    "redis": plugin_registry_backend("redis", fresh_registry_settings),
    # A new file, a new database on one private PostgreSQL server (tests/sql_fixtures.py).
    "sqlite": plugin_registry_backend("sql", fresh_sqlite),
    "postgresql": plugin_registry_backend("sql", fresh_postgresql),
}


@pytest.fixture(params=sorted(REGISTRY_BACKENDS))
def registry_backend(request: pytest.FixtureRequest) -> RegistryBackend:
    """Each session registry backend in turn."""
    return REGISTRY_BACKENDS[request.param]
