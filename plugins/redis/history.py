"""The Redis Streams history store: one stream per recorded topic, shared by every instance.

A topic's messages live in the stream `{prefix}s:{topic}` with ids `0-<offset>`; its offset
counter `{prefix}o:{topic}` outlives the stream so that a resume after expiry or `forget`
can tell a loss from "nothing new". Appends go through the publish script (without PUBLISH);
when the fan-out is Redis too, it records through the same script as it publishes and
`append` is not called at all (docs/redis.md, "Recording").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import structlog
import trio
from attrs import define, field

from mqbroker.config import HistoryConfig
from mqbroker.history import Replay
from mqbroker.message import Draft, Message, Position
from mqbroker.redact import redact
from mqbroker.topics import FilterSet, is_wildcard, matches

from .bridge import RedisBridge, RedisUnavailable
from .channels import KeyLayout
from .scripts import (
    Outbound,
    PublishCall,
    StreamBounds,
    latest_args,
    latest_of,
    read_args,
    replay_of,
)
from .settings import RedisSettings
from .writer import ScriptWriter

_log = structlog.get_logger("mqbroker.history")


@define(eq=False, kw_only=True)
class RedisHistory:
    """The `HistoryStore` in Redis Streams.

    max_messages and max_age are kept per topic by the scripts (and exactly on read);
    max_topics and max_bytes are left to Redis' own `maxmemory` policy, see docs/redis.md.
    """

    settings: RedisSettings
    config: HistoryConfig
    bridge: RedisBridge
    layout: KeyLayout
    bounds: StreamBounds
    #: The topics the broker records (the fan-out refills only those after an outage).
    recorded: FilterSet
    writer: ScriptWriter
    #: Fan-out writers that record into this store through their own publish script.
    _recorders: list[ScriptWriter] = field(factory=list)
    _reads: int = 0
    _forgotten: int = 0

    @classmethod
    def create(
        cls, settings: RedisSettings, config: HistoryConfig, bridge: RedisBridge
    ) -> RedisHistory:
        layout = KeyLayout(settings.key_prefix)
        bounds = StreamBounds.of(config, settings.offset_ttl)
        call = PublishCall(layout=layout, bounds=bounds, dedup_ms=0, publish=False, record="all")
        return cls(
            settings=settings,
            config=config,
            bridge=bridge,
            layout=layout,
            bounds=bounds,
            recorded=FilterSet(config.record),
            writer=ScriptWriter(bridge, call),
        )

    def attach(self, recorder: ScriptWriter) -> None:
        """Count what a fan-out's writer records here as this store's appends."""
        self._recorders.append(recorder)

    def detach(self, recorder: ScriptWriter) -> None:
        self._recorders.remove(recorder)

    async def append(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        if not drafts:
            return []
        return await self.writer.write([Outbound.of(draft) for draft in drafts])

    async def read(self, topic: str, since: Position) -> Replay:
        reply = await self.bridge.script("read", read_args(self.layout, topic, since))
        self._reads += 1
        return replay_of(reply, since, self.bounds)

    async def latest(self, topic: str) -> Position | None:
        reply = await self.bridge.script("latest", latest_args(self.layout, topic))
        return latest_of(reply, self.bounds)

    async def forget(self, filter: str) -> int:
        """Drop the streams `filter` matches; their offset counters stay, so that a read
        from an old position reports TRIMMED and later appends never reuse a position."""
        if is_wildcard(filter):
            forgotten = await self.bridge.run(lambda: self._forget_matching_sync(filter))
        else:
            key = self.layout.stream_key(filter)
            forgotten = await self.bridge.run(lambda: self.bridge.delete_sync([key]))
        self._forgotten += forgotten
        return forgotten

    def _forget_matching_sync(self, filter: str) -> int:
        # SCAN's glob over-approximates the filter; `matches` decides.
        keys = self.bridge.scan_sync(self.layout.stream_scan_glob(filter))
        return self.bridge.delete_sync(
            [key for key in keys if matches(filter, self.layout.stream_topic(key))]
        )

    def stats(self) -> dict[str, int]:
        writers = [self.writer, *self._recorders]
        return {
            "appended": sum(writer.recorded for writer in writers),
            "evicted_messages": sum(writer.evicted for writer in writers),
            "reads": self._reads,
            "forgotten_topics": self._forgotten,
        }


@asynccontextmanager
async def open_redis_history(
    settings: RedisSettings | None, config: HistoryConfig
) -> AsyncIterator[RedisHistory]:
    """A RedisHistory with its writer task running; opens with Redis down too (every call
    then raises HistoryUnavailable until it is back)."""
    settings = settings if settings is not None else RedisSettings()
    bridge = RedisBridge.open(settings)
    try:
        history = RedisHistory.create(settings, config, bridge)
        try:
            await bridge.load_scripts()
        except RedisUnavailable as error:
            # Not fatal: calls fail until Redis is back, and the first one loads them then.
            _log.warning("history.redis_unreachable", url=redact(settings.url),
                         error=redact(str(error)))
        async with trio.open_nursery() as nursery:
            await nursery.start(history.writer.serve)
            try:
                yield history
            finally:
                nursery.cancel_scope.cancel()
    finally:
        bridge.close()
