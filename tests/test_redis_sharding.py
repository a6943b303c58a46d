"""The Redis plugin sharded over three private redis-server processes: routing, delivery, faults.

Each test opens broker-instance parts through the plugin's own factories (`plugin.open_history`,
`plugin.open_fanout`) with `shards` set, so the factories' choice of the sharded classes is
exercised too. Where Redis gives no event to wait on (a dead server), health is polled.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager

import pytest
import redis
import trio
from attrs import define
from hypothesis import given
from hypothesis import strategies as st

from mqbroker.config import Config, ConfigError, HistoryConfig, SettingMismatch, plugin_settings
from mqbroker.fanout import FanoutContext, FanoutUnavailable
from mqbroker.history import Gap
from mqbroker.message import Draft, Message
from mqbroker.plugins import load_plugin
from mqbroker_plugins.redis import (
    RedisSettings,
    ShardedFanout,
    ShardedHistory,
    plugin,
    shard_of,
)
from mqbroker_plugins.redis.sharding import server_name
from tests.redis_fixtures import WAIT, Inbox, draft, settings_for
from tests.redis_server import RedisServer

SHARDS = 3
RECORDED = HistoryConfig(record=("rec/#",))


@pytest.fixture
def servers() -> Iterator[list[RedisServer]]:
    """Three private, empty redis-servers, stopped after the test."""
    with ExitStack() as stack:
        yield [stack.enter_context(RedisServer()) for _ in range(SHARDS)]


@pytest.fixture
def sharded(servers: list[RedisServer]) -> RedisSettings:
    """Plugin settings sharding over the three servers."""
    return settings_for(servers[0], shards=[server.url for server in servers[1:]])


def topic_on(shard: int, stem: str) -> str:
    """The first topic `{stem}/{n}` that lives on `shard`."""
    return next(f"{stem}/{n}" for n in range(1000) if shard_of(f"{stem}/{n}", SHARDS) == shard)


def topics_by_shard(stem: str) -> list[str]:
    """One topic per shard, shard 0 first."""
    return [topic_on(shard, stem) for shard in range(SHARDS)]


@define
class Node:
    """One broker instance's sharded plugin parts."""

    fanout: ShardedFanout
    history: ShardedHistory
    inbox: Inbox

    async def publish(self, *drafts: Draft) -> list[Message]:
        with trio.fail_after(WAIT):
            return list(await self.fanout.publish(drafts))

    async def watch(self, *filters: str) -> None:
        with trio.fail_after(WAIT):
            for filter in filters:
                await self.fanout.watch(filter)


@asynccontextmanager
async def open_node(settings: RedisSettings, instance_id: str) -> AsyncIterator[Node]:
    """The plugin's history and fan-out on `settings`, delivering into a fresh Inbox."""
    assert plugin.open_history is not None and plugin.open_fanout is not None
    inbox = Inbox()
    async with plugin.open_history(settings, RECORDED) as history:
        context = FanoutContext(
            instance_id=instance_id, history=history, deliver=inbox.deliver, dedup_window=60.0
        )
        async with plugin.open_fanout(settings, context) as fanout:
            assert isinstance(history, ShardedHistory) and isinstance(fanout, ShardedFanout)
            yield Node(fanout=fanout, history=history, inbox=inbox)


async def until_health(fanout: ShardedFanout, ok: bool) -> None:
    """Poll health until it is `ok` (Redis gives no event for its own death)."""
    with trio.fail_after(WAIT):
        while fanout.health().ok != ok:  # noqa: ASYNC110 - health() is a state, not an event
            await trio.sleep(0.01)


def keys_on(server: RedisServer, prefix: str) -> list[str]:
    with redis.Redis.from_url(server.url) as client:
        return [key.decode() for key in client.scan_iter(match=f"{prefix}*")]


# --- routing -------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=16))
def test_a_topic_maps_to_one_shard_in_range(topic: str, count: int) -> None:
    """Every topic maps to a shard in 0..count-1, the same one on every call."""
    shard = shard_of(topic, count)
    assert 0 <= shard < count
    assert shard_of(topic, count) == shard


def test_the_mapping_is_the_same_in_another_process() -> None:
    """Another interpreter, with another string-hash seed, maps topics to the same shards:
    instances agree on where a topic lives."""
    topics = [f"mcp/session/s{n}/message" for n in range(200)]
    script = (
        "import sys; from mqbroker_plugins.redis import shard_of; "
        "print(','.join(str(shard_of(t, 3)) for t in sys.argv[1:]))"
    )
    env = {"PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, *topics], capture_output=True, check=True, env=env
    )
    theirs = [int(shard) for shard in result.stdout.decode().strip().split(",")]
    assert theirs == [shard_of(topic, 3) for topic in topics]


def test_topics_spread_over_the_shards() -> None:
    """Many session topics spread over three shards, none holding much more than its share."""
    counts = collections.Counter(shard_of(f"mcp/session/s{n}/message", 3) for n in range(3000))
    assert sorted(counts) == [0, 1, 2]
    assert all(800 <= count <= 1200 for count in counts.values()), counts


def test_shard_urls_are_validated() -> None:
    """A shard URL is checked like `url`; repeating a server is refused."""
    with pytest.raises(SettingMismatch, match="expected a redis://") as refused:
        RedisSettings(shards=["http://example:6379"])
    assert refused.value.key == ("shards",)
    with pytest.raises(ValueError, match="each listed once"):
        RedisSettings(url="redis://a:1/0", shards=["redis://b:1/0", "redis://a:1/0"])


def test_shards_are_read_from_the_config_table() -> None:
    """`shards` in `[plugins.redis]` is an array of URLs; a bad one is named by the loader."""
    table = {"url": "redis://a:1/0", "shards": ["redis://b:1/0", "unix:///c.sock"]}
    loaded = plugin_settings(Config(plugins={"redis": table}), load_plugin("redis"))
    assert loaded.servers == ("redis://a:1/0", "redis://b:1/0", "unix:///c.sock")
    for bad in ("redis://b:1/0", ["http://b"]):
        with pytest.raises(ConfigError, match="shards"):
            plugin_settings(Config(plugins={"redis": {"shards": bad}}), load_plugin("redis"))


# --- delivery ------------------------------------------------------------------------------


async def test_batches_across_shards_keep_draft_order_and_topic_order(
    sharded: RedisSettings,
) -> None:
    """A publishes batches whose drafts span every shard; both A and B receive each topic's
    messages once, in the order publish returned them (the history's positions), and
    publish returns the messages in draft order."""
    topics = topics_by_shard("rec/order")
    async with open_node(sharded, "a") as a, open_node(sharded, "b") as b:
        await a.watch(*topics)
        await b.watch(*topics)
        published: list[Message] = []
        for batch in range(5):
            drafts = [draft(t, [batch, n], record=True) for n in range(3) for t in topics]
            returned = await a.publish(*drafts)
            assert [(m.topic, m.payload) for m in returned] == [
                (d.topic, d.payload) for d in drafts
            ]
            published += returned
        for inbox in (a.inbox, b.inbox):
            for last in published[-SHARDS:]:  # the last message of each topic
                await inbox.wait_for(last)
            for topic in topics:
                mine = [m for m in published if m.topic == topic]
                assert inbox.on(topic) == mine
                offsets = [m.position.offset for m in mine]
                assert offsets == sorted(set(offsets))


async def test_each_shard_records_as_it_publishes(sharded: RedisSettings) -> None:
    """Each shard's fan-out records through the same server's history (one script call), so
    the history's append counter moves with publishes and `append` is not needed."""
    async with open_node(sharded, "a") as a:
        for index, shard in enumerate(a.fanout.shards):
            assert shard.records_into is a.history.shards[index]
        await a.publish(*[draft(t, 1, record=True) for t in topics_by_shard("rec/own")])
        assert a.history.stats()["appended"] == SHARDS


async def test_a_topics_keys_live_only_on_its_shard(
    servers: list[RedisServer], sharded: RedisSettings
) -> None:
    """Counter, stream and dedup keys of a topic are on its shard's server and no other."""
    topics = topics_by_shard("rec/keys")
    async with open_node(sharded, "a") as a:
        await a.publish(*[draft(t, 1, record=True, msg_id="m1") for t in topics])
    for index, server in enumerate(servers):
        keys = [key for key in keys_on(server, sharded.key_prefix) if "rec/keys/" in key]
        holders = {
            topic
            for topic in topics
            if any(key.endswith(topic) or f":{topic}:" in key for key in keys)
        }
        assert holders == {topics[index]}, keys
        assert len(keys) == 3, keys  # o:, s: and d: of that one topic


async def test_a_wildcard_watch_gets_every_shards_topics_once(sharded: RedisSettings) -> None:
    """A wildcard watch on B receives topics of every shard exactly once: the last message
    on each shard, published after all the others, arrives after every copy could have."""
    topics = topics_by_shard("wild")
    async with open_node(sharded, "a") as a, open_node(sharded, "b") as b:
        await b.watch("wild/#", "wild/+")
        first = await a.publish(*[draft(t, n) for n in range(4) for t in topics])
        last = await a.publish(*[draft(t, "last") for t in topics])
        await b.inbox.wait_until(lambda: all(m in b.inbox.messages for m in last))
        assert sorted(map(repr, b.inbox.messages)) == sorted(map(repr, first + last))
        # Both wildcards were live on every shard: each shard dropped the second copies.
        assert all(shard.stats()["copies_dropped"] > 0 for shard in b.fanout.shards)


async def test_unwatching_a_wildcard_stops_it_on_every_shard(sharded: RedisSettings) -> None:
    """After unwatch, a wildcard watch is gone from every shard's fan-out."""
    async with open_node(sharded, "a") as a:
        await a.watch("any/#")
        assert [shard.stats()["watches"] for shard in a.fanout.shards] == [1] * SHARDS
        with trio.fail_after(WAIT):
            await a.fanout.unwatch("any/#")
        assert [shard.stats()["watches"] for shard in a.fanout.shards] == [0] * SHARDS


# --- history -------------------------------------------------------------------------------


async def test_resume_after_a_position_works_on_every_shard(sharded: RedisSettings) -> None:
    """Reading a topic since one of its positions returns exactly what followed, recovered,
    whichever shard it lives on, and from another instance's history too."""
    topics = topics_by_shard("rec/resume")
    async with open_node(sharded, "a") as a, open_node(sharded, "b") as b:
        published = await a.publish(*[draft(t, n, record=True) for n in range(4) for t in topics])
        for topic in topics:
            mine = [m for m in published if m.topic == topic]
            with trio.fail_after(WAIT):
                replay = await b.history.read(topic, mine[0].position)
            assert replay.recovered
            assert list(replay.messages) == mine[1:]


async def test_append_and_forget_route_by_topic(sharded: RedisSettings) -> None:
    """append positions drafts of every shard in draft order; forget of an exact topic drops
    only it, a wildcard forget asks every shard and sums."""
    topics = topics_by_shard("rec/forget")
    async with open_node(sharded, "a") as a:
        with trio.fail_after(WAIT):
            appended = await a.history.append([draft(t, "x", record=True) for t in topics])
            assert [m.topic for m in appended] == topics
            assert await a.history.forget(topics[1]) == 1
            assert await a.history.forget("rec/forget/#") == SHARDS - 1
            replay = await a.history.read(topics[0], appended[0].position)
        assert replay.gap is None or replay.gap is Gap.TRIMMED
        assert a.history.stats()["forgotten_topics"] == SHARDS


async def test_a_flushed_shard_reports_unknown_epoch_for_its_topics_only(
    servers: list[RedisServer], sharded: RedisSettings
) -> None:
    """FLUSHALL on shard 2's server: an old position of a topic on shard 2 is an unknown
    epoch; topics on the other shards resume, recovered."""
    topics = topics_by_shard("rec/flush")
    async with open_node(sharded, "a") as a:
        old = await a.publish(*[draft(t, "before", record=True) for t in topics])
        with redis.Redis.from_url(servers[2].url) as client:
            client.flushall()
        new = await a.publish(*[draft(t, "after", record=True) for t in topics])
        for shard, topic in enumerate(topics):
            with trio.fail_after(WAIT):
                replay = await a.history.read(topic, old[shard].position)
            assert list(replay.messages) == [new[shard]]
            assert replay.gap is (Gap.UNKNOWN_EPOCH if shard == 2 else None)


# --- faults --------------------------------------------------------------------------------


async def test_a_stopped_shard_degrades_health_and_refuses_only_its_topics(
    servers: list[RedisServer], sharded: RedisSettings
) -> None:
    """Shard 1's server stops: health is degraded naming that server; publishes to its
    topics (alone or in a mixed batch) raise FanoutUnavailable, while topics of the other
    shards still publish and reach B."""
    topics = topics_by_shard("down")
    async with open_node(sharded, "a") as a, open_node(sharded, "b") as b:
        await b.watch(topics[0], topics[2])
        await trio.to_thread.run_sync(servers[1].stop)
        await until_health(a.fanout, ok=False)
        detail = a.fanout.health().detail
        assert f"shard 1 ({server_name(servers[1].url)})" in detail
        assert "shard 0" not in detail and "shard 2" not in detail
        with trio.fail_after(WAIT):
            with pytest.raises(FanoutUnavailable, match="shard 1"):
                await a.fanout.publish([draft(topics[1], "lost")])
            with pytest.raises(FanoutUnavailable, match="shard 1"):
                await a.fanout.publish([draft(t, "mixed") for t in topics])
        healthy = await a.publish(draft(topics[0], "ok"), draft(topics[2], "ok"))
        await b.inbox.wait_until(lambda: all(m in b.inbox.messages for m in healthy))
        await trio.to_thread.run_sync(servers[1].start)
        await until_health(a.fanout, ok=True)
