"""A pytest plugin for the MCP SDK's own test suite: its resumability tests' event stores
(`SequencedEventStore`, `SimpleEventStore`) replaced by mqbroker.mcp's store, against the
broker at $MQBROKER_URL. Loaded by tests/test_mcp_sdk_suite.py into a pytest run over the SDK's
source distribution, fetched at test time (never copied into this repository)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from mcp.server.streamable_http import EventId, StreamId
from mcp_types import JSONRPCMessage

from mqbroker.mcp import BrokerEventStore


class AdapterStore(BrokerEventStore):
    """mqbroker.mcp's store with the test stores' constructor (no arguments) and the one
    helper the SDK's tests call on theirs: `wait_until_stored`."""

    def __init__(self) -> None:
        super().__init__(os.environ["MQBROKER_URL"])
        self.calls = 0
        self.called: asyncio.Event | None = None

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        self.calls += 1
        if self.called is not None:
            self.called.set()
        return await super().store_event(stream_id, message)

    async def wait_until_stored(self, count: int) -> None:
        """Until `count` events were stored and acknowledged by the broker."""
        async with asyncio.timeout(10):
            while self.calls < count:
                self.called = asyncio.Event()
                await self.called.wait()
            if self._tasks:
                await asyncio.wait(set(self._tasks))


#: The SDK test modules' store classes, by module.
SWAPPED = {
    "tests.interaction.transports._event_store": "SequencedEventStore",
    "tests.shared.test_streamable_http": "SimpleEventStore",
    "tests.interaction.transports.test_hosting_resume": "SequencedEventStore",
}


def pytest_configure(config: pytest.Config) -> None:
    import importlib

    module = importlib.import_module("tests.interaction.transports._event_store")
    module.SequencedEventStore = AdapterStore  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        name = SWAPPED.get(getattr(module, "__name__", ""))
        if name is not None and hasattr(module, name):
            setattr(module, name, AdapterStore)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The SDK's suite runs on asyncio (its conftest says so; that conftest is not loaded)."""
    return "asyncio"
