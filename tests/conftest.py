"""Shared fixtures: a running broker per test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from mqbroker.config import LogConfig
from mqbroker.logs import configure
from tests.harness import RunningBroker, running_broker


@pytest.fixture(autouse=True)
def _logs_as_the_broker_writes_them() -> None:
    """Every test logs as the daemon does (console view, plain tracebacks, strings masked and
    cut), to this test's captured output; a test that configures logging itself leaves no
    trace on the next. structlog's own default would render each logged exception with rich,
    every local of every frame included (a whole Broker): seconds of CPU on the event loop,
    enough for a loaded machine to miss a test's deadline."""
    configure(LogConfig(level="debug", format="console"), stream=sys.stdout)


@pytest.fixture
async def broker() -> AsyncIterator[RunningBroker]:
    """A broker with the default configuration on an ephemeral port."""
    async with running_broker() as running:
        yield running

# The Redis tests' fixtures: private redis-server processes, never the shared one on 6379.
from tests.redis_fixtures import redis_server, redis_settings  # noqa: E402, F401
