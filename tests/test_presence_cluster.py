"""Presence across two broker instances on one private Redis (fan-out, history, session and
presence stores): what a client does on A is seen on B, the polite paths leave at once, and an
instance killed outright (SIGKILL: nothing withdrawn, nothing said) leaves B's view within
presence_ttl, with a leave event, reason `expired`, published by B's reaper."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mqbroker.client import Message, connect
from mqbroker.config import Config, FanoutConfig, HistoryConfig, ServerConfig, SessionsConfig
from mqbroker.protocol import Subscribe
from tests.daemon import Daemon, running_daemon
from tests.harness import raw_session, running_broker
from tests.redis_server import RedisServer

TOPIC = "mcp/session/S/message"
PRESENCE = "mcp/session/S/presence"
#: Short, so that a dead instance's entries run out within the test.
TTL = 1.5
REAP_INTERVAL = 0.2
WAIT = 10


def instance(server: RedisServer) -> Config:
    return Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                  fanout=FanoutConfig(plugin="redis"),
                  sessions=SessionsConfig(plugin="redis", presence_ttl=TTL,
                                          reap_interval=REAP_INTERVAL),
                  plugins={"redis": {"url": server.url, "key_prefix": "pres:",
                                     "reconnect_max_delay": 0.2}})


def daemon_config(tmp_path: Path, server: RedisServer, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[server]\ninstance_id = "{name}"\n'
        '[fanout]\nplugin = "redis"\n[history]\nplugin = "redis"\n'
        f'[sessions]\nplugin = "redis"\npresence_ttl = {TTL}\nreap_interval = {REAP_INTERVAL}\n'
        f'[plugins.redis]\nurl = "{server.url}"\nkey_prefix = "pres:"\n'
        "reconnect_max_delay = 0.2\n")
    return path


@asynccontextmanager
async def shown_on_failure(daemon: Daemon) -> AsyncIterator[None]:
    """A failing test prints what the daemon logged above info (its stderr is not captured)."""
    try:
        yield
    except BaseException:
        for line in daemon.lines:
            if line.get("level") not in ("debug", "info"):
                print("daemon:", line)
        raise


async def next_event(subscription: Any) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        item = await subscription.__anext__()
    assert isinstance(item, Message), item
    assert isinstance(item.payload, dict)
    return item.payload


async def entries_on(client: Any, count: int) -> list[Any]:
    with trio.fail_after(WAIT):
        while len(found := await client.presence("S")) != count:  # noqa: ASYNC110
            await trio.sleep(0.02)
    return found


async def test_what_a_client_does_on_a_is_seen_on_b(redis_server: RedisServer) -> None:
    """A client on A subscribes: B's query shows it (instance a, its client name) and B's
    subscriber to the presence topic gets the join; its unsubscribe and its close leave B's
    view at once, each with its leave event."""
    async with running_broker(instance(redis_server), "a", presence=True) as a, \
            running_broker(instance(redis_server), "b", presence=True) as b, \
            connect(b.url) as on_b:
        events = await on_b.subscribe(PRESENCE)
        async with connect(a.url, name="mcp-server/a") as on_a:
            sub = await on_a.subscribe(TOPIC)
            join = await next_event(events)
            assert (join["event"], join["instance"], join["client"]) == (
                "join", "a", "mcp-server/a")
            (entry,) = await entries_on(on_b, 1)
            assert (entry.instance, entry.connection, entry.client) == (
                "a", join["connection"], "mcp-server/a")
            await sub.unsubscribe()
            leave = await next_event(events)
            assert (leave["event"], leave["instance"], leave["reason"]) == (
                "leave", "a", "unsubscribed")
            assert await on_b.presence("S") == []
            await on_a.subscribe(TOPIC)
            assert (await next_event(events))["event"] == "join"
            await entries_on(on_b, 1)
        leave = await next_event(events)
        assert (leave["event"], leave["reason"]) == ("leave", "closed")
        assert await on_b.presence("S") == []


async def test_a_killed_instance_leaves_b_s_view_within_the_ttl(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Instance A, a real process, is killed with SIGKILL while its client holds a
    subscription: within presence_ttl the entry is gone from B's query, and B's subscriber gets
    a leave for A's connection, reason expired (published by B's reaper, within one reap
    interval more)."""
    async with running_daemon(daemon_config(tmp_path, redis_server, "a")) as a, \
            running_broker(instance(redis_server), "b", presence=True) as b, \
            connect(b.url) as on_b, trio.open_nursery() as nursery, shown_on_failure(a):
        events = await on_b.subscribe(PRESENCE)
        member_done = trio.Event()

        async def member(task_status: trio.TaskStatus[None]) -> None:
            async with raw_session(a.url) as raw:
                await raw.send(Subscribe(id=1, filter=TOPIC))
                await raw.receive()  # the suback
                task_status.started()
                await member_done.wait()

        await nursery.start(member)
        join = await next_event(events)
        assert (join["event"], join["instance"]) == ("join", "a")
        (entry,) = await entries_on(on_b, 1)
        assert entry.instance == "a"
        a.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await entries_on(on_b, 0)
        gone = time.monotonic() - killed
        leave = await next_event(events)
        left = time.monotonic() - killed
        assert (leave["event"], leave["instance"], leave["connection"], leave["reason"]) == (
            "leave", "a", join["connection"], "expired")
        assert gone <= TTL + 0.5, gone
        assert left <= TTL + REAP_INTERVAL + 1.0, left
        assert b.broker.stats()["presence_expired"] == 1
        member_done.set()


async def test_a_stopped_instance_says_its_clients_left(tmp_path: Path,
                                                        redis_server: RedisServer) -> None:
    """SIGTERM: A closes its connections, then writes and publishes their leaves (closed) before
    it lets the store go: B sees them leave at once, not presence_ttl later."""
    async with running_daemon(daemon_config(tmp_path, redis_server, "a")) as a, \
            running_broker(instance(redis_server), "b", presence=True) as b, \
            connect(b.url) as on_b, connect(a.url) as on_a, shown_on_failure(a):
        events = await on_b.subscribe(PRESENCE)
        await on_a.subscribe(TOPIC)
        assert (await next_event(events))["event"] == "join"
        a.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        leave = await next_event(events)
        assert (leave["event"], leave["instance"], leave["reason"]) == ("leave", "a", "closed")
        assert time.monotonic() - stopped < TTL
        assert await on_b.presence("S") == []
        assert b.broker.stats()["presence_expired"] == 0
