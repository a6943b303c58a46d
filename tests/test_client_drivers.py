"""Both clients, one behaviour: each scenario here runs once with the trio client and once with
the asyncio client, against a real broker (on a trio thread, over 127.0.0.1).

The scenarios are written once, against what both clients share (their API, and their runtime's
deadline for bounded waits), so a difference between the drivers fails one of the two runs.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

import mqbroker.client
import mqbroker.client.aio
from mqbroker.client import (
    BadEventId,
    ClientClosed,
    ConnectError,
    InvalidFilter,
    InvalidTopic,
    Limits,
    Message,
    Reconnect,
    SinceUnsupported,
)
from tests.harness import broker_config, free_port
from tests.test_client_aio import BrokerThread

RECORDED = "mcp/session/s1/message"  # matches the default [history] record filters
WAIT = 10
FAST = Reconnect(initial_delay=0.01, max_delay=0.2)
CONNECT = {"trio": mqbroker.client.connect, "asyncio": mqbroker.client.aio.connect}

Scenario = Callable[[Callable[..., Any]], Awaitable[None]]


def run_with(driver: str, scenario: Scenario) -> None:
    """Run `scenario(connect)` with the driver's `connect`, in the driver's event loop."""
    connect = CONNECT[driver]

    async def bounded() -> None:
        async with type_of(connect).runtime.deadline(60):
            await scenario(connect)

    if driver == "trio":
        trio.run(bounded)
    else:
        asyncio.run(bounded())


def type_of(connect: Callable[..., Any]) -> Any:
    """The client class a driver's `connect` yields."""
    return mqbroker.client.Client if connect is mqbroker.client.connect \
        else mqbroker.client.aio.Client


async def next_message(connect: Callable[..., Any], subscription: Any) -> Message:
    async with type_of(connect).runtime.deadline(WAIT):
        item = await anext(subscription)
    assert isinstance(item, Message), item
    return item


drivers = pytest.mark.parametrize("driver", ["trio", "asyncio"])


@pytest.fixture
def broker_thread() -> Any:
    running = BrokerThread(config=broker_config(max_subscriptions=7))
    running.start()
    yield running
    running.stop()


@drivers
def test_publish_subscribe_and_wildcards(driver: str, broker_thread: BrokerThread) -> None:
    """Exact, `+` and `#` subscriptions each get every matching message once, in order, with
    the event id its acknowledged publish returned."""

    async def scenario(connect: Callable[..., Any]) -> None:
        async with connect(broker_thread.url) as client:
            subs = [await client.subscribe(f) for f in ("a/b/c", "a/+/c", "a/#")]
            first = await client.publish("a/b/c", {"n": 1, "blob": b"\x00\xff"})
            assert isinstance(first, str)
            await client.publish("a/b/c", [2])
            for sub in subs:
                one, two = (await next_message(connect, sub), await next_message(connect, sub))
                assert (one.topic, one.payload, one.event_id) == \
                    ("a/b/c", {"n": 1, "blob": b"\x00\xff"}, first)
                assert two.payload == [2]

    run_with(driver, scenario)


@drivers
def test_typed_errors_leave_the_client_usable(driver: str, broker_thread: BrokerThread) -> None:
    """Refusals raise their own class; a fire-and-forget one lands in `unsolicited`."""

    async def scenario(connect: Callable[..., Any]) -> None:
        async with connect(broker_thread.url) as client:
            with pytest.raises(InvalidTopic):
                await client.publish("a/+/b", 1)
            with pytest.raises(InvalidFilter):
                await client.subscribe("a/#/b")
            with pytest.raises(SinceUnsupported):
                await client.subscribe("a/+", since="x")
            with pytest.raises(BadEventId):
                await client.subscribe("a/b", since="not an event id")
            sub = await client.subscribe("a/b")
            assert await client.publish("bad/+", None, ack=False) is None
            await client.publish("a/b", "fine")
            assert (await next_message(connect, sub)).payload == "fine"
            assert [type(e) for e in client.unsolicited] == [InvalidTopic]

    run_with(driver, scenario)


@drivers
def test_replay_latest_forget_and_unsubscribe(driver: str, broker_thread: BrokerThread) -> None:
    """`since` replays what follows it and `replay()` stops at its end; `latest` names the
    newest message; `forget` drops the history; an unsubscribed stream ends."""

    async def scenario(connect: Callable[..., Any]) -> None:
        async with connect(broker_thread.url) as client:
            ids = [await client.publish(RECORDED, n) for n in range(3)]
            assert await client.latest(RECORDED) == ids[-1]
            sub = await client.subscribe(RECORDED, since=ids[0])
            assert sub.ack.recovered is True
            replayed = [item.payload async for item in sub.replay()]
            assert replayed == [1, 2]
            await client.publish(RECORDED, "live")
            assert (await next_message(connect, sub)).payload == "live"
            assert sub.last_event_id is not None
            await sub.unsubscribe()
            assert [item async for item in sub] == []
            assert await client.forget(RECORDED) == 1
            assert await client.latest(RECORDED) is None

    run_with(driver, scenario)


@drivers
def test_limits_are_the_welcomes(driver: str, broker_thread: BrokerThread) -> None:
    """`client.limits` is the welcome's limits, typed: the broker's configured values (here
    max_subscriptions = 7), its raw map, read-only."""

    async def scenario(connect: Callable[..., Any]) -> None:
        async with connect(broker_thread.url) as client:
            limits = client.limits
            assert isinstance(limits, Limits)
            assert limits.max_subscriptions == 7
            assert limits.ping_interval == 20.0 and limits.slow_consumer == "disconnect"
            assert limits.raw["max_subscriptions"] == 7
            with pytest.raises(TypeError):
                limits.raw["max_subscriptions"] = 8
            with pytest.raises(AttributeError):
                limits.max_subscriptions = 8

    run_with(driver, scenario)


@drivers
def test_closed_client_refuses_and_ends_its_streams(driver: str,
                                                    broker_thread: BrokerThread) -> None:
    """Leaving `connect` ends every subscription, and later operations raise ClientClosed."""

    async def scenario(connect: Callable[..., Any]) -> None:
        async with connect(broker_thread.url) as client:
            sub = await client.subscribe("q")
        assert [item async for item in sub] == []
        with pytest.raises(ClientClosed):
            await client.publish("q", 1)

    run_with(driver, scenario)


@drivers
def test_first_connect_fails_at_once_by_default(driver: str) -> None:
    """Without `wait_for_broker`, nothing listening is a ConnectError at the first attempt."""

    async def scenario(connect: Callable[..., Any]) -> None:
        with pytest.raises(ConnectError) as caught:
            async with connect(f"ws://127.0.0.1:{free_port()}/", reconnect=FAST):
                raise AssertionError("connected to nothing")
        assert isinstance(caught.value.__cause__, OSError)

    run_with(driver, scenario)


@drivers
def test_first_connect_waits_for_a_broker_started_late(driver: str) -> None:
    """With `wait_for_broker`, a client started before its broker retries with the reconnect
    backoff and connects once the broker is up (here 1 s later, on the port it was given)."""
    broker = BrokerThread(port=free_port())
    starter = threading.Timer(1.0, broker.start)
    starter.start()

    async def scenario(connect: Callable[..., Any]) -> None:
        runtime = type_of(connect).runtime
        began = runtime.now()
        async with connect(broker.url, wait_for_broker=20, reconnect=FAST) as client:
            assert runtime.now() - began >= 0.9  # it did wait, through failed attempts
            sub = await client.subscribe("late")
            await client.publish("late", "here")
            assert (await next_message(connect, sub)).payload == "here"

    try:
        run_with(driver, scenario)
    finally:
        starter.join()
        broker.stop()


@drivers
def test_waiting_for_a_broker_gives_up_after_wait_for_broker(driver: str) -> None:
    """Past `wait_for_broker`, the first connection fails with ConnectError (its cause the last
    attempt's error), not sooner than that and not much later."""

    async def scenario(connect: Callable[..., Any]) -> None:
        runtime = type_of(connect).runtime
        began = runtime.now()
        with pytest.raises(ConnectError) as caught:
            async with connect(f"ws://127.0.0.1:{free_port()}/", wait_for_broker=0.5,
                               reconnect=FAST):
                raise AssertionError("connected to nothing")
        assert 0.3 <= runtime.now() - began < 5
        assert isinstance(caught.value.__cause__, OSError)

    run_with(driver, scenario)


def test_both_connects_take_the_same_arguments() -> None:
    """One signature (and docstring) for both drivers' `connect`, `wait_for_broker` in it."""
    trio_connect = inspect.signature(mqbroker.client.connect)
    aio_connect = inspect.signature(mqbroker.client.aio.connect)
    assert list(trio_connect.parameters.values()) == list(aio_connect.parameters.values())
    assert trio_connect.parameters["wait_for_broker"].default == 0.0
    assert mqbroker.client.connect.__doc__ == mqbroker.client.aio.connect.__doc__
