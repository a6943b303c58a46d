"""`mqbroker sessions list|get|delete` as an operator runs it: a process talking to a running
broker (in this test's process) over real sockets."""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

from mqbroker.client import connect
from mqbroker.sessions_cli import table
from tests.harness import running_broker
from tests.test_registry_auth import TOKENS, auth_config
from tests.test_registry_protocol import sessions_config


async def cli(*args: str) -> tuple[int, str, str]:
    """`python -m mqbroker sessions ARGS`: exit status, stdout, stderr."""
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-m", "mqbroker", "sessions", *args],
                                      capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def _three_sessions(url: str) -> None:
    async with connect(url) as client:
        await client.create_session(session="s1", user="alice", state="active")
        await client.create_session(session="s2", user="bob")
        await client.create_session(session="s3", user="alice", metadata={"k": "v"})


async def test_list_prints_a_table_of_every_users_sessions_and_filters() -> None:
    """Without --user, every user's sessions (anonymous mode); --user and --state filter;
    --json prints the records."""
    async with running_broker(sessions_config()) as broker:
        await _three_sessions(broker.url)
        status, out, err = await cli("list", "--url", broker.url)
        assert (status, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "USER", "STATE", "EXPIRES", "VERSION"]
        assert [line.split()[:3] for line in lines[1:]] == [
            ["s1", "alice", "active"], ["s2", "bob", "pending"], ["s3", "alice", "pending"]]
        status, out, _ = await cli("list", "--url", broker.url, "--user", "alice",
                                   "--state", "pending", "--json")
        assert status == 0
        (record,) = json.loads(out)
        assert (record["id"], record["metadata"]) == ("s3", {"k": "v"})


async def test_get_and_delete_need_the_user_and_say_what_is_missing() -> None:
    """get prints the sessions found and names each one missing on stderr (exit 1); delete
    removes (and prints) them; without --user anonymous mode refuses (exit 1, bad_event)."""
    async with running_broker(sessions_config()) as broker:
        await _three_sessions(broker.url)
        status, out, err = await cli("get", "s1", "s2", "--url", broker.url, "--user", "alice")
        assert status == 1 and "s1" in out and "s2" not in out
        assert err == "mqbroker: no session 's2'\n"
        status, _, err = await cli("get", "s1", "--url", broker.url)
        assert status == 1 and err.startswith("mqbroker: bad_event: ") and "user" in err
        status, out, err = await cli("delete", "s1", "s3", "--url", broker.url, "--user",
                                     "alice", "--json")
        assert (status, err) == (0, "")
        assert [r["id"] for r in json.loads(out)] == ["s1", "s3"]
        status, out, _ = await cli("list", "--url", broker.url)
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["s2"]


async def test_with_auth_the_token_decides_whose_sessions_are_seen() -> None:
    """With [auth], --token authenticates: an operator role (sessions = "any") lists every
    user's; an "own" principal asking for every user is refused (forbidden, exit 1); a wrong
    token cannot connect (exit 1)."""
    async with running_broker(auth_config()) as broker:
        async with connect(broker.url, auth=TOKENS["alice"]) as alice:
            await alice.create_session(session="s-a")
        async with connect(broker.url, auth=TOKENS["bob"]) as bob:
            await bob.create_session(session="s-b")
        status, out, _ = await cli("list", "--url", broker.url, "--token", TOKENS["ops"])
        assert status == 0
        assert [line.split()[:2] for line in out.splitlines()[1:]] == [
            ["s-a", "alice"], ["s-b", "bob"]]
        status, _, err = await cli("list", "--url", broker.url, "--token", TOKENS["alice"])
        assert status == 1 and err.startswith("mqbroker: forbidden: ")
        status, out, _ = await cli("list", "--url", broker.url, "--token", TOKENS["alice"],
                                   "--user", "alice")
        assert status == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["s-a"]
        status, _, err = await cli("list", "--url", broker.url, "--token", "not-a-known-token")
        assert status == 1 and "cannot connect" in err


async def test_an_unreachable_broker_is_one_line_and_exit_1() -> None:
    status, out, err = await cli("list", "--url", "ws://127.0.0.1:1/")
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and "cannot connect" in err


def test_the_table_escapes_what_a_user_name_could_do_to_a_terminal() -> None:
    """Client text (a user name) is shown escaped: no escape sequence reaches the terminal."""
    from mqbroker.sessions import SessionRecord, SessionState

    record: Any = SessionRecord(id="s", user="evil\x1b[2J", state=SessionState.ACTIVE,
                                created=0.0, updated=0.0, expires=0.0, ttl=1.0)
    text = table([record])
    assert "\x1b" not in text and "evil\\x1b[2J" in text
