"""The SDK's `SubscriptionBus` over an mqbroker topic: `subscriptions/listen` across instances.

An event a tool publishes on one instance (tools list changed, a resource updated) reaches the
listen streams of every instance: it is published on the bus topic, and each instance's bus
hands what arrives there to its local listeners. Delivery is fire-and-forget with no replay,
as the SDK specifies for the bus (a dropped listen stream re-listens and refetches).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from attrs import define, field
from mcp.shared.subscriptions import ServerEvent, event_from_wire, event_to_notification

from mqbroker.client import aio
from mqbroker.client.errors import ClientError

logger = structlog.get_logger("mqbroker.mcp")

#: The default topic of the bus's events (not recorded by the broker's default [history]).
DEFAULT_BUS_TOPIC = "mcp/events"


@define(eq=False)
class BrokerSubscriptionBus:
    """`mcp.server.subscriptions.SubscriptionBus` backed by the broker topic `topic`.

    Open it (`async with bus:`) before serving; `resumable(..., bus=bus)` does."""

    url: str
    topic: str = DEFAULT_BUS_TOPIC
    #: How long `publish` may wait for the broker before giving up (logged, not raised).
    publish_wait: float = 1.0
    connect_options: dict[str, Any] = field(factory=dict)
    _listeners: dict[object, Callable[[ServerEvent], None]] = field(factory=dict)
    _client: aio.Client | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BrokerSubscriptionBus:
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            aio.connect(self.url, name="mqbroker.mcp.bus", **self.connect_options))
        subscription = await self._client.subscribe(self.topic)
        self._reader = asyncio.get_running_loop().create_task(self._read(subscription))
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._stack is not None:
            await self._stack.aclose()
        self._client = self._stack = self._reader = None

    async def publish(self, event: ServerEvent) -> None:
        """Publish `event` to every instance's listeners (this one's included, through the
        broker). Never raises: a failure is logged."""
        wire = event_to_notification(event, {}).model_dump(by_alias=True, exclude_none=True)
        payload = {"method": wire["method"], "params": wire.get("params")}
        try:
            if self._client is None:
                raise ClientError("the bus is not open")
            async with asyncio.timeout(self.publish_wait):
                await self._client.publish(self.topic, payload)
        except (ClientError, TimeoutError) as e:
            logger.warning("mcp.bus_publish_failed", error=repr(e))

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    async def _read(self, subscription: aio.Subscription) -> None:
        async for item in subscription:
            if not isinstance(item, aio.Message) or not isinstance(item.payload, dict):
                continue  # a Gap: events may have been missed; listeners refetch on re-listen
            method, params = item.payload.get("method"), item.payload.get("params")
            if not isinstance(method, str):
                continue
            event = event_from_wire(method, params if isinstance(params, dict) else None)
            if event is not None:
                self._deliver(event)

    def _deliver(self, event: ServerEvent) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(event)
            except Exception:  # one bad listener must not starve the others (as the SDK's)
                logger.exception("mcp.bus_listener_failed")
