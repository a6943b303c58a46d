"""The session registry's stores in Redis: `RedisSessions` and `RedisPresence`.

Every operation is one thread hop and one round trip: a script call, or for a batch larger
than `BATCH` a pipeline of script calls (each script blocks Redis for its run, so a batch is
cut into calls of at most BATCH items). The scripts (registry_scripts.py) do the checking and
the writing atomically; this module packs arguments and reads answers. Redis unreachable or
too slow raises `StoreUnavailable` (the bridge's `RedisUnavailable` is one) within the
settings' connect_timeout and socket_timeout; a Redis restarted empty gets the scripts again
on their first call (NOSCRIPT reloads them). docs/redis.md, "The session registry".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
from attrs import define

from mqbroker.redact import redact
from mqbroker.sessions import (
    IllegalTransition,
    PresenceEntry,
    PresenceKey,
    Reaped,
    SessionExists,
    SessionNotFound,
    SessionPage,
    SessionRecord,
    SessionState,
    VersionConflict,
)

from .bridge import RedisBridge, RedisUnavailable
from .registry_scripts import (
    REGISTRY_SCRIPTS,
    RegistryKeys,
    announce_args,
    change_args,
    create_args,
    decode_optional,
    decode_presence,
    decode_record,
    scope,
    seconds,
    unpack_answer,
    withdraw_args,
)
from .scripts import Arg, ScriptName
from .settings import RedisSettings

_log = structlog.get_logger("mqbroker.sessions")

#: Sessions or presence entries per script call at most.
BATCH = 1000


@define(eq=False)
class _Calls:
    """Runs a script over items in calls of at most BATCH items, in one round trip."""

    bridge: RedisBridge

    async def batched(
        self, name: ScriptName, head: Sequence[Arg], items: Sequence[Arg], per_item: int = 1
    ) -> list[Any]:
        """The concatenated answers of `name` called with `head` then each chunk of `items`
        (`per_item` arguments per item); [] for no items, without asking Redis."""
        step = BATCH * per_item
        calls = [[*head, *items[start : start + step]] for start in range(0, len(items), step)]
        if len(calls) <= 1:
            return [] if not calls else list(await self.call(name, calls[0]))
        replies = await self.bridge.run(lambda: self.bridge.scripts_sync(name, calls))
        return [answer for reply in replies for answer in unpack_answer(reply)]

    async def call(self, name: ScriptName, args: Sequence[Arg]) -> Any:
        """One call of `name`, its answer unpacked."""
        return unpack_answer(await self.bridge.script(name, args))


@define(eq=False)
class RedisSessions:
    """A `SessionStore` in Redis: a hash per session and sorted sets for its indexes (by
    expiry, by id, per user, per state), shared by every instance on the same url and
    key_prefix."""

    bridge: RedisBridge
    prefix: str

    @property
    def _calls(self) -> _Calls:
        return _Calls(self.bridge)

    async def create(self, record: SessionRecord) -> None:
        created = await self._calls.call("session_create", create_args(self.prefix, record))
        if not created:
            raise SessionExists(f"session {record.id!r} exists")

    async def get(self, ids: Sequence[str], user: str | None) -> Sequence[SessionRecord | None]:
        replies = await self._calls.batched("session_get", [self.prefix, *scope(user)], ids)
        return [decode_optional(reply) for reply in replies]

    async def touch(
        self, ids: Sequence[str], user: str | None, now: float, ttl: float | None = None
    ) -> Sequence[SessionRecord | None]:
        head = [self.prefix, *scope(user), seconds(now), "" if ttl is None else seconds(ttl)]
        replies = await self._calls.batched("session_touch", head, ids)
        return [decode_optional(reply) for reply in replies]

    async def change(
        self,
        session_id: str,
        user: str | None,
        now: float,
        *,
        state: SessionState | None = None,
        metadata: Mapping[str, Any] | None = None,
        expect_version: int | None = None,
        retain: float = 0.0,
    ) -> SessionRecord:
        args = change_args(
            self.prefix, session_id, user, now,
            state=state, metadata=metadata, expect_version=expect_version, retain=retain,
        )  # fmt: skip
        status, *details = await self._calls.call("session_change", args)
        if status == b"ok":
            return decode_record(details[0])
        if status == b"conflict":
            raise VersionConflict(
                f"session {session_id!r} is at version {int(details[0])}, not {expect_version}"
            )
        if status == b"illegal" and state is not None:
            raise IllegalTransition(SessionState(details[0].decode()), state)
        raise SessionNotFound(f"no session {session_id!r}")

    async def delete(self, session_id: str, user: str | None) -> SessionRecord | None:
        reply = await self._calls.call("session_delete", [self.prefix, session_id, *scope(user)])
        return decode_optional(reply)

    async def list(
        self,
        *,
        user: str | None = None,
        state: SessionState | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> SessionPage:
        if limit < 1:
            raise ValueError(f"a page holds at least one record (limit={limit})")
        args: list[Arg] = [
            self.prefix, *scope(user), "" if state is None else state.value, after or "", limit
        ]  # fmt: skip
        last, records = await self._calls.call("session_list", args)
        return SessionPage(
            records=[decode_record(reply) for reply in records],
            next=None if last is False else last.decode(),
        )

    async def reap(self, now: float, limit: int, retain: float) -> Reaped:
        args: list[Arg] = [self.prefix, seconds(now), max(0, limit), seconds(retain)]
        expired, purged = await self._calls.call("session_reap", args)
        return Reaped(
            expired=[decode_record(reply) for reply in expired],
            purged=[decode_record(reply) for reply in purged],
        )

    async def counts(self) -> Mapping[SessionState, int]:
        states = list(SessionState)
        reply = await self._calls.call("session_counts", [self.prefix, *states])
        return dict(zip(states, map(int, reply), strict=True))


@define(eq=False)
class RedisPresence:
    """A `PresenceStore` in Redis: a hash of entries per session, and one sorted set of every
    entry by expiry for the reaper."""

    bridge: RedisBridge
    prefix: str

    @property
    def _calls(self) -> _Calls:
        return _Calls(self.bridge)

    async def announce(self, entries: Sequence[PresenceEntry]) -> None:
        args = announce_args(entries)
        await self._calls.batched("presence_announce", [self.prefix], args, per_item=4)

    async def withdraw(self, keys: Sequence[PresenceKey]) -> None:
        args = withdraw_args(keys)
        await self._calls.batched("presence_withdraw", [self.prefix], args, per_item=2)

    async def query(self, session: str, now: float) -> Sequence[PresenceEntry]:
        key = RegistryKeys(self.prefix).presence(session)
        held: dict[bytes, bytes] = await self.bridge.command("HGETALL", key)
        entries = [decode_presence(session, field, value) for field, value in held.items()]
        live = [entry for entry in entries if entry.expires > now]
        return sorted(live, key=lambda entry: (entry.instance, entry.connection))

    async def reap(self, now: float, limit: int) -> Sequence[PresenceEntry]:
        if limit < 1:
            return []  # LIMIT 0 -1 would mean "all"
        reply = await self._calls.call("presence_reap", [self.prefix, seconds(now), limit])
        return [
            decode_presence(session.decode(), field, value) for session, field, value in reply
        ]


@asynccontextmanager
async def _open_bridge(
    settings: RedisSettings | None, unreachable: str
) -> AsyncIterator[RedisBridge]:
    """A bridge running the registry's scripts; opens with Redis down too (every call then
    raises StoreUnavailable until it is back, and the first one loads the scripts)."""
    settings = settings if settings is not None else RedisSettings()
    bridge = RedisBridge.open(settings, REGISTRY_SCRIPTS)
    try:
        try:
            await bridge.load_scripts()
        except RedisUnavailable as error:
            _log.warning(unreachable, url=redact(settings.url),
                         error=redact(str(error)))  # fmt: skip
        yield bridge
    finally:
        bridge.close()


@asynccontextmanager
async def open_redis_sessions(
    settings: RedisSettings | None, config: Any = None
) -> AsyncIterator[RedisSessions]:
    """The plugin's session store ([sessions] plugin = "redis"): on `settings.url` (never a
    shard) under `settings.key_prefix`."""
    async with _open_bridge(settings, "sessions.redis_unreachable") as bridge:
        yield RedisSessions(bridge, bridge.settings.key_prefix)


@asynccontextmanager
async def open_redis_presence(
    settings: RedisSettings | None, config: Any = None
) -> AsyncIterator[RedisPresence]:
    """The plugin's presence store, beside the session store."""
    async with _open_bridge(settings, "presence.redis_unreachable") as bridge:
        yield RedisPresence(bridge, bridge.settings.key_prefix)
