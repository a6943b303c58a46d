"""Logging: structlog configured in this one module, JSON lines or a console view.

Events are dotted nouns (`session.opened`, `fanout.degraded`) with structured fields:
`logger("mqbroker.session").info("session.opened", session=sid, peer=peer)`.

Every string written passes `mqbroker.redact.for_log`: URL credentials are masked and strings
over LOG_STRING_LIMIT characters cut, with their length noted, whoever logs them (a plugin too):
clients supply some of them (a hello's `client`, topics), and a log is no place for a secret.
"""

from __future__ import annotations

import io
import sys
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, ExcInfo, FilteringBoundLogger, Processor

from mqbroker.config import LogConfig
from mqbroker.redact import LOG_STRING_LIMIT, for_log

ROOT = "mqbroker"
#: Longest rendered exception (traceback) written whole.
EXCEPTION_LIMIT = 16 * 1024


def configure(config: LogConfig, *, stream: TextIO | None = None) -> None:
    """Send log events at `config.level` and above to `stream` (standard error by default).

    JSON lines when `format = "json"`, or "auto" and the stream is not a terminal; an aligned,
    human-readable view otherwise.
    """
    out = sys.stderr if stream is None else stream
    as_json = config.format == "json" or (config.format == "auto" and not out.isatty())
    structlog.configure(
        processors=[*_enrich(), *(_json() if as_json else _console(out))],
        wrapper_class=structlog.make_filtering_bound_logger(config.level),
        logger_factory=_LineLoggerFactory(out),
        # Cached loggers would keep the configuration of their first use: a later `configure`
        # (and `structlog.testing.capture_logs` in tests) would not reach module-level loggers.
        cache_logger_on_first_use=False,
    )


def logger(name: str = ROOT) -> FilteringBoundLogger:
    """A logger whose events carry `logger=name`; it follows later `configure` calls."""
    bound: FilteringBoundLogger = structlog.get_logger(name)
    return bound


def _enrich() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        _add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _json() -> list[Processor]:
    # Locals in tracebacks could carry secrets (a Redis URL with a password) into the logs.
    tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    # Sanitised after the traceback is rendered: an exception's message may hold a URL too.
    return [tracebacks, _sanitise, structlog.processors.JSONRenderer()]


def _console(out: TextIO) -> list[Processor]:
    return [_sanitise, structlog.dev.ConsoleRenderer(colors=out.isatty(),
                                                     exception_formatter=_redacted_traceback)]


def _sanitise(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """Every string value, nested ones too, as `for_log` shows it (exc_info is the renderer's,
    and a rendered exception keeps more of its text: it is the broker's, not a client's)."""
    return {key: value if key == "exc_info" else
            _clean(value, EXCEPTION_LIMIT if key == "exception" else LOG_STRING_LIMIT)
            for key, value in event_dict.items()}


def _clean(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return for_log(value, limit)
    if isinstance(value, dict):
        return {key: _clean(item, limit) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item, limit) for item in value]
    return value


def _redacted_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """The console's traceback, plain, with URL credentials masked like every other string."""
    text = io.StringIO()
    structlog.dev.plain_traceback(text, exc_info)
    sio.write(for_log(text.getvalue(), EXCEPTION_LIMIT))


def _add_logger_name(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("logger", getattr(logger, "name", ROOT))
    return event_dict


class _LineLogger(structlog.WriteLogger):
    """Writes one line per event to a stream, and knows the name it was asked for by."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _LineLoggerFactory:
    """structlog passes `get_logger`'s positional arguments here: the first is the name."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, *args: Any) -> _LineLogger:
        name = args[0] if args and isinstance(args[0], str) else ROOT
        return _LineLogger(self.stream, name)
