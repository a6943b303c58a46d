"""The application's operations, the same for the trio and the asyncio client.

Each driver supplies five primitives (queue an event to send, with and without waiting, or only
if there is room; open a subscription's stream; send a request and wait for its answer); what the
operations mean is decided here and in the sans-IO `ClientCore`.

Cancellation (a timeout around a call, say) is defined here: a cancelled `subscribe` is undone on
the broker, and a cancelled `publish` or `forget` is withdrawn if it was not written yet (see
`publish`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Generic, Protocol, TypeVar

from mqbroker.client.core import ClientCore, Gap, Live, Message, StreamItem
from mqbroker.client.errors import BrokerError, ClientClosed, ConnectionLost
from mqbroker.protocol import ClientEvent, SubAck


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
        event = self.core.forget(filter)
        key = ("forget", event.id)
        try:
            result: int = await self._request(key, event)
        except BaseException:
            self.core.withdraw(key)  # as for publish: withdrawn unless already written
            raise
        return result

    async def latest(self, topic: str) -> str | None:
        """The event id of `topic`'s newest recorded message (None when the broker's history
        retains none): a position to `subscribe(topic, since=...)` from."""
        self._check_usable()
        event = self.core.latest(topic)
        key = ("latest", event.id)
        try:
            result: str | None = await self._request(key, event)
        except BaseException:
            self.core.withdraw(key)
            raise
        return result

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self.failure is not None:
            raise self.failure
