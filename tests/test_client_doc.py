"""docs/client.md, the clients' API reference, is kept true: it is what docs/client_reference.py
writes from the code, and names every public name of both client modules with its signature."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import mqbroker.client
import mqbroker.client.aio

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "client.md"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("client_reference",
                                                  ROOT / "docs" / "client_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _headings() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if line.startswith("#")]


def test_the_reference_is_what_the_script_writes() -> None:
    """docs/client.md's reference is exactly what docs/client_reference.py writes now: run
    `python docs/client_reference.py` after changing the client API."""
    text = DOC.read_text()
    assert _script().updated(text) == text, "docs/client.md is out of date: run " \
        "python docs/client_reference.py"


@pytest.mark.parametrize("module", [mqbroker.client, mqbroker.client.aio],
                         ids=lambda m: m.__name__)
def test_every_public_name_is_documented(module: ModuleType) -> None:
    """Each name in the module's __all__ has a section (or a row in the errors table)."""
    text = DOC.read_text()
    missing = [name for name in module.__all__
               if f"### `{name}`" not in text and f"| `{name}` |" not in text]
    assert missing == []


def _public_methods(cls: type) -> dict[str, Any]:
    return {name: value for name, value in inspect.getmembers(cls)
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.ismethod(value))}


@pytest.mark.parametrize("cls, owner", [
    (mqbroker.client.Client, "client"), (mqbroker.client.aio.Client, "client"),
    (mqbroker.client.Subscription, "subscription"),
    (mqbroker.client.aio.Subscription, "subscription")], ids=lambda v: getattr(v, "__module__",
                                                                            v))
def test_every_method_is_documented_with_its_signature(cls: type, owner: str) -> None:
    """Each public method of both clients' Client and Subscription has a heading naming it with
    all its parameters, in order (a method added, renamed, or given another parameter without
    the doc fails here)."""
    headings = _headings()
    for name, method in _public_methods(cls).items():
        params = [p for p in inspect.signature(method).parameters if p != "self"]
        found = [h for h in headings if f"{owner}.{name}(" in h]
        assert found, f"{owner}.{name} is not in docs/client.md"
        assert any(_in_order(h.split(f"{owner}.{name}(", 1)[1], params) for h in found), \
            (name, params, found)


def _in_order(text: str, names: list[str]) -> bool:
    position = 0
    for name in names:
        position = text.find(f"{name}", position)
        if position < 0:
            return False
    return True


def test_connect_is_documented_with_its_signature() -> None:
    """connect's heading lists every parameter of both drivers' connect."""
    (heading,) = [h for h in _headings() if h.startswith("#### `connect(")]
    for connect in (mqbroker.client.connect, mqbroker.client.aio.connect):
        assert _in_order(heading, list(inspect.signature(connect).parameters))


def test_every_error_says_what_it_means() -> None:
    """Each row of the errors table has a meaning (the class's docstring)."""
    text = DOC.read_text()
    rows = [line for line in text.split("### Errors", 1)[1].splitlines()
            if line.startswith("| `")]
    assert len(rows) >= 27
    assert [row for row in rows if row.rstrip().endswith("|  |")] == []


def test_the_readme_links_to_the_reference() -> None:
    assert "(docs/client.md)" in (ROOT / "README.md").read_text()
