"""The private hooks into the MCP SDK (mqbroker/mcp/_sdk_hooks.py), checked against the
installed SDK: each session gets its own store, a session the SDK ends is forgotten (not when
the server shuts down), and an SDK without the hooks is refused at start. Also the
SubscriptionBus across two instances."""

from __future__ import annotations

import asyncio
import socket
from importlib.metadata import version
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.subscriptions import ResourceUpdated, ServerEvent, ToolsListChanged
from mcp_types import JSONRPCNotification

from mqbroker.client import aio
from mqbroker.mcp import (
    BrokerEventStore,
    BrokerSubscriptionBus,
    SessionEventStore,
    StoreSettings,
    _sdk_hooks,
    resumable,
)
from tests.harness import running_broker
from tests.test_mcp_store import in_asyncio, settled


def test_the_installed_sdk_has_every_hook() -> None:
    server = MCPServer("hooks")
    server.streamable_http_app()
    _sdk_hooks.check(server.session_manager)
    assert version("mcp").startswith("2.3.")


def test_an_sdk_without_a_hook_is_refused_with_what_is_missing() -> None:
    """As a version that renamed `_admit_session` would be: refused at start, by name."""

    class OlderManager:
        _discard_session = _session_owners = _server_instances = None

    with pytest.raises(_sdk_hooks.UnsupportedSdk, match=r"lacks \['_admit_session'\]"):
        _sdk_hooks.check(OlderManager())  # type: ignore[arg-type]


async def test_each_session_gets_its_own_store_and_is_forgotten_when_the_sdk_ends_it() -> None:
    async with running_broker() as running:
        url = running.url

        async def scenario() -> tuple[Any, ...]:
            server = MCPServer("hooks")
            store = BrokerEventStore(url)
            resumable(server, url, store=store)
            manager: Any = server.session_manager
            async with store, aio.connect(url) as client:
                one, two = manager._admit_session(None), manager._admit_session(None)
                views = (one._event_store, two._event_store)
                sid = one.mcp_session_id
                await views[0].store_event("1", JSONRPCNotification(
                    jsonrpc="2.0", method="notifications/message", params={"data": 1}))
                await settled(store)
                topic = store.settings.topic_of(sid)
                before = await client.latest(topic)
                await manager._discard_session(sid, one)  # as a DELETE or the idle timeout do
                after = await client.latest(topic)
                # At shutdown a session is not forgotten: another instance may resume it.
                store.shutting_down = True
                await views[1].store_event("1", None)
                await settled(store)
                kept = await client.latest(store.settings.topic_of(two.mcp_session_id))
                await manager._discard_session(two.mcp_session_id, two)
                still = await client.latest(store.settings.topic_of(two.mcp_session_id))
                return views, (one.mcp_session_id, two.mcp_session_id), before, after, \
                    kept, still

        views, sids, before, after, kept, still = await in_asyncio(scenario)
        assert all(isinstance(v, SessionEventStore) for v in views)
        assert [v.session for v in views] == list(sids) and sids[0] != sids[1]
        assert before is not None and after is None
        assert kept is not None and still == kept


async def test_the_bus_carries_events_from_one_instance_to_another() -> None:
    """A tool on instance B announces ToolsListChanged and ResourceUpdated; a listen stream on
    instance A gets both (SubscriptionBus, the 2026-07-28 subscriptions/listen fan-out)."""
    async with running_broker() as running:
        url = running.url

        async def scenario() -> list[ServerEvent]:
            got: list[ServerEvent] = []
            arrived = asyncio.Event()

            def listener(event: ServerEvent) -> None:
                got.append(event)
                if len(got) == 2:
                    arrived.set()

            async with BrokerSubscriptionBus(url) as on_a, BrokerSubscriptionBus(url) as on_b:
                unsubscribe = on_a.subscribe(listener)
                on_a.subscribe(lambda event: 1 / 0)  # a failing listener starves nobody
                await on_b.publish(ToolsListChanged())
                await on_b.publish(ResourceUpdated(uri="file:///a.txt"))
                async with asyncio.timeout(5):
                    await arrived.wait()
                unsubscribe()
                unsubscribe()  # idempotent
            return got

        assert await in_asyncio(scenario) == [ToolsListChanged(),
                                              ResourceUpdated(uri="file:///a.txt")]


async def test_a_server_whose_broker_cannot_be_reached_fails_its_startup() -> None:
    """No broker within connect_timeout: the app answers the lifespan's startup with
    `lifespan.startup.failed` naming the broker (uvicorn then exits with an error) rather than
    raising, which servers take as "no lifespan support" and go on serving a broken app."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{probe.getsockname()[1]}/"

    async def scenario() -> list[dict[str, Any]]:
        store = BrokerEventStore(url, StoreSettings(connect_timeout=0.3))
        app = resumable(MCPServer("unreachable"), url, store=store)
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await incoming.put({"type": "lifespan.startup"})
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async with asyncio.timeout(10):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, send)
        return sent

    sent = await in_asyncio(scenario)
    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert url in sent[0]["message"] and "cannot reach the broker" in sent[0]["message"]
