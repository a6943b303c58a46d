"""The application's operations, the same for the trio and the asyncio client.

Each driver supplies five primitives (queue an event to send, with and without waiting, or only
if there is room; open a subscription's stream; send a request and wait for its answer); what the
operations mean is decided here and in the sans-IO `ClientCore`.

Cancellation (a timeout around a call, say) is defined here: a cancelled `subscribe` is undone on
the broker, and a cancelled `publish`, `forget` or `presence` is withdrawn if it was not written
yet (see `publish`).

So is the credential's life: with a credential provider, each connection's hello carries what it
returns, and `keep_credential_fresh` (one task per connection, started by the driver) refreshes
the credential ahead of its expiry without reconnecting.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

from mqbroker.client.core import ClientCore, Gap, Live, Message, StreamItem, refresh_delay
from mqbroker.client.errors import (
    BrokerError,
    ClientClosed,
    ConnectionLost,
    CredentialError,
    ProtocolViolation,
    RateLimited,
    SessionNotFound,
)
from mqbroker.client.limits import Limits
from mqbroker.protocol import (
    ClientEvent,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionRequest,
    SessionTouch,
    SessionUpdate,
    SubAck,
)
from mqbroker.registry import record_of
from mqbroker.sessions import PresenceEntry, SessionPage, SessionRecord

#: What `connect(..., auth=...)` takes besides a fixed string: an async callable returning the
#: current credential (it may fetch one from an identity provider). Awaited in the client's own
#: event loop (trio or asyncio) before each connection and each refresh.
CredentialProvider = Callable[[], Awaitable[str]]


def split_credential(auth: str | CredentialProvider | None
                     ) -> tuple[str | None, CredentialProvider | None]:
    """`connect`'s `auth` as (a fixed credential, a provider): one of them, or neither."""
    if auth is None or isinstance(auth, str):
        return auth, None
    if not callable(auth):
        raise TypeError(f"auth must be a string or an async callable, not {type(auth).__name__}")
    return None, auth


class SubscriptionItems:
    """A subscription's iteration, the same for both drivers: `async for` yields every
    `Message` and `Gap`; `replay()` yields those of a `since` replay and stops at its end."""

    _client: Any

    async def _receive(self) -> StreamItem | None:
        """The stream's next item; None once it has ended (the driver's primitive)."""
        raise NotImplementedError

    def __aiter__(self) -> SubscriptionItems:
        return self

    async def __anext__(self) -> Message | Gap:
        """The next `Message`, or `Gap` where messages may be missing, in order across
        reconnects. Raises the BrokerError that ended the subscription (SubscriptionEnded,
        Forbidden after a refresh, ...) or ConnectionLost once the client gave up; stops after
        `unsubscribe()` or the client's close."""
        while True:
            item = await self._next_item()
            if type(item) is not Live:
                return item  # type: ignore[return-value]

    async def replay(self) -> AsyncIterator[Message | Gap]:
        """The items of the replay that `subscribe(..., since=...)` asked for (a `Gap` first
        when it is incomplete), then stop: the broker's suback names the replay's last message,
        so no timeout is involved. Live messages stay on the subscription for `async for`.
        Without `since` there is nothing to replay. Call it once, before iterating."""
        ack: SubAck | None = getattr(self, "ack", None)
        if ack is None or ack.recovered is None:
            return  # subscribed without `since`: no replay, no boundary on the stream
        while type(item := await self._next_item()) is not Live:
            yield item  # type: ignore[misc]

    async def _next_item(self) -> Message | Gap | Live:
        item = await self._receive()
        if item is None:
            if self._client.failure is not None:
                raise self._client.failure
            raise StopAsyncIteration
        if isinstance(item, BrokerError):
            raise item
        return item


class _Stream(Protocol):
    def close(self) -> None: ...


class _Subscription(Protocol):
    ack: SubAck | None


SubscriptionT = TypeVar("SubscriptionT", bound=_Subscription)


class Operations(Generic[SubscriptionT]):
    core: ClientCore
    failure: ConnectionLost | None
    _closed: bool
    _streams: dict[int, Any]
    #: Gives the credential of each hello and refresh; None: `core.auth` is fixed (or absent).
    credentials: CredentialProvider | None

    # --- what each driver provides ---------------------------------------------------------

    def _open_subscription(self, sub_id: int, filter: str) -> SubscriptionT:
        """A subscription object, its stream registered in `_streams` under `sub_id`."""
        raise NotImplementedError

    async def _request(self, key: tuple[str, int], event: ClientEvent) -> Any:
        """Send `event` and wait for the broker's answer to request `key`."""
        raise NotImplementedError

    async def _enqueue(self, event: ClientEvent) -> None:
        """Queue `event` to be sent, waiting for room."""
        raise NotImplementedError

    def _enqueue_nowait(self, event: ClientEvent) -> None:
        """Queue `event` to be sent; raises the driver's would-block error when full."""
        raise NotImplementedError

    def _offer(self, event: ClientEvent) -> bool:
        """Queue `event` if there is room, without waiting; whether it was queued."""
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds` (trio.sleep or asyncio.sleep)."""
        raise NotImplementedError

    # --- the credential ------------------------------------------------------------------------

    async def current_credential(self) -> None:
        """Before a connection's hello: take the provider's current credential (when there is a
        provider). Raises CredentialError when it fails: that connection attempt fails."""
        if self.credentials is None:
            return
        try:
            pending = self.credentials()
            if not inspect.isawaitable(pending):
                raise CredentialError("the credential provider must be an async callable; it "
                                      f"returned {type(pending).__name__} without awaiting")
            credential = await pending
        except CredentialError:
            raise
        except Exception as e:
            raise CredentialError(f"the credential provider failed: {e!r}") from e
        if not isinstance(credential, str):
            raise CredentialError("the credential provider returned "
                                  f"{type(credential).__name__}, not a string")
        self.core.auth = credential

    async def keep_credential_fresh(self) -> None:
        """One connection's refresh loop (its driver runs it beside the reader, and cancels it
        with the connection): while the broker says the credential expires (a `ttl`) and a
        provider can give a new one, refresh at 3/4 of the time left (not sooner than 1 s).

        A provider that fails, or a `rate_limited` answer, is tried again at 3/4 of the time
        still left. Any other refusal ends the loop: `unauthorized` closes the session, and the
        reconnect asks the provider again; `refresh_unsupported` means there is no expiry to
        beat."""
        if self.credentials is None:
            return
        ttl = self.core.ttl
        while ttl is not None:
            delay = refresh_delay(ttl)
            await self._sleep(delay)
            try:
                await self.current_credential()
                assert self.core.auth is not None
                event = self.core.refresh(self.core.auth)
                ttl = await self._request(("refresh", event.id), event)
            except (CredentialError, RateLimited):
                ttl = max(ttl - delay, 0.0)  # again, with the time still left
            except BrokerError:
                return

    # --- the operations ----------------------------------------------------------------------

    async def subscribe(self, filter: str, *, since: str | None = None) -> SubscriptionT:
        """Subscribe; returns once the broker confirmed. Raises InvalidFilter and the like.

        If cancelled, the subscription is undone on the broker: an `unsubscribe` follows the
        `subscribe` (queued at once, so it reaches the broker before any later request; or, when
        the send queue is full, sent as soon as the broker answers the subscribe).
        """
        self._check_usable()
        event = self.core.subscribe(filter, since)
        subscription = self._open_subscription(event.id, filter)
        try:
            subscription.ack = await self._request(("subscribe", event.id), event)
        except BaseException:
            self._streams.pop(event.id, None)
            self._undo_subscribe(event.id)
            raise
        return subscription

    def _undo_subscribe(self, sub_id: int) -> None:
        undo = self.core.unsubscribe(sub_id)  # None: the broker refused it, nothing to undo
        if undo is None:
            return
        if self.failure is not None or self._closed or not self._offer(undo):
            self.core.abandon(sub_id)

    async def unsubscribe(self, subscription: Any) -> None:
        event = self.core.unsubscribe(subscription.id)
        stream: _Stream | None = self._streams.pop(subscription.id, None)
        if stream is not None:
            stream.close()
        if event is not None and self.failure is None and not self._closed:
            await self._request(("unsubscribe", event.id), event)

    @property
    def limits(self) -> Limits:
        """The limits the broker's latest welcome announced (docs/protocol.md, "Limits"),
        typed; `limits.raw` is the map as sent, keys this client does not know included."""
        return self.core.welcomed

    @overload
    async def publish(self, topic: str, payload: Any = None, *, ack: Literal[True] = True,
                      msg_id: str | None = None) -> str: ...

    @overload
    async def publish(self, topic: str, payload: Any = None, *, ack: Literal[False],
                      msg_id: str | None = None) -> None: ...

    @overload
    async def publish(self, topic: str, payload: Any = None, *, ack: bool,
                      msg_id: str | None = None) -> str | None: ...

    async def publish(self, topic: str, payload: Any = None, *, ack: bool = True,
                      msg_id: str | None = None) -> str | None:
        """Publish; with ack, wait for the broker and return the message's event id.

        A publish whose topic and payload exceed the broker's `max_message_bytes` fails with
        MessageTooLarge and is never sent. If cancelled (a timeout around it, say): a publish not
        yet written to the connection, or waiting to be resent after a reconnect, is withdrawn and
        never sent; once written it may have been published, and the caller learns nothing more.
        """
        self._check_usable()
        event = self.core.publish(topic, payload, ack=ack, msg_id=msg_id)
        if event.id is None:
            await self._enqueue(event)
            return None
        result: str = await self._withdrawable(("publish", event.id), event)
        return result

    def publish_nowait(self, topic: str, payload: Any = None, *,
                       msg_id: str | None = None) -> None:
        """Queue a fire-and-forget publish without waiting (raising the driver's would-block
        error, trio.WouldBlock or asyncio.QueueFull, when the send queue is full). Publishes
        queued together go out together, in one frame."""
        self._check_usable()
        self._enqueue_nowait(self.core.publish(topic, payload, ack=False, msg_id=msg_id))

    async def forget(self, filter: str) -> int:
        """Drop the recorded history of the topics `filter` matches; returns how many."""
        self._check_usable()
        event = self.core.forget(filter)
        result: int = await self._withdrawable(("forget", event.id), event)
        return result

    async def presence(self, session: str) -> list[PresenceEntry]:
        """Who holds subscriptions to the topics of application session `session` now, on every
        broker instance sharing the presence store: one entry per connection (its instance,
        connection id, client name and principal), ordered by instance, then connection.
        Raises Unavailable, and Forbidden when the principal may not subscribe to the
        session's presence topic."""
        self._check_usable()
        event = self.core.presence(session)
        result: list[PresenceEntry] = await self._withdrawable(("presence", event.id), event)
        return result

    async def _withdrawable(self, key: tuple[str, int], event: ClientEvent) -> Any:
        """Send a request and wait for its answer; if cancelled, it is withdrawn unless it was
        already written (see `publish`)."""
        try:
            return await self._request(key, event)
        except BaseException:
            self.core.withdraw(key)
            raise

    async def latest(self, topic: str) -> str | None:
        """The event id of `topic`'s newest recorded message (None when the broker's history
        retains none): a position to `subscribe(topic, since=...)` from."""
        self._check_usable()
        event = self.core.latest(topic)
        result: str | None = await self._withdrawable(("latest", event.id), event)
        return result

    # --- the session registry (docs/sessions.md) ---------------------------------------------

    async def create_session(self, *, session: str | None = None, user: str | None = None,
                             ttl: float | None = None, state: str | None = None,
                             metadata: Mapping[str, Any] | None = None) -> SessionRecord:
        """Create a registry session (the broker makes its id unless `session` gives one).
        Raises SessionExists, Forbidden, ProtocolViolation (a field out of bounds), ..."""
        reply = await self._registry(lambda id: SessionCreate(
            id=id, session=session, user=user, ttl=ttl, state=state,
            metadata=None if metadata is None else dict(metadata)))
        return _one(reply)

    async def get_sessions(self, ids: Iterable[str], *, user: str | None = None
                           ) -> list[SessionRecord | None]:
        """The records of `ids`, in order; None for each one not found (for this user)."""
        wanted = tuple(ids)
        reply = await self._registry(lambda id: SessionGet(id=id, sessions=wanted, user=user))
        return _records(reply)

    async def get_session(self, session: str, *, user: str | None = None) -> SessionRecord:
        """One record; raises SessionNotFound."""
        (record,) = await self.get_sessions([session], user=user)
        if record is None:
            raise SessionNotFound(f"no session {session!r}", ref="session_get")
        return record

    async def touch_sessions(self, ids: Iterable[str], *, user: str | None = None,
                             ttl: float | None = None) -> list[SessionRecord | None]:
        """Extend live sessions (by their ttl, or `ttl`, kept from then on); None for each one
        absent or ended."""
        wanted = tuple(ids)
        reply = await self._registry(lambda id: SessionTouch(id=id, sessions=wanted, user=user,
                                                             ttl=ttl))
        return _records(reply)

    async def update_session(self, session: str, *, user: str | None = None,
                             state: str | None = None, metadata: Mapping[str, Any] | None = None,
                             version: int | None = None) -> SessionRecord:
        """Change the state and/or replace the metadata (only at `version`, when given).
        Raises SessionNotFound, IllegalTransition, VersionConflict."""
        reply = await self._registry(lambda id: SessionUpdate(
            id=id, session=session, user=user, state=state, version=version,
            metadata=None if metadata is None else dict(metadata)))
        return _one(reply)

    async def delete_session(self, session: str, *, user: str | None = None) -> SessionRecord:
        """Delete a session; returns the record removed. Raises SessionNotFound."""
        reply = await self._registry(lambda id: SessionDelete(id=id, session=session, user=user))
        return _one(reply)

    async def list_sessions_page(self, *, user: str | None = None, state: str | None = None,
                                 after: str | None = None, limit: int | None = None
                                 ) -> SessionPage:
        """One page of sessions in id order; its `next` is the `after` of the next page."""
        reply = await self._registry(lambda id: SessionList(id=id, user=user, state=state,
                                                            after=after, limit=limit))
        return SessionPage(records=_records(reply, nulls=False), next=reply.next)

    async def list_sessions(self, *, user: str | None = None, state: str | None = None,
                            limit: int | None = None) -> AsyncIterator[SessionRecord]:
        """Every session (of `user`, in `state`), page after page (`limit` per page)."""
        after: str | None = None
        while True:
            page = await self.list_sessions_page(user=user, state=state, after=after,
                                                 limit=limit)
            for record in page.records:
                yield record
            if page.next is None:
                return
            after = page.next

    async def _registry(self, make: Callable[[int], SessionRequest]) -> SessionReply:
        self._check_usable()
        event = self.core.registry(make)
        reply: SessionReply = await self._withdrawable((event.OP, event.id), event)
        return reply

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self.failure is not None:
            raise self.failure


def _records(reply: SessionReply, *, nulls: bool = True) -> list[Any]:
    """The reply's records (None for its nulls, where `nulls` allows them)."""
    records: list[SessionRecord | None] = []
    for values in reply.sessions:
        if values is None and nulls:
            records.append(None)
            continue
        try:
            if values is None:
                raise ValueError("null where a record must be")
            records.append(record_of(values))
        except ValueError as e:
            raise ProtocolViolation(f"the broker sent {e}", ref=reply.ref) from None
    return records


def _one(reply: SessionReply) -> SessionRecord:
    records = _records(reply, nulls=False)
    if len(records) != 1:
        raise ProtocolViolation(f"the broker answered {len(records)} records, not 1",
                                ref=reply.ref)
    record: SessionRecord = records[0]
    return record
