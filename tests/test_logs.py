"""Logging: JSON lines or the console view, level filtering, names, timestamps and exceptions."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog

from mqbroker.config import LogConfig, LogFormat
from mqbroker.logs import configure, logger
from mqbroker.protocol import ErrorCode, HandshakeFailed
from mqbroker.redact import LOG_STRING_LIMIT
from tests.harness import broker_config, raw_session, running_broker

#: Created before any `configure`, as a module-level logger elsewhere in the code base is.
EARLY = structlog.get_logger("mqbroker.early")


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Leave structlog as other test modules expect it."""
    yield
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_event_and_fields() -> None:
    """format = "json": one parseable JSON object per event, with its fields as keys."""
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    logger("mqbroker.session").info("session.opened", session="s1", peer="127.0.0.1:4000")
    [line] = json_lines(out)
    assert line["event"] == "session.opened"
    assert line["session"] == "s1"
    assert line["peer"] == "127.0.0.1:4000"
    assert line["level"] == "info"
    assert line["logger"] == "mqbroker.session"


def test_timestamps_are_iso_8601_utc() -> None:
    """Every event carries an ISO 8601 timestamp in UTC."""
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    logger().info("broker.started")
    [line] = json_lines(out)
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


def test_level_filtering_drops_less_severe_events() -> None:
    """At level "info", debug events are dropped; info and above are written."""
    out = io.StringIO()
    configure(LogConfig(level="info", format="json"), stream=out)
    log = logger()
    log.debug("x.debug")
    log.info("x.info")
    log.error("x.error")
    assert [line["event"] for line in json_lines(out)] == ["x.info", "x.error"]


def test_debug_level_keeps_debug_events() -> None:
    """At level "debug", debug events are written."""
    out = io.StringIO()
    configure(LogConfig(level="debug", format="json"), stream=out)
    logger().debug("x.debug", n=1)
    [line] = json_lines(out)
    del line["timestamp"]
    assert line == {"event": "x.debug", "n": 1, "level": "debug", "logger": "mqbroker"}


def test_exceptions_are_rendered_in_json() -> None:
    """log.exception inside an except block records the exception's type and message."""
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    try:
        raise RuntimeError("redis went away")
    except RuntimeError:
        logger().exception("fanout.degraded")
    [line] = json_lines(out)
    [exception] = line["exception"]
    assert exception["exc_type"] == "RuntimeError"
    assert exception["exc_value"] == "redis went away"


def test_loggers_made_before_configure_follow_it() -> None:
    """A module-level logger, made once and used already, follows every later `configure`."""
    first, second = io.StringIO(), io.StringIO()
    configure(LogConfig(format="json"), stream=first)
    EARLY.info("early.first")
    configure(LogConfig(format="json", level="error"), stream=second)
    EARLY.info("early.dropped")
    EARLY.error("early.second")
    assert [line["event"] for line in json_lines(first)] == ["early.first"]
    [line] = json_lines(second)
    assert (line["event"], line["logger"]) == ("early.second", "mqbroker.early")


def test_auto_is_json_when_the_stream_is_not_a_terminal() -> None:
    """format = "auto" on a pipe or file: JSON lines, for machines."""
    out = io.StringIO()
    configure(LogConfig(format="auto"), stream=out)
    logger().info("x.auto", k="v")
    assert json_lines(out)[0]["k"] == "v"


def test_console_format_is_for_people() -> None:
    """format = "console": not JSON; the event name and key=value fields on one line."""
    out = io.StringIO()
    configure(LogConfig(format="console"), stream=out)
    logger().warning("session.slow", outbox=10)
    [text] = out.getvalue().splitlines()
    assert "session.slow" in text
    assert "outbox=10" in text
    assert "warning" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_is_console_on_a_terminal() -> None:
    """format = "auto" on a terminal (a real pseudo-terminal here): the console view."""
    controller, terminal = os.openpty()
    with open(terminal, "w", encoding="utf-8") as tty, open(controller, "rb", buffering=0) as rx:
        assert tty.isatty()
        configure(LogConfig(format="auto"), stream=tty)
        logger().info("x.tty", k="v")
        text = rx.read(4096).decode()
    assert "x.tty" in text
    assert not text.lstrip().startswith("{")


SECRET_URL = "redis://alice:s3cret-pw@10.0.0.1:6379/0"


@pytest.mark.parametrize("format", ["json", "console"])
def test_no_url_password_reaches_a_log_line(format: LogFormat) -> None:
    """Whoever logs a URL with credentials (a plugin, an exception's message, a nested field),
    the line shows it as redis://alice:***@host: the password never appears."""
    out = io.StringIO()
    configure(LogConfig(format=format), stream=out)
    log = logger("mqbroker.fanout")
    log.warning("fanout.degraded", url=SECRET_URL, reason=f"cannot reach {SECRET_URL}")
    log.info("x.nested", servers=[SECRET_URL], detail={"url": SECRET_URL})
    try:
        raise ConnectionError(f"connecting to {SECRET_URL} failed")
    except ConnectionError:
        log.exception("history.redis_unreachable")
    text = out.getvalue()
    assert "s3cret" not in text
    assert "redis://alice:***@10.0.0.1:6379/0" in text


@pytest.mark.parametrize("format", ["json", "console"])
def test_long_strings_are_cut_in_log_lines(format: LogFormat) -> None:
    """A client-supplied string of megabytes gives a short line that says how long it was."""
    out = io.StringIO()
    configure(LogConfig(format=format), stream=out)
    logger("mqbroker.session").info("session.opened", client="c" * 3_000_000, topics=["t" * 5000])
    [line] = out.getvalue().splitlines()
    assert len(line) < 2000
    assert f"(+{3_000_000 - LOG_STRING_LIMIT} chars)" in line
    assert f"(+{5000 - LOG_STRING_LIMIT} chars)" in line


async def test_a_huge_hello_client_field_gives_a_short_log_line() -> None:
    """The issue's flood: a hello whose `client` is megabytes long (100 MB once wrote 100 MB
    of log) is refused (a `client` is at most MAX_CLIENT_CHARS: it is copied into presence
    entries and events too), and what is logged of it stays short."""
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    client = "c" * (4 * 1024 * 1024)
    config = broker_config(max_frame_bytes=8 * 1024 * 1024)
    async with running_broker(config) as broker, \
            raw_session(broker.url, hello=False) as session:
        await session.send_frame(session.connection.hello(client))
        with pytest.raises(HandshakeFailed) as refused:
            await session.next_event()
        assert refused.value.error.code == ErrorCode.BAD_EVENT
    lines = out.getvalue().splitlines()
    assert lines and all(len(line) < 2000 for line in lines)
    assert not [line for line in lines if "session.opened" in line]
