"""docs/protocol.md stays true to the code: its tables name every event, field, error code, close
code, gap reason and limit, and every JSON example and msgpack dump decodes as it claims."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
from attrs import frozen

from mqbroker.broker import open_broker
from mqbroker.config import Config
from mqbroker.history import Gap
from mqbroker.protocol import CLIENT_EVENTS, SERVER_EVENTS, CloseCode, ErrorCode, Rejected
from mqbroker.protocol.codec import CLIENT_SPECS, SERVER_SPECS, decode

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
CLIENT_TO_SERVER = "client→server"
SERVER_TO_CLIENT = "server→client"

#: How the document's field tables spell each annotation of an event field.
DOC_TYPES: dict[Any, str] = {
    int: "integer",
    str: "string",
    float: "number",
    bool: "boolean",
    dict[str, Any]: "map",
    tuple[int, ...]: "array of integers",
    tuple[str, ...]: "array of strings",
    tuple[dict[str, Any] | None, ...]: "array of maps",
    Any: "any",
}

Table = list[list[str]]


# --- reading the document --------------------------------------------------------------------


@frozen
class Section:
    title: str
    level: int
    #: The title of the enclosing level-2 section.
    chapter: str
    body: str


def _sections(text: str) -> list[Section]:
    """Every heading with the text up to the next heading; headings inside code fences are not."""
    sections: list[Section] = []
    title, level, chapter, body = "", 0, "", []
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"(#{1,6}) (.*)", line)
        if heading is None:
            body.append(line)
            continue
        sections.append(Section(title, level, chapter, "\n".join(body)))
        level, title, body = len(heading[1]), heading[2].strip(), []
        chapter = title if level == 2 else chapter
    sections.append(Section(title, level, chapter, "\n".join(body)))
    return sections


def _tables(body: str) -> list[Table]:
    """The Markdown tables of a section: rows of stripped cells, without the separator row."""
    tables: list[Table] = []
    current: Table = []
    for line in [*body.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _plain(cell: str) -> str:
    """A cell's value without its Markdown code quotes."""
    return cell.strip().strip("`")


def _section(title: str) -> Section:
    found = [s for s in _sections(DOC.read_text(encoding="utf-8")) if s.title == title]
    assert len(found) == 1, f"docs/protocol.md needs exactly one section titled {title!r}"
    return found[0]


def _table(title: str, first_header: str) -> Table:
    """The table of section `title` whose first column is headed `first_header`."""
    tables = [t for t in _tables(_section(title).body) if t[0][0] == first_header]
    assert len(tables) == 1, f"section {title!r} needs one table headed {first_header!r}"
    return tables[0]


def _first_column(table: Table) -> list[str]:
    return [_plain(row[0]) for row in table[1:]]


# --- examples --------------------------------------------------------------------------------

_EXAMPLE = re.compile(
    r"<!--\s*(?P<kind>example|msgpack)\s+(?P<side>\S+):\s*(?P<claim>[^>]*?)\s*-->\s*\n"
    r"```(?P<lang>\w+)\n(?P<body>.*?)```",
    re.DOTALL,
)


@frozen
class Example:
    kind: str  # "example" (a JSON frame) or "msgpack" (a hex dump)
    side: str
    #: Per event of the frame: its op, or "rejected CODE".
    claim: tuple[str, ...]
    lang: str
    body: str
    line: int

    @property
    def specs(self) -> Any:
        return CLIENT_SPECS if self.side == CLIENT_TO_SERVER else SERVER_SPECS


def _examples() -> list[Example]:
    text = DOC.read_text(encoding="utf-8")
    return [
        Example(m["kind"], m["side"], tuple(c.strip() for c in m["claim"].split(",")),
                m["lang"], m["body"], text.count("\n", 0, m.start()) + 1)
        for m in _EXAMPLE.finditer(text)
    ]


def _example_id(example: Example) -> str:
    return f"line{example.line}-{example.kind}-{'+'.join(example.claim).replace(' ', '_')}"


def _json_examples() -> list[Example]:
    return [e for e in _examples() if e.kind == "example"]


def _msgpack_dumps() -> list[Example]:
    return [e for e in _examples() if e.kind == "msgpack"]


def _assert_claim(items: list[Any], example: Example) -> None:
    assert len(items) == len(example.claim), (items, example.claim)
    for item, claim in zip(items, example.claim, strict=True):
        if claim.startswith("rejected "):
            assert isinstance(item, Rejected), item
            assert item.code == ErrorCode(claim.removeprefix("rejected ")), item
        else:
            assert not isinstance(item, Rejected), f"{claim} example rejected: {item}"
            assert item.OP == claim, item


def _hex_bytes(body: str) -> bytes:
    """A hex dump's bytes: the hex pairs of every line, before its `#` comment."""
    return bytes.fromhex(" ".join(line.split("#", 1)[0] for line in body.splitlines()))


# --- the tables ------------------------------------------------------------------------------


def test_every_error_code_is_in_the_errors_table() -> None:
    """The Errors table lists exactly the ErrorCode values, each once."""
    codes = _first_column(_table("Errors", "code"))
    assert sorted(codes) == sorted(code.value for code in ErrorCode)
    assert len(codes) == len(set(codes))


def test_every_close_code_is_in_the_closing_table() -> None:
    """The Closing table lists exactly the CloseCode values, each once."""
    codes = [int(code) for code in _first_column(_table("Closing", "code"))]
    assert sorted(codes) == sorted(int(code) for code in CloseCode)


def test_every_gap_reason_is_in_the_resuming_table() -> None:
    """Every reason a suback can carry is in the Resuming table, with what it replays."""
    table = _table("Resuming with since", "reason")
    assert sorted(_first_column(table)) == sorted(gap.value for gap in Gap)
    assert all(row[2] for row in table[1:]), "every reason says what is replayed"


async def test_every_limit_is_in_the_limits_table_with_its_default() -> None:
    """The Limits table lists exactly the keys the welcome sends, with the default values."""
    async with open_broker(Config(), "doc") as broker:
        limits = broker.limits(broker.access.rates)
    table = _table("Limits", "key")
    documented = {_plain(row[0]): json.loads(_plain(row[2])) for row in table[1:]}
    assert documented == limits


@pytest.mark.parametrize("cls", [*CLIENT_EVENTS, *SERVER_EVENTS], ids=lambda cls: cls.OP)
def test_every_event_has_a_section_with_its_fields(cls: type[Any]) -> None:
    """Each event has a section under its direction whose table gives every wire key (`op` and
    every attrs field), with the type and the required flag the codec checks."""
    section = _section(f"`{cls.OP}`")
    direction = "Client → server operations" if cls in CLIENT_EVENTS else "Server → client events"
    assert section.chapter == direction
    rows = {_plain(row[0]): row for row in _table(f"`{cls.OP}`", "key")[1:]}
    hints = typing.get_type_hints(cls)
    expected = {"op": ("string", True)}
    for f in attrs.fields(cls):
        expected[f.name] = (DOC_TYPES[_unoptional(hints[f.name])], f.default is attrs.NOTHING)
    assert sorted(rows) == sorted(expected)
    for key, (type_word, required) in expected.items():
        _, doc_type, doc_required, meaning = rows[key]
        assert doc_type.startswith(type_word), (key, doc_type)
        assert doc_required == ("yes" if required else "no"), (key, doc_required)
        assert meaning, key
    assert _plain(rows["op"][3]) == f'"{cls.OP}"'


def _unoptional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return hint


# --- the examples ----------------------------------------------------------------------------


def test_every_json_block_is_a_checked_example() -> None:
    """No JSON block escapes the example checks: each one carries an example marker."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count("```json\n") == len(_json_examples())
    assert all(e.lang == "json" for e in _json_examples())
    assert all(e.side in (CLIENT_TO_SERVER, SERVER_TO_CLIENT) for e in _examples())


def test_the_document_has_examples_of_every_event() -> None:
    """Every event of both directions appears in at least one checked JSON example."""
    claimed = {claim for e in _json_examples() for claim in e.claim}
    assert claimed >= {cls.OP for cls in (*CLIENT_EVENTS, *SERVER_EVENTS)}
    assert any(len(e.claim) > 1 for e in _json_examples()), "a batch example"


@pytest.mark.parametrize("example", _json_examples(), ids=_example_id)
def test_json_examples_decode_into_the_events_they_claim(example: Example) -> None:
    """A JSON example, sent as a text frame, decodes with its side's specs into the events its
    marker names (or into the rejection it names)."""
    _assert_claim(decode(example.body, example.specs), example)


@pytest.mark.parametrize("example", _msgpack_dumps(), ids=_example_id)
def test_msgpack_dumps_are_the_json_example_before_them(example: Example) -> None:
    """A hex dump is a msgpack frame decoding into the same events as the JSON example right
    before it."""
    assert example.lang == "text"
    events = decode(_hex_bytes(example.body), example.specs)
    _assert_claim(events, example)
    before = [e for e in _json_examples() if e.line < example.line][-1]
    assert before.side == example.side
    assert events == decode(before.body, before.specs)


def test_the_doc_parser_sees_what_it_checks() -> None:
    """The checks above are not vacuous: the parser finds the sections, tables and examples."""
    assert len(_json_examples()) >= 30
    assert len(_msgpack_dumps()) == 2
    assert len(_table("Errors", "code")) == len(ErrorCode) + 1
    with pytest.raises(AssertionError):
        _section("no such section")
