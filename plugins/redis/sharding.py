"""Client-side sharding: topics spread over several Redis servers, each a plain Redis plugin.

A topic lives on one server, chosen by a hash of the topic (`shard_of`), so its counter, stream,
dedup keys and channel are all on that server and everything the single-Redis classes promise
per topic holds unchanged. `ShardedHistory` and `ShardedFanout` route each call to the shards
it concerns: one RedisHistory and one RedisFanout per server, composed, not subclassed.
docs/redis.md, "Going past one Redis", has the arguments.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import ClassVar, TypeVar
from urllib.parse import urlsplit

import attrs
import trio
from attrs import frozen

from mqbroker.config import HistoryConfig
from mqbroker.fanout import FanoutContext, FanoutOutcomeUnknown, FanoutUnavailable, Health
from mqbroker.history import HistoryUnavailable, Replay
from mqbroker.message import Draft, Message, Position
from mqbroker.topics import is_wildcard

from .fanout import CLOSE_GRACE, RedisFanout, open_redis_fanout
from .history import RedisHistory, open_redis_history
from .settings import RedisSettings

_T = TypeVar("_T")
_R = TypeVar("_R")


def shard_of(topic: str, count: int) -> int:
    """The shard (0 to count - 1) that holds `topic`: the same in every process and run."""
    # crc32, not hash(): str hashes are salted per process.
    return zlib.crc32(topic.encode()) % count


def shard_settings(settings: RedisSettings) -> list[RedisSettings]:
    """One single-Redis settings per server of `settings`, in server order."""
    return [attrs.evolve(settings, url=url, shards=[]) for url in settings.servers]


def server_name(url: str) -> str:
    """A server's URL without credentials, fit for health details and logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


@frozen
class Split:
    """A batch split by shard: each shard's items in batch order, and where each came from."""

    count: int
    #: shard -> the indexes (into the batch) of its items, ascending.
    indexes: Mapping[int, Sequence[int]]

    @classmethod
    def of(cls, topics: Sequence[str], count: int) -> Split:
        indexes: dict[int, list[int]] = collections.defaultdict(list)
        for index, topic in enumerate(topics):
            indexes[shard_of(topic, count)].append(index)
        return cls(count, dict(indexes))

    def parts(self, batch: Sequence[_T]) -> dict[int, list[_T]]:
        return {shard: [batch[i] for i in indexes] for shard, indexes in self.indexes.items()}

    def merge(self, results: Mapping[int, Sequence[_R]]) -> list[_R]:
        """The shards' results put back in batch order."""
        merged: dict[int, _R] = {}
        for shard, indexes in self.indexes.items():
            merged.update(zip(indexes, results[shard], strict=True))
        return [merged[index] for index in range(len(merged))]


async def each_shard(
    call: Callable[[int], Awaitable[_R]], shards: Sequence[int]
) -> tuple[dict[int, _R], dict[int, Exception]]:
    """Run `call(shard)` for every shard concurrently; one shard's failure cancels no other.

    Returns the results and the failures (only FanoutUnavailable and HistoryUnavailable are
    caught: both are what a shard's Redis being away raises).
    """
    results: dict[int, _R] = {}
    failures: dict[int, Exception] = {}

    async def one(shard: int) -> None:
        try:
            results[shard] = await call(shard)
        except (FanoutUnavailable, HistoryUnavailable) as error:
            failures[shard] = error

    if len(shards) == 1:
        await one(shards[0])
        return results, failures
    async with trio.open_nursery() as nursery:
        for shard in shards:
            nursery.start_soon(one, shard)
    return results, failures


def first_failure(failures: Mapping[int, Exception], urls: Sequence[str]) -> Exception | None:
    """The lowest shard's failure, its message prefixed with the shard; None if none failed."""
    if not failures:
        return None
    shard = min(failures)
    error = failures[shard]
    return type(error)(f"shard {shard} ({server_name(urls[shard])}): {error}")


# --- the history ---------------------------------------------------------------------------


@attrs.define(eq=False)
class ShardedHistory:
    """The `HistoryStore` over several Redis servers: one RedisHistory per shard.

    Each shard keeps its own epoch, so a position's epoch is that of its topic's shard.
    """

    shards: Sequence[RedisHistory]

    @property
    def urls(self) -> list[str]:
        return [shard.settings.url for shard in self.shards]

    def shard_for(self, topic: str) -> RedisHistory:
        return self.shards[shard_of(topic, len(self.shards))]

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        split = Split.of([draft.topic for draft in drafts], len(self.shards))
        parts = split.parts(drafts)
        results, failures = await each_shard(
            lambda shard: self.shards[shard].append(parts[shard]), list(parts)
        )
        _raise_first(failures, self.urls)
        return split.merge(results)

    async def read(self, topic: str, since: Position) -> Replay:
        return await self.shard_for(topic).read(topic, since)

    async def latest(self, topic: str) -> Position | None:
        return await self.shard_for(topic).latest(topic)

    async def forget(self, filter: str) -> int:
        if not is_wildcard(filter):
            return await self.shard_for(filter).forget(filter)
        every = range(len(self.shards))
        results, failures = await each_shard(lambda s: self.shards[s].forget(filter), every)
        _raise_first(failures, self.urls)
        return sum(results.values())

    def stats(self) -> dict[str, int]:
        return _summed(shard.stats() for shard in self.shards)


def _raise_first(failures: Mapping[int, Exception], urls: Sequence[str]) -> None:
    error = first_failure(failures, urls)
    if error is not None:
        raise error from failures[min(failures)]


def _summed(each: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for stats in each:
        total.update(stats)
    return dict(total)


@asynccontextmanager
async def open_sharded_history(
    settings: RedisSettings, config: HistoryConfig
) -> AsyncIterator[ShardedHistory]:
    """A ShardedHistory with a RedisHistory open on every server of `settings`."""
    async with AsyncExitStack() as stack:
        shards = [
            await stack.enter_async_context(open_redis_history(one, config))
            for one in shard_settings(settings)
        ]
        yield ShardedHistory(shards)


# --- the fan-out ---------------------------------------------------------------------------


@attrs.define(eq=False)
class ShardedFanout:
    """The `Fanout` over several Redis servers: one RedisFanout per shard, one `deliver`.

    A publish whose drafts span shards publishes each shard's part independently and at
    once; if any shard is unavailable the call raises FanoutUnavailable, though the parts on
    healthy shards were published (a retry with msg_id is de-duplicated: a topic's dedup
    keys live on its shard).
    """

    local: ClassVar[bool] = False

    shards: Sequence[RedisFanout]

    @property
    def urls(self) -> list[str]:
        return [shard.settings.url for shard in self.shards]

    def shard_for(self, topic: str) -> RedisFanout:
        return self.shards[shard_of(topic, len(self.shards))]

    async def publish(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        if not drafts:
            return []
        split = Split.of([draft.topic for draft in drafts], len(self.shards))
        parts = split.parts(drafts)
        results, failures = await each_shard(
            lambda shard: self.shards[shard].publish(parts[shard]), list(parts)
        )
        if failures and (results or any(
                isinstance(e, FanoutOutcomeUnknown) for e in failures.values())):
            # Part of the batch was published (or may have been): `unavailable` would promise
            # that none of it was.
            error = first_failure(failures, self.urls)
            also = "; the batch's other shards published theirs" if results else ""
            raise FanoutOutcomeUnknown(f"{error}{also}") from error
        _raise_first(failures, self.urls)
        return split.merge(results)

    async def watch(self, filter: str) -> None:
        if not is_wildcard(filter):
            await self.shard_for(filter).watch(filter)
            return
        # A wildcard may match topics of every shard; each topic's messages come from its
        # own shard only, so watching it everywhere delivers each message once.
        watched: list[RedisFanout] = []
        try:
            for shard in self.shards:
                await shard.watch(filter)
                watched.append(shard)
        except BaseException:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                for shard in watched:
                    await shard.unwatch(filter)
            raise

    async def unwatch(self, filter: str) -> None:
        shards = self.shards if is_wildcard(filter) else [self.shard_for(filter)]
        for shard in shards:
            await shard.unwatch(filter)

    #: Summed over the shards, levels stay levels.
    STAT_GAUGES: ClassVar[frozenset[str]] = RedisFanout.STAT_GAUGES

    def health(self) -> Health:
        failing = [
            f"shard {index} ({server_name(shard.settings.url)}): {health.detail}"
            for index, shard in enumerate(self.shards)
            if not (health := shard.health()).ok
        ]
        return Health(ok=not failing, detail="; ".join(failing))

    def stats(self) -> dict[str, int]:
        return _summed(shard.stats() for shard in self.shards)


def _shard_context(context: FanoutContext, index: int, urls: Sequence[str]) -> FanoutContext:
    """Shard `index`'s context: recording through the same server's history when the
    history is sharded over the same servers, so each shard's script records as it publishes."""
    history = context.history
    if isinstance(history, ShardedHistory) and history.urls == list(urls):
        return attrs.evolve(context, history=history.shards[index])
    return context


@asynccontextmanager
async def open_sharded_fanout(
    settings: RedisSettings, context: FanoutContext
) -> AsyncIterator[ShardedFanout]:
    """A ShardedFanout with a RedisFanout open on every server of `settings`."""
    async with AsyncExitStack() as stack:
        urls = settings.servers
        shards = [
            await stack.enter_async_context(
                open_redis_fanout(one, _shard_context(context, index, urls))
            )
            for index, one in enumerate(shard_settings(settings))
        ]
        yield ShardedFanout(shards)
