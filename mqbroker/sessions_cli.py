"""`mqbroker sessions list|get|delete`: the session registry of a running broker, for operators.

It talks to the broker over the protocol with the trio client (--url, --token), so it sees
what any client with the same credential would: with [auth], listing every user's sessions
and naming another user need a role with `sessions = "any"`. Exit status: 0 done, 1 a
session not found or refused by the broker, or the broker unreachable; 2 a bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mqbroker.registry import EVERY_USER, record_map
from mqbroker.sessions import SessionRecord, SessionState

DEFAULT_URL = "ws://127.0.0.1:7878/"
#: Seconds to connect and to wait for each answer.
TIMEOUT = 10.0
EXIT_FAILED = 1
_COLUMNS = ("ID", "USER", "STATE", "EXPIRES", "VERSION")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "sessions", help="list, show or delete registry sessions of a running broker",
        description="The session registry of a running broker, over its WebSocket protocol "
        "(docs/sessions.md, \"Operations\").")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list sessions (every user's unless --user)")
    listing.add_argument("--state", choices=[state.value for state in SessionState])
    listing.add_argument("--limit", type=int, metavar="N",
                         help="list at most N sessions (default: all)")
    get = actions.add_parser("get", help="show sessions by id")
    get.add_argument("ids", nargs="+", metavar="ID")
    delete = actions.add_parser("delete", help="delete sessions by id")
    delete.add_argument("ids", nargs="+", metavar="ID")
    for action in (listing, get, delete):
        action.add_argument("--url", default=DEFAULT_URL,
                            help=f"the broker's WebSocket URL (default {DEFAULT_URL})")
        action.add_argument("--token", help="the credential for the broker's [auth] mode")
        action.add_argument("--user", help="whose sessions (list: default every user's, which "
                            "needs sessions = \"any\"; get and delete: required in anonymous "
                            "mode, with [auth] default the token's principal)")
        action.add_argument("--json", action="store_true",
                            help="print JSON (one array of session records) instead of a table")


def run(args: argparse.Namespace) -> int:
    """Carry out `mqbroker sessions ...`; the exit status."""
    import trio

    from mqbroker.client import BrokerError, ClientError

    try:
        return trio.run(_run, args)
    except BrokerError as e:
        print(f"mqbroker: {e.code}: {e}", file=sys.stderr)
    except (ClientError, trio.TooSlowError) as e:
        print(f"mqbroker: {args.url}: {e or 'no answer in time'}", file=sys.stderr)
    return EXIT_FAILED


async def _run(args: argparse.Namespace) -> int:
    import trio

    from mqbroker.client import Reconnect, SessionNotFound, connect

    async with connect(args.url, name="mqbroker-cli", auth=args.token,
                       reconnect=Reconnect(enabled=False), open_timeout=TIMEOUT) as client:
        with trio.fail_after(TIMEOUT * 10):
            if args.action == "list":
                found = [record async for record in client.list_sessions(
                    user=args.user or EVERY_USER, state=args.state)]
                records = found[:args.limit] if args.limit is not None else found
                _print(records, as_json=args.json)
                return 0
            if args.action == "get":
                got = await client.get_sessions(args.ids, user=args.user)
                return _report(args.ids, got, as_json=args.json)
            deleted: list[SessionRecord | None] = []
            for session_id in args.ids:
                try:
                    deleted.append(await client.delete_session(session_id, user=args.user))
                except SessionNotFound:
                    deleted.append(None)
            return _report(args.ids, deleted, as_json=args.json)


def _report(ids: Sequence[str], records: Sequence[SessionRecord | None], *,
            as_json: bool) -> int:
    """Print what was found; each id not found on stderr (exit status 1)."""
    _print([record for record in records if record is not None], as_json=as_json)
    missing = [session_id for session_id, r in zip(ids, records, strict=True) if r is None]
    for session_id in missing:
        print(f"mqbroker: no session {session_id!r}", file=sys.stderr)
    return EXIT_FAILED if missing else 0


def _print(records: Sequence[SessionRecord], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([record_map(record) for record in records], indent=1))
        return
    print(table(records), end="")


def table(records: Sequence[SessionRecord]) -> str:
    """Records as a plain text table, one line each, under a header."""
    rows = [_COLUMNS, *[(r.id, r.user, r.state.value, _time(r.expires), str(r.version))
                        for r in records]]
    widths = [max(len(_cell(row[n])) for row in rows) for n in range(len(_COLUMNS))]
    return "".join("  ".join(_cell(cell).ljust(width) for cell, width in zip(
        row, widths, strict=True)).rstrip() + "\n" for row in rows)


def _cell(value: Any) -> str:
    # A user name is client text: shown escaped, so it cannot move the terminal's cursor.
    text = str(value)
    return text if text.isprintable() else ascii(text)


def _time(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
