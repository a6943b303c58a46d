"""Shared fixtures: a running broker per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.harness import RunningBroker, running_broker


@pytest.fixture
async def broker() -> AsyncIterator[RunningBroker]:
    """A broker with the default configuration on an ephemeral port."""
    async with running_broker() as running:
        yield running

# The Redis tests' fixtures: private redis-server processes, never the shared one on 6379.
from tests.redis_fixtures import redis_server, redis_settings  # noqa: E402, F401
