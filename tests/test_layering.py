"""The pure core stays pure: its modules import no event loop, no network and no logging."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mqbroker"
#: Topics, the index, messages, the extension points' contracts, the sans-IO protocol and
#: the client's sans-IO core: nothing here may do I/O or depend on how it is done.
PURE = [
    "topics.py", "index.py", "message.py", "history.py", "fanout.py", "dedup.py",
    "ratelimit.py",
    "plugins.py", "protocol/events.py", "protocol/codec.py", "protocol/connection.py",
    "protocol/__init__.py", "protocol/websocket.py", "client/core.py", "client/errors.py",
    "resume.py", "redact.py", "registry.py", "sessions.py", "mcp/ids.py", "presence.py",
]
FORBIDDEN = ("trio", "trio_websocket", "wsproto", "redis", "structlog", "asyncio",
             "mqbroker.server", "mqbroker.broker", "mqbroker.daemon", "mqbroker_plugins")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    """A pure-core module imports none of the I/O libraries or I/O layers of the project."""
    imports = imported_modules(PACKAGE / module)
    offending = sorted(name for name in imports
                       if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert not offending, f"mqbroker/{module} imports {offending}"


def test_the_list_of_pure_modules_is_current() -> None:
    """Every module named as pure exists (so a rename cannot silently drop one from the check)."""
    assert all((PACKAGE / module).is_file() for module in PURE)


def test_the_broker_does_not_import_the_server() -> None:
    """The broker reaches sessions through its small `Session` protocol: it imports no part of
    the server (which imports the broker), so it runs and is tested without sockets."""
    imports = imported_modules(PACKAGE / "broker.py")
    assert not [name for name in imports if name.startswith("mqbroker.server")]
