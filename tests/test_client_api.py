"""The client API's promises that are not about the network: what each client module imports
and exports, the typed limits, the publish overloads as mypy sees them, and a broker process
started after its client."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

import mqbroker.client
import mqbroker.client.aio
import mqbroker.client.errors
from mqbroker.client import Limits, Message, Reconnect, connect
from tests.daemon import running_daemon
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT)
    return set(result.stdout.split())


def test_the_asyncio_client_imports_neither_trio_nor_trio_websocket() -> None:
    """`import mqbroker.client.aio` (and using it) loads no trio and no trio-websocket."""
    loaded = _modules_after("import mqbroker.client.aio as aio\naio.connect; aio.Client")
    assert {"mqbroker.client.aio", "mqbroker.client.base"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("trio", "trio_websocket")}


def test_the_trio_client_imports_no_asyncio_driver() -> None:
    """`from mqbroker.client import connect` loads the trio driver, not the asyncio one."""
    loaded = _modules_after("from mqbroker.client import connect, Client, Subscription")
    assert {"mqbroker.client._trio", "trio", "trio_websocket"} <= loaded
    assert not loaded & {"mqbroker.client.aio", "mqbroker.client._aio_ws"}


def _error_classes(module: object) -> dict[str, type]:
    return {name: value for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Exception)
            and value.__module__ == "mqbroker.client.errors"}


def test_every_error_is_exported_by_both_clients() -> None:
    """Each exception class of client/errors.py is importable from mqbroker.client and from
    mqbroker.client.aio (the same class), and listed in both modules' __all__."""
    errors = _error_classes(mqbroker.client.errors)
    assert len(errors) >= 27 and "OutcomeUnknown" in errors
    for module in (mqbroker.client, mqbroker.client.aio):
        assert _error_classes(module) == errors, module.__name__
        assert set(errors) <= set(module.__all__), module.__name__


def test_both_clients_export_the_same_names() -> None:
    """The two client modules export the same public names (their own Client, Subscription
    and connect; everything else the same objects)."""
    assert sorted(mqbroker.client.__all__) == sorted(mqbroker.client.aio.__all__)
    own = {"Client", "Subscription", "connect"}
    for name in set(mqbroker.client.__all__) - own:
        assert getattr(mqbroker.client, name) is getattr(mqbroker.client.aio, name), name
    assert mqbroker.client.aio.Client.__module__ == "mqbroker.client.aio"
    assert mqbroker.client.Client.__module__ == "mqbroker.client._trio"


def test_limits_of_a_welcome() -> None:
    """Known keys are typed (an integer for a float limit becomes a float); a value of the
    wrong type (a string, a boolean for an integer) leaves the default; unknown keys stay in
    `raw`, which is read-only."""
    raw = {"max_subscriptions": 7, "ping_interval": 5, "max_frame_bytes": True,
           "max_topic_length": "1024", "slow_consumer": "drop_oldest", "future_key": [1]}
    limits = Limits.of(raw)
    assert limits.max_subscriptions == 7
    assert limits.ping_interval == 5.0 and isinstance(limits.ping_interval, float)
    assert limits.max_frame_bytes == 1048576 and limits.max_topic_length == 1024
    assert limits.slow_consumer == "drop_oldest"
    assert limits.raw["future_key"] == [1]
    with pytest.raises(TypeError):
        limits.raw["future_key"] = 2  # type: ignore[index]
    raw["max_subscriptions"] = 8
    assert limits.raw["max_subscriptions"] == 7  # a copy, not a view of the broker's map
    assert Limits.of({}) == Limits()


def test_limits_know_every_key_the_protocol_documents() -> None:
    """Every key of docs/protocol.md's Limits table is a typed field of Limits."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc.split("### Limits", 1)[1].split("\n## ", 1)[0]
    keys = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    fields = set(inspect.signature(Limits).parameters) - {"raw"}
    assert keys == fields


TYPED_USE = """
    from typing import assert_type
    import mqbroker.client
    import mqbroker.client.aio


    async def trio_use(client: mqbroker.client.Client, flag: bool) -> None:
        assert_type(await client.publish("t", 1), str)
        assert_type(await client.publish("t", 1, ack=True), str)
        assert_type(await client.publish("t", 1, ack=False), None)
        assert_type(await client.publish("t", 1, ack=flag), str | None)
        assert_type(client.limits.max_message_bytes, int)


    async def aio_use(client: mqbroker.client.aio.Client) -> None:
        assert_type(await client.publish("t", {"k": 1}, msg_id="m"), str)
        assert_type(await client.publish("t", ack=False), None)
        event_id: str = await client.publish("t", 1, ack=False)  # the error this test expects
"""


def test_publish_is_typed_by_its_ack(tmp_path: Path) -> None:
    """mypy --strict sees `publish(...)` (ack=True) as str and `publish(..., ack=False)` as
    None in both clients: assigning the latter to a str is the only line mypy refuses."""
    source = tmp_path / "typed_use.py"
    source.write_text(textwrap.dedent(TYPED_USE))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(source)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    lines = enumerate(TYPED_USE.splitlines(), start=1)
    expected = next(n for n, line in lines if "expects" in line)
    assert errors and {e.split(":")[1] for e in errors} == {str(expected)}, result.stdout
    assert any('(expression has type "None", variable has type "str")' in e for e in errors)


async def test_first_connect_waits_for_a_broker_process_started_late() -> None:
    """A client started before its broker (`wait_for_broker`) connects once a real
    `mqbroker serve` process is listening on its port, through the failed attempts before."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    connected, done = trio.Event(), trio.Event()
    received: list[Message] = []

    async def client_side() -> None:
        fast = Reconnect(initial_delay=0.05, max_delay=0.2)
        async with connect(url, wait_for_broker=60, reconnect=fast) as client:
            connected.set()
            subscription = await client.subscribe("late")
            await client.publish("late", "here")
            async for item in subscription:
                assert isinstance(item, Message)
                received.append(item)
                break
        done.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            await trio.sleep(0.5)  # the outage itself: the first attempts fail meanwhile
            assert not connected.is_set()
            async with running_daemon(None, "--port", str(port)):
                await done.wait()
    assert [m.payload for m in received] == ["here"]
