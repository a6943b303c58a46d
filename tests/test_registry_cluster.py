"""Two broker instances on one private Redis (fan-out, history and session store): the
registry is shared, and a session's end on one instance ends subscriptions on the other."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from mqbroker.client import Message, SubscriptionEnded, connect
from mqbroker.config import Config, FanoutConfig, HistoryConfig, ServerConfig, SessionsConfig
from tests.harness import running_broker
from tests.redis_server import RedisServer


def instance(server: RedisServer, **sessions: Any) -> Config:
    return Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                  fanout=FanoutConfig(plugin="redis"),
                  sessions=SessionsConfig(plugin="redis", **sessions),
                  plugins={"redis": {"url": server.url, "key_prefix": "reg:"}})


async def next_item(subscription: Any) -> Any:
    with trio.fail_after(10):
        return await subscription.__anext__()


async def lifecycle_after_created(subscription: Any) -> Message:
    """The next lifecycle message but `created`: published through Redis just before the
    subscribe, it may still have been on its way, and then reaches the new subscription."""
    item = await next_item(subscription)
    if isinstance(item, Message) and item.payload["event"] == "created":
        item = await next_item(subscription)
    assert isinstance(item, Message), item
    return item


async def test_a_session_made_on_a_is_found_on_b_and_its_expiry_on_b_ends_it_on_a(
        redis_server: RedisServer) -> None:
    """Created through A, the session is found through B; only B reaps (A's reaper is slow):
    its `expired` lifecycle event, published by B, reaches A's subscribers, and A ends its
    subscriptions inside the session's topics, though no one on A subscribed to the lifecycle
    topic (A watches every lifecycle topic itself)."""
    a_config = instance(redis_server, reap_interval=3600.0)
    b_config = instance(redis_server, reap_interval=0.05)
    async with running_broker(a_config, "a") as a, running_broker(b_config, "b") as b, \
            connect(a.url) as on_a, connect(b.url) as on_b:
        made = await on_a.create_session(session="s1", user="u", ttl=1.0)
        assert await on_b.get_session("s1", user="u") == made
        messages = await on_a.subscribe("mcp/session/s1/message")
        everything = await on_a.subscribe("mcp/session/s1/#")
        with pytest.raises(SubscriptionEnded) as ended:
            await next_item(messages)
        assert (ended.value.reason, ended.value.session) == ("session_ended", "s1")
        final = await lifecycle_after_created(everything)
        assert (final.payload["event"], final.payload["instance"]) == ("expired", "b")
        with pytest.raises(SubscriptionEnded):
            await next_item(everything)
        assert (await on_a.get_session("s1", user="u")).state == "expired"
        assert a.broker.counters["registry_expired"] == 0
        assert b.broker.counters["registry_expired"] == 1


async def test_a_delete_through_b_ends_the_subscriptions_on_a(
        redis_server: RedisServer) -> None:
    """Deleted through B: A's subscriber to the lifecycle topic gets `deleted` (from instance
    b), then its subscription ends; so does one to the session's messages on another client of
    A, and on a third instance C with nothing but that subscription (it learns of the end only
    through its own watch of every lifecycle topic). The id can be taken again."""
    config = instance(redis_server)
    async with running_broker(config, "a") as a, running_broker(config, "b") as b, \
            running_broker(config, "c") as c, connect(a.url) as on_a, \
            connect(b.url) as on_b, connect(c.url) as on_c:
        await on_a.create_session(session="s2", user="u", state="active")
        lifecycle = await on_a.subscribe("mcp/session/s2/lifecycle")
        messages = await on_c.subscribe("mcp/session/s2/message")
        await on_b.delete_session("s2", user="u")
        final = await lifecycle_after_created(lifecycle)
        assert final.payload["event"] == "deleted"
        assert final.payload["instance"] == "b"
        with pytest.raises(SubscriptionEnded):
            await next_item(lifecycle)
        with pytest.raises(SubscriptionEnded):
            await next_item(messages)
        assert c.broker.counters["subscriptions_ended"] == 1
        assert (await on_a.create_session(session="s2", user="u")).version == 1
