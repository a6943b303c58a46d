"""Writes the reference part of docs/client.md from the clients' docstrings and signatures.

    python docs/client_reference.py          # rewrite the reference in docs/client.md
    python docs/client_reference.py --check  # exit 1 if docs/client.md is not up to date

tests/test_client_doc.py fails when the file is not what this script writes, so an API change
(a method added, renamed, or its signature changed) must come with the doc's.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

import mqbroker.client
import mqbroker.client.aio
import mqbroker.client.errors

DOC = Path(__file__).resolve().parent / "client.md"
BEGIN = "<!-- reference: written by docs/client_reference.py from the docstrings; do not edit -->"
END = "<!-- end of the reference -->"
MODULES = (mqbroker.client, mqbroker.client.aio)
#: Documented in their own sections, in this order; the errors get a table of their own.
CLASSES = ("Client", "Subscription", "Message", "Gap", "Reconnect", "Limits", "SessionRecord",
           "SessionPage")


#: How the reference calls an instance of each class.
OWNERS = {"SessionRecord": "record", "SessionPage": "page"}


def signature(function: Callable[..., Any], *, first: str | None = "self") -> str:
    """`(a: int, *, b: str = '') -> None`, annotations as written in the source."""
    sig = inspect.signature(function)
    parts: list[str] = []
    star = False
    params = list(sig.parameters.values())
    if params and params[0].name == first:
        params = params[1:]
    for param in params:
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if param.kind is param.VAR_POSITIONAL:
            star = True
        text = {param.VAR_POSITIONAL: "*", param.VAR_KEYWORD: "**"}.get(param.kind, "")
        text += param.name
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    result = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        result += f" -> {_annotation(sig.return_annotation)}"
    return result


def _annotation(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return text.replace("SubscriptionT", "Subscription")  # what each driver's client returns


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """The public methods and properties of `cls`, by name (inherited ones included)."""
    fields = {f.name for f in attrs.fields(cls)} if attrs.has(cls) else set()
    for name in sorted(dir(cls)):
        if name.startswith("_") and name != "__anext__":
            continue
        if name in fields:
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property) or callable(value) or isinstance(value, classmethod):
            yield name, value


def _member(owner: str, name: str, value: Any) -> list[str]:
    if isinstance(value, property):
        lines = [f"#### `{owner}.{name}` (property)", ""]
        return_type = typing.get_type_hints(value.fget).get("return") if value.fget else None
        if return_type is not None:
            lines[0] = f"#### `{owner}.{name}` (property) -> `{_type_name(return_type)}`"
        return [*lines, _doc(value), ""]
    function = value.__func__ if isinstance(value, classmethod | staticmethod) else value
    body = _doc(function)
    if name == "__anext__":
        return [f"#### `async for item in {owner}`", "", body, ""]
    prefix = "async " if inspect.iscoroutinefunction(function) or \
        inspect.isasyncgenfunction(function) else ""
    # Overloads: one heading each. A classmethod's `cls` is not shown.
    first = "cls" if isinstance(value, classmethod) else "self"
    heads = [f"#### `{prefix}{owner}.{name}{signature(f, first=first)}`"
             for f in typing.get_overloads(function) or [function]]
    return [*heads, "", body, ""] if body else [*heads, ""]


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _fields(cls: type) -> list[str]:
    if not attrs.has(cls):
        return []
    rows = ["| field | type | default |", "|---|---|---|"]
    for field in attrs.fields(cls):
        if field.name.startswith("_") or field.alias.startswith("_"):
            continue
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            shown = "(empty)"
        elif default is attrs.NOTHING:
            shown = "(required)" if field.init else "(set by the client)"
        else:
            shown = f"`{default!r}`"
        rows.append(f"| `{field.name}` | `{field.type}` | {shown} |")
    return [*rows, ""]


def _class(name: str) -> list[str]:
    trio_cls, aio_cls = (getattr(module, name) for module in MODULES)
    where = (f"`mqbroker.client.{name}` and `mqbroker.client.aio.{name}`" if trio_cls is aio_cls
             else f"`mqbroker.client.{name}` (trio) and `mqbroker.client.aio.{name}` (asyncio), "
                  "the same API")
    lines = [f"### `{name}`", "", f"In {where}.", "", _doc(trio_cls), ""]
    lines += _fields(trio_cls)
    owner = OWNERS.get(name, name.lower())
    for member, value in _members(trio_cls):
        lines += _member(owner, member, value)
    return lines


def _errors() -> list[str]:
    rows = ["### Errors", "",
            "Every class in both `mqbroker.client` and `mqbroker.client.aio` (the same classes, "
            "from `mqbroker.client.errors`). `BrokerError`s carry `code` (the protocol's error "
            "code) and `ref` (the op refused); a publish's, its `msg_id`.", "",
            "| class | base | code | meaning |", "|---|---|---|---|"]
    for name in mqbroker.client.errors.__all__:
        cls = getattr(mqbroker.client.errors, name)
        base = cls.__mro__[1].__name__
        code = getattr(cls, "default_code", None)
        meaning = " ".join(_doc(cls).split())
        rows.append(f"| `{name}` | `{base}` | {f'`{code}`' if code else ''} | {meaning} |")
    return [*rows, ""]


def render() -> str:
    """The reference, as docs/client.md holds it between its markers."""
    connect = mqbroker.client.connect
    lines = [BEGIN, "", "## Reference", "",
             "### `connect`", "",
             "`mqbroker.client.connect` (trio) and `mqbroker.client.aio.connect` (asyncio): one "
             "signature, `async with connect(url, ...) as client`.", "",
             f"#### `connect{signature(connect, first=None)}`", "", _doc(connect), ""]
    for name in CLASSES:
        lines += _class(name)
    lines += ["### `CredentialProvider`", "",
              "`Callable[[], Awaitable[str]]`: what `auth=` takes besides a string (an async "
              "callable returning the current credential).", ""]
    lines += _errors()
    lines.append(END)
    return "\n".join(lines) + "\n"


def documented() -> set[str]:
    """Every public name of both client modules this reference covers."""
    return {"connect", "CredentialProvider", *CLASSES, *mqbroker.client.errors.__all__}


def updated(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render().rstrip("\n") + tail


def main() -> int:
    text = DOC.read_text()
    new = updated(text)
    if "--check" in sys.argv:
        return 0 if new == text else 1
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
