"""The trio client's own behaviour: errors as themselves, reconnecting, giving up."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mqbroker.client import (
    ConnectError,
    ConnectionLost,
    Gap,
    InvalidFilter,
    InvalidTopic,
    Message,
    Reconnect,
    connect,
)
from mqbroker.config import Config, ServerConfig
from tests.harness import free_port, running_broker

FAST = Reconnect(initial_delay=0.01, max_delay=0.05)


async def test_nothing_listening_raises_connect_error() -> None:
    """A first connection that fails raises ConnectError, not an exception group."""
    with pytest.raises(ConnectError):
        async with connect(f"ws://127.0.0.1:{free_port()}/"):
            raise AssertionError("connected to nothing")


async def test_broker_errors_leave_the_block_as_themselves() -> None:
    """A typed broker error raised inside `async with connect()` comes out unwrapped."""
    async with running_broker() as broker:
        with pytest.raises(InvalidTopic):
            async with connect(broker.url) as client:
                await client.publish("a/+", 1)
        with pytest.raises(InvalidFilter):
            async with connect(broker.url) as client:
                await client.subscribe("a/#/b")


async def test_keeps_reconnecting_while_the_broker_is_down() -> None:
    """Failed reconnect attempts are retried with backoff; once the broker is back, the client
    resumes, and a publish made meanwhile goes through."""
    config = Config(server=ServerConfig(port=free_port()))
    async with running_broker(config) as broker, connect(broker.url, reconnect=FAST) as client:
        subscription = await client.subscribe("mcp/session/s1/message")
        await broker.listener.shutdown()
        await trio.sleep(0.3)  # the outage itself: several reconnect attempts fail meanwhile
        async with running_broker(config):
            with trio.fail_after(10):
                event_id = await client.publish("mcp/session/s1/message", "back")
                item = await subscription.__anext__()
                if isinstance(item, Gap):  # nothing had been delivered: nothing to resume from
                    item = await subscription.__anext__()
    assert isinstance(item, Message) and (item.payload, item.event_id) == ("back", event_id)


async def test_gives_up_when_reconnecting_is_off() -> None:
    """With reconnect disabled, a dropped connection ends subscriptions with ConnectionLost
    and later operations raise it too."""
    async with running_broker() as broker, \
            connect(broker.url, reconnect=Reconnect(enabled=False)) as client:
        subscription = await client.subscribe("t")
        await broker.listener.shutdown()
        with trio.fail_after(5), pytest.raises(ConnectionLost):
            await subscription.__anext__()
        with pytest.raises(ConnectionLost):
            await client.publish("t", 1)


async def test_unsubscribe_while_its_stream_is_full() -> None:
    """Unsubscribing a subscription whose stream is full (the app stopped reading it, so the
    client's reader waits on it) frees the reader: other subscriptions flow again."""
    async with running_broker() as broker, connect(broker.url, buffer=2) as client:
        full = await client.subscribe("full")
        other = await client.subscribe("other")
        for n in range(5):
            await client.publish("full", n, ack=False)
        # Broker and client share this process: once every task waits, the client's reader is
        # the one waiting on the full stream.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        await full.unsubscribe()
        await client.publish("other", "still here")
        with trio.fail_after(5):
            async for item in other:
                assert isinstance(item, Message) and item.payload == "still here"
                break


async def test_publish_nowait_queues_in_order_and_pushes_back_when_full() -> None:
    """publish_nowait queues without waiting, in order; a full send queue raises WouldBlock."""
    async with running_broker() as broker, connect(broker.url) as subscriber, \
            connect(broker.url, buffer=10) as publisher:
        subscription = await subscriber.subscribe("burst")
        accepted = 0
        with pytest.raises(trio.WouldBlock):
            while accepted < 100:  # no checkpoint in between: the writer cannot drain meanwhile
                publisher.publish_nowait("burst", accepted)
                accepted += 1
        # The queue holds 10; the writer, already waiting, may have taken one more directly.
        assert accepted in (10, 11)
        received = []
        with trio.fail_after(5):
            async for item in subscription:
                assert isinstance(item, Message)
                received.append(item.payload)
                if len(received) == accepted:
                    break
        assert received == list(range(accepted))
