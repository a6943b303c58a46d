"""The application's operations, the same for the trio and the asyncio client.

Each driver supplies five primitives (queue an event to send, with and without waiting, or only
if there is room; open a subscription's stream; send a request and wait for its answer); what the
operations mean is decided here and in the sans-IO `ClientCore`.

Cancellation (a timeout around a call, say) is defined here: a cancelled `subscribe` is undone on
the broker, and a cancelled `publish`, `forget` or `presence` is withdrawn if it was not written
yet (see `publish`).
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from mqbroker.client.core import ClientCore
from mqbroker.client.errors import ClientClosed, ConnectionLost
from mqbroker.protocol import ClientEvent, Forget, Presence, SubAck
from mqbroker.sessions import PresenceEntry


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
        key = ("publish", event.id)
        try:
            result: str = await self._request(key, event)
        except BaseException:
            self.core.withdraw(key)
            raise
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
        result: int = await self._ask(self.core.forget(filter))
        return result

    async def presence(self, session: str) -> list[PresenceEntry]:
        """Who holds subscriptions to the topics of application session `session` now, on every
        broker instance sharing the presence store: one entry per connection (its instance,
        connection id, client name and principal), ordered by instance, then connection.
        Raises Unavailable, and a BrokerError coded `forbidden` when the principal may not
        subscribe to the session's presence topic."""
        self._check_usable()
        result: list[PresenceEntry] = await self._ask(self.core.presence(session))
        return result

    async def _ask(self, event: Forget | Presence) -> Any:
        """Send a request and wait for its answer; if cancelled, it is withdrawn (as a publish
        is: unless already written)."""
        key = (event.OP, event.id)
        try:
            return await self._request(key, event)
        except BaseException:
            self.core.withdraw(key)
            raise

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self.failure is not None:
            raise self.failure
