"""The SSE example end to end: a real broker, the example's SSE server, raw HTTP clients on sockets.

The event-stream parser here follows the HTML spec's rules for a browser's EventSource: an `id:`
field sets the last event id, and an event without one leaves it alone.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import h11
import pytest
import trio
from structlog.testing import capture_logs
from structlog.typing import EventDict

from mqbroker.client import Client, connect
from mqbroker.config import Config, HistoryConfig, ServerConfig
from tests.harness import RunningBroker, running_broker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_example(name: str) -> ModuleType:
    """examples/ is not a package: import one of its scripts by path."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"examples/{name}.py is missing"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sse_server = _load_example("sse_server")


# --- A browser-like SSE client over raw TCP (h11 does the HTTP framing) --------------------------


@attrs.frozen
class SseEvent:
    type: str
    data: str
    #: The `id:` field this event carried, if any.
    id: str | None

    @property
    def payload(self) -> Any:
        return json.loads(self.data)


@attrs.frozen
class Comment:
    text: str


@attrs.define
class EventStreamParser:
    """text/event-stream to events and comments, as the HTML spec's parsing rules say."""

    #: What a browser would send as Last-Event-ID: set when an event is dispatched, so the id
    #: of an event cut short by a dropped connection does not count.
    last_event_id: str | None = None
    _buffer: str = ""
    _data: list[str] = attrs.field(factory=list)
    _type: str = ""
    #: The spec's "last event ID buffer": kept across events until an `id:` field changes it.
    _id_buffer: str | None = None
    #: The `id:` field of the event being parsed, if it has one.
    _id: str | None = None

    def feed(self, text: str) -> list[SseEvent | Comment]:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        items = [self._line(line.removesuffix("\r")) for line in lines]
        return [item for item in items if item is not None]

    def _line(self, line: str) -> SseEvent | Comment | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return Comment(line[1:].strip())
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            self._id = self._id_buffer = value
        return None

    def _dispatch(self) -> SseEvent | None:
        self.last_event_id = self._id_buffer
        event = SseEvent(type=self._type or "message", data="\n".join(self._data), id=self._id)
        dispatch = bool(self._data)
        self._data, self._type, self._id = [], "", None
        return event if dispatch else None


class StreamEnded(Exception):
    """The server ended the response (or the connection)."""


@attrs.define(eq=False)
class SseClient:
    stream: trio.SocketStream
    connection: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    parser: EventStreamParser = attrs.field(factory=EventStreamParser)
    response: h11.Response | None = None
    _decoder: codecs.IncrementalDecoder = attrs.field(
        factory=lambda: codecs.getincrementaldecoder("utf-8")())
    _pending: list[SseEvent | Comment] = attrs.field(factory=list)

    async def request(self, target: str, *, method: str = "GET",
                      last_event_id: str | None = None) -> h11.Response:
        headers = [("host", "127.0.0.1"), ("accept", "text/event-stream")]
        if last_event_id is not None:
            headers.append(("last-event-id", last_event_id))
        data = self.connection.send(h11.Request(method=method, target=target, headers=headers))
        end = self.connection.send(h11.EndOfMessage())
        await self.stream.send_all((data or b"") + (end or b""))
        while self.response is None:
            event = await self._next_http_event()
            if isinstance(event, h11.Response):
                self.response = event
        return self.response

    async def _next_http_event(self) -> h11.Event:
        while True:
            event = self.connection.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise StreamEnded  # the response is complete: h11 waits for a next request
            self.connection.receive_data(bytes(await self.stream.receive_some(65536)))

    async def next_item(self) -> SseEvent | Comment:
        while not self._pending:
            event = await self._next_http_event()
            if isinstance(event, h11.Data):
                self._pending.extend(self.parser.feed(self._decoder.decode(bytes(event.data))))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                raise StreamEnded
        return self._pending.pop(0)

    async def next_event(self) -> SseEvent:
        """The next event, skipping comments (keep-alive pings)."""
        while not isinstance(item := await self.next_item(), SseEvent):
            pass
        return item

    async def next_events(self, count: int) -> list[SseEvent]:
        return [await self.next_event() for _ in range(count)]

    async def body(self) -> bytes:
        chunks = []
        while not isinstance(event := await self._next_http_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
        return b"".join(chunks)

    def header(self, name: bytes) -> bytes | None:
        assert self.response is not None
        return dict(self.response.headers).get(name)


@asynccontextmanager
async def open_stream(port: int, session: str = "s1", *,
                      last_event_id: str | None = None) -> AsyncIterator[SseClient]:
    """An open event stream: its subscriptions are live once this yields (the head is in)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = SseClient(stream)
        response = await client.request(f"/sessions/{session}/events",
                                         last_event_id=last_event_id)
        assert response.status_code == 200
        yield client
    # Leaving closes the socket: the client drops mid-stream, as a browser that lost its network.


# --- Serving -------------------------------------------------------------------------------------


@asynccontextmanager
async def serving_sse(broker_url: str, **options: Any) -> AsyncIterator[int]:
    """The example's server on a free port; its port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(partial(sse_server.serve_sse, broker_url, 0, **options))
        yield port
        nursery.cancel_scope.cancel()


@pytest.fixture
async def sse_port(broker: RunningBroker) -> AsyncIterator[int]:
    async with serving_sse(broker.url) as port:
        yield port


@pytest.fixture
async def publisher(broker: RunningBroker) -> AsyncIterator[Client]:
    async with connect(broker.url, name="test-publisher") as client:
        yield client


async def publish(client: Client, session: str, n: int, **extra: Any) -> str:
    event_id = await client.publish(f"mcp/session/{session}/message", {"n": n, **extra})
    assert event_id is not None
    return event_id


@attrs.define(eq=False)
class LogWatch:
    """A structlog processor that lets a test wait for a log event instead of sleeping."""

    entries: list[EventDict] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, logger: Any, method: str, event_dict: EventDict) -> EventDict:
        # Waiters run after this returns, by when LogCapture has appended the entry.
        self._changed.set()
        self._changed = trio.Event()
        return event_dict

    async def wait_for(self, name: str, count: int = 1) -> list[EventDict]:
        while len(found := [e for e in self.entries if e["event"] == name]) < count:
            await self._changed.wait()
        return found


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    with capture_logs(processors=[watch]) as entries:
        watch.entries = entries
        yield watch


# --- The event stream ----------------------------------------------------------------------------


async def test_stream_sends_session_messages_with_their_event_ids(
        sse_port: int, publisher: Client) -> None:
    """Each message of the session topic becomes an event: `id:` its event id, `data:` JSON."""
    with trio.fail_after(10):
        async with open_stream(sse_port, "s1") as stream:
            ids = [await publish(publisher, "s1", n) for n in (1, 2, 3)]
            await publish(publisher, "other", 99)  # another session's topic: not on this stream
            events = await stream.next_events(3)
            content_type = stream.header(b"content-type")
    assert content_type is not None and content_type.startswith(b"text/event-stream")
    assert [e.id for e in events] == ids
    assert [e.type for e in events] == ["message"] * 3
    assert [e.payload for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_reconnect_with_last_event_id_gets_exactly_the_missed_messages(
        sse_port: int, publisher: Client) -> None:
    """Dropped mid-stream, a client that reconnects with Last-Event-ID receives every message
    after that id, in order, once: those it never read and those published while it was away."""
    with trio.fail_after(10):
        async with open_stream(sse_port, "s1") as first:
            ids = [await publish(publisher, "s1", n) for n in range(1, 6)]
            read = await first.next_events(3)
        last_id = first.parser.last_event_id
        ids += [await publish(publisher, "s1", n) for n in range(6, 10)]
        async with open_stream(sse_port, "s1", last_event_id=last_id) as second:
            resumed = await second.next_events(6)
            marker = await publish(publisher, "s1", 10)
            after = await second.next_event()
    assert [e.id for e in read] == ids[:3] and last_id == ids[2]
    assert [e.id for e in resumed] == ids[3:9]
    assert [e.payload["n"] for e in resumed] == [4, 5, 6, 7, 8, 9]
    # The next event is the first one published after reconnecting: nothing repeated in between.
    assert after.id == marker


async def test_last_event_id_from_another_epoch_yields_a_resync_first(
        sse_port: int, publisher: Client) -> None:
    """An id the broker's history cannot place (another epoch) gives `event: resync` with the
    reason before anything else, then the retained messages and live ones."""
    with trio.fail_after(10):
        ids = [await publish(publisher, "s1", n) for n in (1, 2)]
        async with open_stream(sse_port, "s1", last_event_id="zzzz-5") as stream:
            resync, *replayed = await stream.next_events(3)
            live = await publish(publisher, "s1", 3)
            after = await stream.next_event()
    assert (resync.type, resync.data, resync.id) == ("resync", "unknown_epoch", None)
    assert [e.id for e in replayed] == ids
    assert after.id == live


async def test_malformed_last_event_id_yields_a_resync_and_a_live_stream(
        sse_port: int, publisher: Client) -> None:
    """A Last-Event-ID that is no event id at all is reported as a resync, and the stream
    continues live from now."""
    with trio.fail_after(10):
        async with open_stream(sse_port, "s1", last_event_id="not an id!") as stream:
            resync = await stream.next_event()
            live = await publish(publisher, "s1", 1)
            after = await stream.next_event()
    assert (resync.type, resync.data) == ("resync", "bad_event_id")
    assert after.id == live


async def test_trimmed_history_yields_a_resync_then_what_is_retained() -> None:
    """When messages after Last-Event-ID were evicted from history, the stream says `resync`
    (trimmed) before replaying the messages still retained."""
    config = Config(server=ServerConfig(port=0), history=HistoryConfig(max_messages=3))
    with trio.fail_after(10):
        async with running_broker(config) as broker, serving_sse(broker.url) as port, \
                connect(broker.url) as publisher:
            first = await publish(publisher, "s1", 1)
            ids = [await publish(publisher, "s1", n) for n in range(2, 7)]
            async with open_stream(port, "s1", last_event_id=first) as stream:
                resync, *replayed = await stream.next_events(4)
    assert (resync.type, resync.data) == ("resync", "trimmed")
    assert [e.id for e in replayed] == ids[-3:]


async def test_broadcasts_are_forwarded_without_an_id_and_not_resumed(
        sse_port: int, publisher: Client) -> None:
    """Broadcasts arrive as `event: broadcast` with no id, so the browser's last event id stays
    a session position; resuming replays the session topic only (broadcasts are live only)."""
    with trio.fail_after(10):
        async with open_stream(sse_port, "s1") as first:
            session_id = await publish(publisher, "s1", 1)
            await first.next_event()
            await publisher.publish("mcp/broadcast/notification", {"text": "live"})
            broadcast = await first.next_event()
        assert first.parser.last_event_id == session_id
        await publisher.publish("mcp/broadcast/notification", {"text": "missed"})
        missed = await publish(publisher, "s1", 2)
        async with open_stream(sse_port, "s1", last_event_id=session_id) as second:
            resumed = await second.next_event()
            marker = await publish(publisher, "s1", 3)
            after = await second.next_event()
    assert (broadcast.type, broadcast.id) == ("broadcast", None)
    assert broadcast.payload == {"text": "live"}
    assert resumed.id == missed
    assert after.id == marker


# --- The connection's life -----------------------------------------------------------------------


async def test_dropping_the_connection_removes_its_subscriptions(
        broker: RunningBroker, sse_port: int, logs: LogWatch) -> None:
    """Each stream holds two broker subscriptions (session, broadcasts) while it is open and
    none once its client has gone."""
    with trio.fail_after(10):
        async with open_stream(sse_port, "s1"):
            open_count = broker.broker.stats()["subscriptions"]
        await logs.wait_for("sse.stream_closed")
    assert open_count == 2
    assert broker.broker.stats()["subscriptions"] == 0


async def test_idle_stream_gets_keep_alive_comments(broker: RunningBroker) -> None:
    """An idle stream carries `: ping` comments, which keep proxies from timing it out."""
    with trio.fail_after(10):
        async with serving_sse(broker.url, ping_interval=0.02) as port, \
                open_stream(port, "s1") as stream:
            first, second = await stream.next_item(), await stream.next_item()
    assert first == second == Comment("ping")


async def test_client_that_does_not_read_is_dropped_and_resumes_losslessly(
        broker: RunningBroker, publisher: Client, logs: LogWatch) -> None:
    """A client whose queue fills is dropped instead of stalling the shared broker client;
    reconnecting with its last id gives every message it did not get, once, in order."""
    pad = "x" * 60_000  # fills the socket buffers in a few hundred messages
    with trio.fail_after(30):
        async with serving_sse(broker.url, buffer=4) as port:
            async with open_stream(port, "s1") as first:
                sent = await _publish_until_dropped(publisher, logs, pad)
                read = await _read_until_end(first)
            last_id = first.parser.last_event_id
            assert last_id is not None
            async with open_stream(port, "s1", last_event_id=last_id) as second:
                resumed = await second.next_events(len(sent) - len(read))
    received = [e.payload["n"] for e in read + resumed]
    assert received == list(range(1, len(sent) + 1))
    assert [e.id for e in read + resumed] == sent


async def _publish_until_dropped(publisher: Client, logs: LogWatch, pad: str) -> list[str]:
    sent: list[str] = []
    async with trio.open_nursery() as nursery:
        async def publish_forever() -> None:
            for n in range(1, 2001):
                sent.append(await publish(publisher, "s1", n, pad=pad))
            raise AssertionError("2000 large messages did not fill a client's buffers")

        nursery.start_soon(publish_forever)
        await logs.wait_for("sse.slow_client")
        nursery.cancel_scope.cancel()
    return sent


async def _read_until_end(stream: SseClient) -> list[SseEvent]:
    events = []
    try:
        while True:
            events.append(await stream.next_event())
    except (StreamEnded, h11.RemoteProtocolError):
        return events  # dropped: a chunked body cut short is what h11 calls a protocol error


# --- Routes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "target", "status"), [
    ("GET", "/", 404),
    ("GET", "/sessions/s1", 404),
    ("GET", "/sessions/a+b/events", 404),  # a wildcard is no session id
    ("GET", "/sessions/a%2Fb/events", 404),
    ("POST", "/sessions/s1/events", 405),
])
async def test_other_requests_are_refused(sse_port: int, method: str, target: str,
                                          status: int) -> None:
    """Only `GET /sessions/{one topic level}/events` streams; anything else gets a status."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", sse_port) as tcp:
            client = SseClient(tcp)
            response = await client.request(target, method=method)
            body = await client.body()
    assert response.status_code == status
    assert body


# --- The publisher script ------------------------------------------------------------------------


async def test_publisher_script_publishes_numbered_messages_and_prints_their_ids(
        broker: RunningBroker, sse_port: int) -> None:
    """`publisher.py --session s1 --count 3 --broadcast TEXT` publishes 1..3 to the session and
    one broadcast, printing `<event id> <topic>` for each, as a stream receives them."""
    command = [sys.executable, str(EXAMPLES / "publisher.py"), "--broker", broker.url,
               "--session", "s1", "--count", "3", "--broadcast", "hello"]
    with trio.fail_after(30):
        async with open_stream(sse_port, "s1") as stream:
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
            events = await stream.next_events(4)
    lines = [line.split(" ") for line in done.stdout.decode().splitlines()]
    assert [topic for _, topic in lines] == ["mcp/session/s1/message"] * 3 + [
        "mcp/broadcast/notification"]
    # Two topics, two subscriptions: their relative order on the stream is not promised.
    messages = [e for e in events if e.type == "message"]
    broadcasts = [e for e in events if e.type == "broadcast"]
    assert [e.id for e in messages] == [event_id for event_id, _ in lines[:3]]
    assert [e.payload["n"] for e in messages] == [1, 2, 3]
    assert [e.payload for e in broadcasts] == [{"text": "hello"}]
