"""The operator's HTTP endpoints: `/health` (JSON) and `/metrics` (Prometheus text), on h11.

One request per connection (`Connection: close`), a bounded request size and a deadline per
connection: these endpoints are scraped by machines, and no client of theirs may hold the
broker's resources or crash it, whatever bytes it sends.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import structlog
import trio
from attrs import define, field, frozen

from mqbroker.config import MetricsConfig
from mqbroker.server.listener import ListenError

if TYPE_CHECKING:
    from mqbroker.broker import Broker

logger = structlog.get_logger("mqbroker.http")

#: The request line and headers may not exceed this; h11 answers 431 beyond it.
MAX_REQUEST_BYTES = 8 * 1024
#: From accept to close: a silent or dripping client is dropped after this many seconds.
CONNECTION_TIMEOUT = 10.0
#: After answering, unread request bytes are drained (this much, this long) before closing:
#: closing a socket with unread input makes the kernel reset it, which can destroy the response.
LINGER_BYTES = 64 * 1024
LINGER_SECONDS = 1.0
RECEIVE_BYTES = 4096

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
#: Prometheus' text exposition format.
EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"

#: Stats that are levels, not running totals; every other stat is a counter.
GAUGES = frozenset({
    "sessions", "subscriptions",
    "history_topics", "history_messages", "history_bytes", "history_tombstones",
    "fanout_watched_filters", "fanout_watches", "fanout_dedup_entries", "fanout_dedup_bytes",
})
PREFIX = "mqbroker_"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


@frozen(kw_only=True)
class Reply:
    """A whole response: status, body, its media type, and any further headers."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


# --- The replies (no I/O) ----------------------------------------------------------------------


def json_reply(status: int, document: Mapping[str, Any]) -> Reply:
    return Reply(status=status, body=json.dumps(document).encode() + b"\n", content_type=JSON,
                 headers=(("cache-control", "no-store"),))


def text_reply(status: int, text: str) -> Reply:
    return Reply(status=status, body=f"{text}\n".encode())


def metric_name(stat: str, gauges: frozenset[str] = GAUGES) -> tuple[str, str]:
    """The Prometheus name and type of one stat: counters end in `_total`, by convention."""
    name = PREFIX + _UNSAFE.sub("_", stat)
    if stat in gauges:
        return name, "gauge"
    return (name if name.endswith("_total") else f"{name}_total"), "counter"


def exposition(stats: Mapping[str, int], *, instance: str, healthy: bool,
               gauges: frozenset[str] = GAUGES,
               labeled: Mapping[str, tuple[str, Mapping[str, int]]] | None = None) -> str:
    """The stats, liveness and fan-out health in Prometheus' text format (version 0.0.4).
    `labeled`: gauges with one label, name -> (label, {label value: value})."""
    families: dict[str, tuple[str, str]] = {
        f"{PREFIX}up": ("gauge", f'{PREFIX}up{{instance_id="{_label_value(instance)}"}} 1'),
        f"{PREFIX}fanout_healthy": ("gauge", f"{PREFIX}fanout_healthy {int(healthy)}"),
    }
    for stat, value in sorted(stats.items()):
        name, kind = metric_name(stat, gauges)
        # Two stats may sanitize to one name; a repeated family would fail the whole scrape.
        families.setdefault(name, (kind, f"{name} {int(value)}"))
    for stat, (label, values) in sorted((labeled or {}).items()):
        name = PREFIX + _UNSAFE.sub("_", stat)
        samples = "\n".join(f'{name}{{{label}="{_label_value(key)}"}} {int(value)}'
                             for key, value in sorted(values.items()))
        families.setdefault(name, ("gauge", samples))
    lines = [f"# TYPE {name} {kind}\n{sample}\n" for name, (kind, sample) in families.items()]
    return "".join(lines)


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --- The endpoints -------------------------------------------------------------------------


@define(eq=False)
class Endpoints:
    """Answers `/health` and `/metrics` about one broker; `handle` serves one connection."""

    broker: Broker
    started: float = field(factory=trio.current_time)
    #: Non-empty: every request must carry `Authorization: Bearer <token>` (see MetricsConfig).
    token: str = field(default="", repr=False)

    def reply(self, method: bytes, target: bytes, authorization: bytes | None = None) -> Reply:
        """The reply to `method target` (with that `Authorization` header value, if any); a
        failing plugin gives a 500, never an exception."""
        if self.token and not bearer_matches(authorization, self.token):
            self.broker.counters["security_metrics_refused"] += 1
            return Reply(status=401, body=b"unauthorized\n",
                         headers=(("www-authenticate", 'Bearer realm="mqbroker"'),))
        routes: dict[bytes, Callable[[], Reply]] = {b"/health": self.health,
                                                   b"/metrics": self.metrics}
        route = routes.get(target.partition(b"?")[0])
        if route is None:
            return text_reply(404, "not found")
        if method not in (b"GET", b"HEAD"):
            return Reply(status=405, body=b"method not allowed\n",
                         headers=(("allow", "GET, HEAD"),))
        try:
            return route()
        except Exception:
            # A plugin's health() or stats() failing is the operator's news, not a crash.
            logger.exception("http.reply_failed", target=_printable(target))
            return text_reply(500, "internal error")

    def health(self) -> Reply:
        health = self.broker.fanout.health()
        return json_reply(200 if health.ok else 503, {
            "status": "ok" if health.ok else "degraded",
            "detail": health.detail,
            "instance": self.broker.instance_id,
            "sessions": len(self.broker.sessions),
            "uptime_seconds": round(trio.current_time() - self.started, 3),
        })

    def metrics(self) -> Reply:
        # The plugins say which of their stats are gauges (Broker.gauges, issue 9).
        text = exposition(self.broker.stats(), instance=self.broker.instance_id,
                          healthy=self.broker.fanout.health().ok,
                          gauges=GAUGES | self.broker.gauges(),
                          labeled=self.broker.labeled_gauges())
        return Reply(status=200, body=text.encode(), content_type=EXPOSITION)

    async def handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Read one request, answer it and close, within CONNECTION_TIMEOUT; never raises."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            with trio.move_on_after(CONNECTION_TIMEOUT) as deadline:
                await self._exchange(stream, connection)
            if deadline.cancelled_caught:
                logger.debug("http.timed_out")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            logger.debug("http.connection_lost", error=str(e))
        except Exception:
            # serve_tcp would let a handler's exception end the daemon: log it instead.
            logger.exception("http.failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.abc.HalfCloseableStream,
                        connection: h11.Connection) -> None:
        try:
            request = await _read_request(stream, connection)
        except h11.RemoteProtocolError as e:
            logger.debug("http.bad_request", error=str(e), status=e.error_status_hint)
            await _send(stream, connection, text_reply(e.error_status_hint, "bad request"))
            await _linger(stream)
            return
        if request is None:
            return  # the client left without asking anything
        reply = self.reply(request.method, request.target, _header(request, b"authorization"))
        logger.debug("http.request", method=request.method.decode("ascii", "replace"),
                     target=_printable(request.target), status=reply.status)
        await _send(stream, connection, reply, head=request.method == b"HEAD")
        await _linger(stream)


async def serve_http(broker: Broker, config: MetricsConfig, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `/health` and `/metrics` on config.host:config.port; `task_status` gets the port."""
    endpoints = Endpoints(broker, token=config.token)
    async with trio.open_nursery() as nursery:
        try:
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, endpoints.handle, config.port, host=config.host))
        except OSError as error:
            raise ListenError.of(config.host, config.port, error) from error
        port: int = listeners[0].socket.getsockname()[1]
        logger.info("http.listening", host=config.host, port=port)
        task_status.started(port)


def bearer_matches(authorization: bytes | None, token: str) -> bool:
    """Whether an `Authorization` value is `Bearer <token>` (the scheme in any case, RFC 9110
    section 11.1). The token is compared in constant time: its length is all a timing reveals."""
    if authorization is None:
        return False
    scheme, _, presented = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(presented.strip(), token.encode("ascii"))


def _header(request: h11.Request, name: bytes) -> bytes | None:
    """The value of header `name` (h11 lower-cases names); None if absent. Sent twice, the
    header is refused as a whole: which copy counts would be a guess."""
    values = [value for field, value in request.headers if field == name]
    return values[0] if len(values) == 1 else None


# --- Bytes in, bytes out -------------------------------------------------------------------


async def _read_request(stream: trio.abc.ReceiveStream,
                        connection: h11.Connection) -> h11.Request | None:
    """The request, or None when the client closed first. Raises h11.RemoteProtocolError."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            # b"" at EOF tells h11 the client closed; it then yields ConnectionClosed or raises.
            connection.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None


async def _send(stream: trio.abc.SendStream, connection: h11.Connection, reply: Reply, *,
                head: bool = False) -> None:
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return  # h11 cannot answer from here; closing is the answer
    headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body))),
               ("connection", "close"), *reply.headers]
    data = connection.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    if not head:  # a HEAD reply has the GET reply's headers and no body (RFC 9110, 9.3.2)
        data += connection.send(h11.Data(data=reply.body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then discard what the client still sends until it closes too (bounded)."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES and (data := await stream.receive_some(RECEIVE_BYTES)):
            drained += len(data)


def _printable(target: bytes) -> str:
    return target[:200].decode("ascii", "replace")
