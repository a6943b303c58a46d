"""mqbroker.mcp and the broker's session registry and presence (docs/sessions.md): each MCP
session registered while its SDK session lives, and its owner watched (docs/mcp.md, "Sessions
across instances").

The **owner** of an MCP session is the server instance (process) whose SDK opened it: the SDK
keeps the session in that process's memory, so only it can answer the session's requests, and
only it sends the events of a request in flight. Each instance has an id (`instance`, random per
store) and names its broker connection after it (the hello's client, `mqbroker.mcp/{instance}`).
While it has the session open, that connection holds a subscription to
`{prefix}/{session}/owner`, which makes it *present* in the session; the registry record names
the owner (metadata `instance` and `client`). The owner is **alive** while a presence entry of
the session carries its client name, and **gone** once none has for `owner_grace` (its process
died: its connection closed; its broker instance died: the entry expired; the session ended).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from attrs import define, field, frozen

from mqbroker.client.aio import Client, Message, SessionNotFound, Subscription, SubscriptionEnded
from mqbroker.client.errors import ClientError
from mqbroker.mcp.replay import unsubscribe
from mqbroker.mcp.settings import StoreSettings

logger = structlog.get_logger("mqbroker.mcp")

#: The level under `{prefix}/{session}/` the owner subscribes to, to be present in the session.
OWNER_LEVEL = "owner"
#: The hello's client name of an instance's broker connection: this, then the instance id.
CLIENT_PREFIX = "mqbroker.mcp/"
#: The registry user in anonymous mode (where a user must be named), unless set.
ANONYMOUS_USER = "mqbroker.mcp"
#: Sessions per touch: the broker's `max_session_batch`.
TOUCH_BATCH = 100


@frozen
class Owner:
    """The instance that opened a session, as its registry record names it."""

    instance: str
    #: Its broker connection's client name: what its presence entries carry.
    client: str

    @classmethod
    def of(cls, instance: str) -> Owner:
        return cls(instance, CLIENT_PREFIX + instance)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Owner | None:
        """The owner a record names; None when it names none that holds presence (a session
        registered by someone else, or whose owner could not subscribe)."""
        instance, client = metadata.get("instance"), metadata.get("client")
        if metadata.get("present") is not True:
            return None
        if not isinstance(instance, str) or not isinstance(client, str):
            return None
        return cls(instance, client)

    def metadata(self, *, present: bool) -> dict[str, Any]:
        return {"instance": self.instance, "client": self.client, "present": present}


@frozen
class Lookup:
    """What the registry says of a session a client resumes."""

    #: True: a live session; False: unknown or ended; None: the registry did not answer.
    known: bool | None
    owner: Owner | None = None


def is_leave_of(payload: Any, owner: Owner) -> bool:
    """Whether a presence event says a connection of `owner` left."""
    return (isinstance(payload, dict) and payload.get("event") == "leave"
            and payload.get("client") == owner.client)


@define(eq=False)
class SessionRegistry:
    """Registers the sessions this instance opens, touches them, deletes them when the SDK ends
    them, and answers "does it exist, who owns it, is its owner alive" for resumes. Never
    raises into the SDK: every call is bounded by `registry_timeout`, and a failure is logged."""

    connected: Callable[[], Awaitable[Client]]
    settings: StoreSettings
    owner: Owner
    #: Shared with the store: registered, unregistered (touches found gone), deleted.
    stats: dict[str, int]
    #: Whether the store authenticates (then the registry user defaults to the principal).
    authenticated: bool = False
    #: The owner subscription of each registered session, and the task reading it.
    _holds: dict[str, tuple[Subscription | None, asyncio.Task[None] | None]] = field(
        factory=dict)
    _touching: asyncio.Task[None] | None = None

    @property
    def user(self) -> str | None:
        if self.settings.registry_user is not None or self.authenticated:
            return self.settings.registry_user
        return ANONYMOUS_USER

    # --- the owner's side ------------------------------------------------------------------

    async def register(self, session: str) -> None:
        """Hold the owner subscription, then create the session (active, the owner in its
        metadata, `session_ttl`); started touching. Logged, never raised, on failure."""
        if session in self._holds:
            return
        hold = await self._hold(session)
        self._holds[session] = hold
        self._keep_touching()
        try:
            async with asyncio.timeout(self.settings.registry_timeout):
                client = await self.connected()
                await client.create_session(
                    session=session, user=self.user, ttl=self.settings.session_ttl,
                    state="active", metadata=self.owner.metadata(present=hold[0] is not None))
            self.stats["registered"] += 1
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.register_failed", session=session, error=repr(e))

    async def _hold(self, session: str
                    ) -> tuple[Subscription | None, asyncio.Task[None] | None]:
        topic = self.settings.session_topic(session, OWNER_LEVEL)
        try:
            async with asyncio.timeout(self.settings.registry_timeout):
                subscription = await (await self.connected()).subscribe(topic)
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.owner_subscribe_failed", session=session, error=repr(e))
            return None, None
        reading = asyncio.get_running_loop().create_task(_drain(subscription))
        return subscription, reading

    async def release(self, session: str) -> bool:
        """Delete the session (the SDK ended it); whether the broker forgot its history with it
        (else the caller forgets it). The deletion ends the session's subscriptions on every
        instance: the owner's, and every resumed stream's."""
        subscription, reading = self._holds.pop(session, (None, None))
        if reading is not None:
            reading.cancel()
        deleted = False
        try:
            async with asyncio.timeout(self.settings.registry_timeout):
                await (await self.connected()).delete_session(session, user=self.user)
            self.stats["deleted"] += 1
            deleted = True
        except SessionNotFound:
            pass  # never registered (the registry was down then), or it expired meanwhile
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.delete_failed", session=session, error=repr(e))
        if not deleted and subscription is not None:
            await unsubscribe(subscription)
        return deleted and self.settings.inside_session(session)

    def _keep_touching(self) -> None:
        if self._touching is None or self._touching.done():
            self._touching = asyncio.get_running_loop().create_task(self._touch_forever())

    async def _touch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.session_ttl / 3)
            await self.touch()

    async def touch(self) -> None:
        """Extend every registered session, `TOUCH_BATCH` per request."""
        sessions = list(self._holds)
        for start in range(0, len(sessions), TOUCH_BATCH):
            batch = sessions[start:start + TOUCH_BATCH]
            try:
                async with asyncio.timeout(self.settings.registry_timeout):
                    client = await self.connected()
                    records = await client.touch_sessions(batch, user=self.user)
            except (ClientError, TimeoutError) as e:
                logger.warning("mcp.touch_failed", sessions=len(batch), error=repr(e))
                continue
            for session, record in zip(batch, records, strict=False):
                if record is None:  # ended meanwhile (expired during an outage, deleted)
                    self.stats["unregistered"] += 1
                    logger.warning("mcp.session_unregistered", session=session)

    async def aclose(self) -> None:
        """Stop touching and reading (the sessions stay registered until their TTL: another
        instance may resume them)."""
        tasks = [t for _, t in self._holds.values() if t is not None]
        if self._touching is not None:
            tasks.append(self._touching)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._holds.clear()

    # --- any instance's side: resumes ---------------------------------------------------------

    async def lookup(self, session: str) -> Lookup:
        """Whether the registry knows the session (live), and its owner."""
        try:
            async with asyncio.timeout(self.settings.registry_timeout):
                client = await self.connected()
                (record,) = await client.get_sessions([session], user=self.user)
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.lookup_failed", session=session, error=repr(e))
            return Lookup(None)
        if record is None or record.ended:
            return Lookup(False)
        return Lookup(True, Owner.from_metadata(record.metadata))

    async def watch(self, session: str) -> Subscription | None:
        """A subscription to the session's presence events (None if refused): made before
        `owner_gone` first asks, so that no leave falls between the two."""
        topic = self.settings.session_topic(session, "presence")
        try:
            async with asyncio.timeout(self.settings.registry_timeout):
                return await (await self.connected()).subscribe(topic)
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.presence_subscribe_failed", session=session, error=repr(e))
            return None

    async def owner_gone(self, session: str, owner: Owner, watch: Subscription) -> str:
        """Returns, with why, once the owner is gone: absent from the session's presence now
        and `owner_grace` later (checked at once, then after each leave of the owner), or the
        session ended. Never returns while that cannot be told (the broker unreachable)."""
        try:
            if await self._absent(session, owner):
                return f"the session's owner ({owner.instance}) is gone"
            async for message in watch:
                if isinstance(message, Message) and is_leave_of(message.payload, owner):
                    reason = message.payload.get("reason")
                    if await self._absent(session, owner):
                        return f"the session's owner ({owner.instance}) left ({reason})"
        except SubscriptionEnded:
            return "the session ended"
        except ClientError:
            pass  # the connection is gone: the stream's own subscription says so
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def _absent(self, session: str, owner: Owner) -> bool:
        """Whether no presence entry of the session is the owner's, now and `owner_grace`
        later (a reconnecting owner comes back meanwhile); False when the broker cannot say."""
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(self.settings.owner_grace)
            try:
                async with asyncio.timeout(self.settings.registry_timeout):
                    entries = await (await self.connected()).presence(session)
            except (ClientError, TimeoutError) as e:
                logger.warning("mcp.presence_failed", session=session, error=repr(e))
                return False
            if any(entry.client == owner.client for entry in entries):
                return False
        return True


async def _drain(subscription: Subscription) -> None:
    """Read the owner subscription (nobody should publish there; a stream left unread would
    hold up the connection) until the session ends."""
    try:
        async for _ in subscription:
            pass
    except SubscriptionEnded:
        pass  # the session ended (deleted, expired): its owner is no longer present
    except ClientError as e:
        logger.warning("mcp.owner_subscription_failed", error=repr(e))

