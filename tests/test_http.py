"""The operator's HTTP endpoints: /health and /metrics over real sockets, and their robustness."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import structlog
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mqbroker.broker import Broker, open_broker
from mqbroker.client import connect
from mqbroker.config import Config, FanoutConfig, HistoryConfig, MetricsConfig, ServerConfig
from mqbroker.fanout import Fanout, Health
from mqbroker.message import Draft, Message
from mqbroker.server.http import (
    CONNECTION_TIMEOUT,
    Endpoints,
    exposition,
    metric_name,
    serve_http,
)
from tests.daemon import running_daemon
from tests.harness import RunningBroker, broker_config, running_broker
from tests.redis_server import RedisServer

# --- A tiny HTTP client: h11 on a real socket ----------------------------------------------


@attrs.frozen
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, half-close, and return everything the server sends until it closes."""
    chunks: list[bytes] = []
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            await stream.send_eof()
            while chunk := await stream.receive_some():
                chunks.append(bytes(chunk))
    return b"".join(chunks)


async def fetch(port: int, target: str = "/health", method: str = "GET",
                headers: Sequence[tuple[str, str]] = ()) -> Fetched:
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=target,
                          headers=[("host", "127.0.0.1"), *headers])
    sent = (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
    client.receive_data(await exchange(port, sent))
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage)
    headers = {name.decode(): value.decode() for name, value in response.headers}
    return Fetched(response.status_code, headers, body)


def samples(text: str) -> dict[str, int]:
    """The exposition's samples, by name (with labels)."""
    pairs = (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))
    return {name: int(value) for name, _, value in pairs}


def types(text: str) -> dict[str, str]:
    lines = (line.split() for line in text.splitlines() if line.startswith("# TYPE "))
    return {parts[2]: parts[3] for parts in lines}


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def port(broker: RunningBroker) -> AsyncIterator[int]:
    """The HTTP endpoints of the `broker` fixture, on an ephemeral port."""
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_http, broker.broker, MetricsConfig(port=0))
        nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Delegating:
    """A real fan-out around the broker's own, passing everything through."""

    inner: Fanout

    async def publish(self, drafts: Sequence[Draft]) -> Sequence[Message]:
        return await self.inner.publish(drafts)

    async def watch(self, filter: str) -> None:
        await self.inner.watch(filter)

    async def unwatch(self, filter: str) -> None:
        await self.inner.unwatch(filter)

    def health(self) -> Health:
        return self.inner.health()

    def stats(self) -> Mapping[str, int]:
        return self.inner.stats()


class Degraded(Delegating):
    def health(self) -> Health:
        return Health(ok=False, detail="test")


class BrokenStats(Delegating):
    def stats(self) -> Mapping[str, int]:
        raise RuntimeError("stats exploded")


@contextmanager
def fanout_replaced(broker: Broker, fanout: Fanout) -> Iterator[None]:
    original, broker.fanout = broker.fanout, fanout
    try:
        yield
    finally:
        broker.fanout = original


# --- /health -----------------------------------------------------------------------------------


async def test_health_is_ok_with_instance_sessions_and_uptime(
        broker: RunningBroker, port: int) -> None:
    """A healthy fan-out gives 200 and a JSON body with the instance, sessions and uptime."""
    before = await fetch(port)
    assert before.status == 200
    assert before.headers["content-type"] == "application/json"
    assert before.headers["connection"] == "close"
    body = before.json()
    assert body["status"] == "ok"
    assert body["instance"] == "test"
    assert body["sessions"] == 0
    assert isinstance(body["uptime_seconds"], float) and body["uptime_seconds"] >= 0
    async with connect(broker.url):
        await broker.wait_sessions(1)
        assert (await fetch(port)).json()["sessions"] == 1


async def test_degraded_fanout_gives_503_with_the_detail(broker: RunningBroker, port: int) -> None:
    """When the fan-out reports itself unhealthy, /health is 503 "degraded" and says why, and
    /metrics shows mqbroker_fanout_healthy 0."""
    with fanout_replaced(broker.broker, Degraded(broker.broker.fanout)):
        health = await fetch(port)
        metrics = samples((await fetch(port, "/metrics")).body.decode())
    assert health.status == 503
    assert health.json()["status"] == "degraded"
    assert health.json()["detail"] == "test"
    assert metrics["mqbroker_fanout_healthy"] == 0
    assert (await fetch(port)).status == 200


# --- /metrics ----------------------------------------------------------------------------------


async def test_metrics_expose_every_stat_with_its_type(broker: RunningBroker, port: int) -> None:
    """Every broker stat appears as mqbroker_<name>: levels as gauges, totals as counters
    ending in _total; plus mqbroker_up with the instance and mqbroker_fanout_healthy."""
    reply = await fetch(port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = reply.body.decode()
    kinds = types(text)
    values = samples(text)
    for stat, value in broker.broker.stats().items():
        name, kind = metric_name(stat)
        assert values[name] == value and kinds[name] == kind
    assert kinds["mqbroker_sessions"] == "gauge"
    assert kinds["mqbroker_fanout_dedup_evicted_total"] == "counter"
    assert values['mqbroker_up{instance_id="test"}'] == 1
    assert values["mqbroker_fanout_healthy"] == 1


async def test_metrics_follow_publishes(broker: RunningBroker, port: int) -> None:
    """A subscribed, recorded publish moves sessions, subscriptions, published, deliveries
    and the history's message count."""
    before = samples((await fetch(port, "/metrics")).body.decode())
    async with connect(broker.url) as client:
        subscription = await client.subscribe("mcp/broadcast/#")
        await client.publish("mcp/broadcast/news", {"text": "hi"})
        with trio.fail_after(5):
            await subscription.__anext__()
        after = samples((await fetch(port, "/metrics")).body.decode())
    assert after["mqbroker_sessions"] == before["mqbroker_sessions"] + 1
    assert after["mqbroker_subscriptions"] == before["mqbroker_subscriptions"] + 1
    for name in ("mqbroker_published_total", "mqbroker_deliveries_total"):
        assert after[name] == before.get(name, 0) + 1
    assert after["mqbroker_history_messages"] == before["mqbroker_history_messages"] + 1


async def test_a_failing_plugin_stats_gives_500_and_the_server_lives_on(
        broker: RunningBroker, port: int) -> None:
    """A plugin whose stats() raises makes /metrics a 500, not a dead daemon."""
    with fanout_replaced(broker.broker, BrokenStats(broker.broker.fanout)):
        assert (await fetch(port, "/metrics")).status == 500
        assert (await fetch(port)).status == 200
    assert (await fetch(port, "/metrics")).status == 200


def test_metric_names_and_types() -> None:
    """Gauges keep their name; counters gain _total once; unsafe characters become _."""
    assert metric_name("sessions") == ("mqbroker_sessions", "gauge")
    assert metric_name("history_bytes") == ("mqbroker_history_bytes", "gauge")
    assert metric_name("published") == ("mqbroker_published_total", "counter")
    assert metric_name("reads_total") == ("mqbroker_reads_total", "counter")
    assert metric_name("a-b.c é") == ("mqbroker_a_b_c___total", "counter")


_SAMPLE = re.compile(r'[a-zA-Z_][a-zA-Z0-9_]*(\{instance_id="(?:[^"\\\n]|\\.)*"\})? -?[0-9]+')


@given(stats=st.dictionaries(st.text(max_size=12), st.integers(-(2**63), 2**63)),
       instance=st.text(max_size=12), healthy=st.booleans())
def test_exposition_is_always_well_formed(
        stats: dict[str, int], instance: str, healthy: bool) -> None:
    """Whatever the stat names, every family has one TYPE line right before its one sample,
    names are valid and unique, and counters end in _total."""
    text = exposition(stats, instance=instance, healthy=healthy)
    # Prometheus splits on \n alone: a \r in a label value is legal and not a line end.
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert len(lines) % 2 == 0
    names = []
    for type_line, sample in zip(lines[::2], lines[1::2], strict=True):
        _, _, name, kind = type_line.split(" ")
        assert _SAMPLE.fullmatch(sample) and sample.startswith((f"{name} ", f"{name}{{"))
        assert kind == "gauge" or name.endswith("_total")
        names.append(name)
    assert len(names) == len(set(names))
    assert "mqbroker_up" in names and "mqbroker_fanout_healthy" in names


# --- Routing and methods -------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "/healthz", "/metrics/x", "/../health"])
async def test_unknown_paths_are_404(port: int, target: str) -> None:
    """Only /health and /metrics exist."""
    assert (await fetch(port, target)).status == 404


async def test_query_strings_are_ignored(port: int) -> None:
    """A scraper's query string does not change the resource."""
    assert (await fetch(port, "/metrics?name[]=up")).status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_with_allow(port: int, method: str) -> None:
    """Methods other than GET and HEAD are refused with 405 and an Allow header."""
    reply = await fetch(port, "/health", method)
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


async def test_head_has_the_headers_and_no_body(port: int) -> None:
    """HEAD answers like GET, with the GET body's length and no body."""
    got = await fetch(port, "/metrics")
    head = await fetch(port, "/metrics", "HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) == len(got.body) > 0


# --- Robustness ----------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's first bytes
    b"GET /health HTTP/1.1\r\nbroken header line\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: a\r\ncontent-length: -1\r\n\r\n",
    b"\r\n" * 5000,
])
async def test_garbage_gets_400_or_a_close_and_the_server_lives_on(
        port: int, garbage: bytes) -> None:
    """Malformed requests are answered 400 (or the connection just closes); the next
    request is served as usual."""
    response = await exchange(port, garbage)
    assert response == b"" or response.startswith(b"HTTP/1.1 400 ")
    assert (await fetch(port)).status == 200


async def test_request_line_garbage_gets_exactly_400(port: int) -> None:
    """A line that is not a request line is a 400, not a silent close."""
    assert (await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")


async def test_oversized_headers_get_431(port: int) -> None:
    """Headers beyond the bounded request size are refused with 431, unread."""
    big = b"GET /health HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert (await exchange(port, big)).startswith(b"HTTP/1.1 431 ")
    assert (await fetch(port)).status == 200


async def test_a_stalled_client_does_not_block_others(port: int) -> None:
    """A connection that never finishes its request does not hold up the next one."""
    with trio.fail_after(5):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stalled:
            await stalled.send_all(b"GET /hea")
            assert (await fetch(port)).status == 200


@given(data=st.binary(max_size=300))
@settings(max_examples=150, deadline=None)
async def test_any_bytes_get_an_http_reply_or_a_close(data: bytes) -> None:
    """Whatever a client sends, the handler returns without raising, and what it sends back
    is nothing or one HTTP/1.1 response."""
    async with open_broker(broker_config(), "test") as broker:
        client, server = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Endpoints(broker).handle, server)
                await client.send_all(data)
                await client.send_eof()
                response = b""
                while chunk := await client.receive_some():
                    response += chunk
    assert response == b"" or response.startswith(b"HTTP/1.1 ")


async def test_a_silent_client_is_dropped_at_the_connection_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    """A client that opens a request and stops is closed after CONNECTION_TIMEOUT."""
    async with open_broker(broker_config(), "test") as broker:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Endpoints(broker).handle, server)
            await client.send_all(b"GET /health HTTP/1.1\r\n")
            start = trio.current_time()
            with trio.fail_after(CONNECTION_TIMEOUT * 2):
                assert await client.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(CONNECTION_TIMEOUT)


async def test_a_dripping_client_is_dropped_at_the_connection_deadline(
        autojump_clock: trio.testing.MockClock) -> None:
    """The deadline is per connection, not per read: a byte a second does not keep it open."""
    async with open_broker(broker_config(), "test") as broker:
        client, server = trio.testing.memory_stream_pair()

        async def drip() -> None:
            try:
                for byte in b"GET /health HTTP/1.1\r\nx-slow: " + b"a" * 1000:
                    await client.send_all(bytes([byte]))
                    await trio.sleep(1)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(Endpoints(broker).handle, server)
            nursery.start_soon(drip)
            start = trio.current_time()
            with trio.fail_after(CONNECTION_TIMEOUT * 2):
                assert await client.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(CONNECTION_TIMEOUT)
            nursery.cancel_scope.cancel()


async def test_requests_log_no_info_lines(port: int) -> None:
    """Scrapes are routine: at most debug events per request, nothing at info or above."""
    with structlog.testing.capture_logs() as logs:
        await fetch(port)
        await fetch(port, "/metrics")
        await fetch(port, "/nope")
    assert [entry for entry in logs if entry["log_level"] != "debug"] == []


# --- The daemon --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_the_daemon_serves_health_and_metrics_when_configured(tmp_path: Path) -> None:
    """`[metrics] port = N` makes `mqbroker serve` answer /health and /metrics on N, and
    SIGTERM still stops it cleanly."""
    http_port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"[metrics]\nport = {http_port}\n")
    async with running_daemon(config) as daemon:
        started = next(line for line in daemon.lines if line["event"] == "broker.started")
        health = await fetch(http_port)
        assert health.status == 200
        assert health.json()["instance"] == started["instance"]
        metrics = samples((await fetch(http_port, "/metrics")).body.decode())
        assert metrics[f'mqbroker_up{{instance_id="{started["instance"]}"}}'] == 1
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await daemon.process.wait() == 0


async def test_plugins_declare_their_gauges(redis_server: RedisServer) -> None:
    """A plugin's level (the Redis fan-out's tracked_topics) is exported as a gauge, not as a
    counter `..._tracked_topics_total`: the plugin declares it in STAT_GAUGES."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(plugin="redis"),
                    fanout=FanoutConfig(plugin="redis"),
                    plugins={"redis": {"url": redis_server.url}})
    async with running_broker(config) as running:
        text = Endpoints(running.broker).reply(b"GET", b"/metrics").body.decode()
    assert "# TYPE mqbroker_fanout_tracked_topics gauge" in text
    assert "# TYPE mqbroker_fanout_watches gauge" in text
    assert "# TYPE mqbroker_fanout_batches_total counter" in text


# --- The bearer token (issue 10) ---------------------------------------------------------------

TOKEN = "s3cret-Token_0123456789abcdef"


@pytest.fixture
async def guarded_port(broker: RunningBroker) -> AsyncIterator[int]:
    """The HTTP endpoints of the `broker` fixture, requiring TOKEN."""
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_http, broker.broker, MetricsConfig(port=0, token=TOKEN))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("target", ["/health", "/metrics"])
async def test_with_a_token_the_right_bearer_is_served(guarded_port: int, target: str) -> None:
    fetched = await fetch(guarded_port, target, headers=[("authorization", f"Bearer {TOKEN}")])
    assert fetched.status == 200
    # The scheme is case-insensitive (RFC 9110 section 11.1).
    fetched = await fetch(guarded_port, target, headers=[("authorization", f"bearer {TOKEN}")])
    assert fetched.status == 200


@pytest.mark.parametrize("target", ["/health", "/metrics", "/elsewhere"])
@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN.upper()}", TOKEN,
])
async def test_with_a_token_anything_else_gets_401(
        broker: RunningBroker, guarded_port: int, target: str, authorization: str | None) -> None:
    headers = [] if authorization is None else [("authorization", authorization)]
    with structlog.testing.capture_logs() as logs:
        fetched = await fetch(guarded_port, target, headers=headers)
    assert fetched.status == 401
    assert fetched.headers["www-authenticate"] == 'Bearer realm="mqbroker"'
    assert TOKEN.encode() not in fetched.body
    assert TOKEN not in repr(logs)
    assert broker.broker.stats()["security_metrics_refused"] == 1


async def test_a_header_sent_twice_is_refused(guarded_port: int) -> None:
    """Which copy would count is a guess; neither does."""
    right = ("authorization", f"Bearer {TOKEN}")
    assert (await fetch(guarded_port, "/metrics", headers=[right, right])).status == 401


async def test_without_a_token_the_endpoints_stay_open(port: int) -> None:
    assert (await fetch(port, "/metrics")).status == 200


def test_the_token_is_kept_out_of_reprs() -> None:
    assert TOKEN not in repr(MetricsConfig(token=TOKEN))
    assert TOKEN not in repr(Config(metrics=MetricsConfig(token=TOKEN)))


@pytest.mark.parametrize("token", ["short", "has space in it, long enough", "é" * 20])
def test_a_weak_or_unusable_token_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(ValueError) as raised:
        MetricsConfig(token=token)
    assert token not in str(raised.value)
    assert "at least 16 characters" in str(raised.value)
