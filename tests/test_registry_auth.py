"""The registry with [auth]: `user` defaults to the principal, another user needs the role key
`sessions = "any"`, and `sessions = "none"` refuses every registry request (`forbidden`, the
session stays open). Real broker, real sockets, static tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mqbroker.auth import Permissions, Principal, Rules, token_hash
from mqbroker.config import AuthConfig, Config, RoleConfig, ServerConfig, TokenConfig
from mqbroker.protocol import (
    Error,
    Ping,
    Pong,
    SessionCreate,
    SessionDelete,
    SessionGet,
    SessionList,
    SessionReply,
    SessionTouch,
    SessionUpdate,
)
from tests.harness import RawSession, running_broker
from tests.test_auth import session_of
from tests.test_registry_protocol import answer, only

ROLES = {
    "server": RoleConfig(),  # sessions = "own", the default
    "operator": RoleConfig(sessions="any"),
    "nobody": RoleConfig(sessions="none"),
}
TOKENS = {"alice": "token-of-alice-0123", "bob": "token-of-bob-456789",
          "ops": "token-of-operator-000", "eve": "token-of-eve-0000000",
          "bare": "token-of-bare-00000"}
ROLES_OF = {"alice": ("server",), "bob": ("server",), "ops": ("server", "operator"),
            "eve": ("nobody",), "bare": ()}


def auth_config() -> Config:
    tokens = tuple(TokenConfig(sha256=token_hash(TOKENS[name]), principal=name, roles=roles)
                   for name, roles in ROLES_OF.items())
    return Config(server=ServerConfig(port=0),
                  auth=AuthConfig(mode="token", roles=ROLES, tokens=tokens))


@asynccontextmanager
async def principals(*names: str) -> AsyncIterator[list[RawSession]]:
    async with running_broker(auth_config()) as broker:
        sessions = []
        async with session_of(broker.url, TOKENS[names[0]]) as (first, _):
            sessions.append(first)
            if len(names) == 1:
                yield sessions
                return
            async with session_of(broker.url, TOKENS[names[1]]) as (second, _):
                sessions.append(second)
                yield sessions


def forbidden(reply: Any, id: int, op: str) -> bool:
    return isinstance(reply, Error) and (reply.code, reply.id, reply.ref) == (
        "forbidden", id, op)


def test_the_widest_role_gives_the_sessions_right() -> None:
    """none < own < any across a principal's roles; no role at all gives none."""
    roles = {"a": Rules(sessions="own"), "b": Rules(sessions="any"), "c": Rules(sessions="none")}
    assert Permissions.of(Principal(name="p", roles=("a", "c")), roles).sessions == "own"
    assert Permissions.of(Principal(name="p", roles=("c", "b", "a")), roles).sessions == "any"
    assert Permissions.of(Principal(name="p"), roles).sessions == "none"
    assert Permissions.all().sessions == "any"


async def test_user_defaults_to_the_principal_and_scopes_every_lookup() -> None:
    """Alice's session is created for alice without naming her; Bob, asking by its id without
    a user, does not find it (null, not found), and cannot touch, update or delete it."""
    async with principals("alice", "bob") as (alice, bob):
        record = only(await answer(alice, SessionCreate(id=1, session="s-a")))
        assert record["user"] == "alice"
        reply = await answer(bob, SessionGet(id=2, sessions=("s-a",)))
        assert isinstance(reply, SessionReply) and reply.sessions == (None,)
        touched = await answer(bob, SessionTouch(id=3, sessions=("s-a",)))
        assert isinstance(touched, SessionReply) and touched.sessions == (None,)
        for n, request in enumerate([SessionUpdate(id=0, session="s-a", state="active"),
                                     SessionDelete(id=0, session="s-a")], start=4):
            refused = await answer(bob, type(request)(**{**_fields(request), "id": n}))
            assert isinstance(refused, Error) and refused.code == "session_not_found"
        listed = await answer(bob, SessionList(id=9))
        assert isinstance(listed, SessionReply) and listed.sessions == ()
        mine = await answer(alice, SessionList(id=10))
        assert isinstance(mine, SessionReply) and [r["id"] for r in mine.sessions] == ["s-a"]


def _fields(request: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(request)


@pytest.mark.parametrize("request_", [
    SessionCreate(id=1, user="alice"), SessionGet(id=1, sessions=("s",), user="alice"),
    SessionTouch(id=1, sessions=("s",), user="alice"),
    SessionUpdate(id=1, session="s", user="alice", state="active"),
    SessionDelete(id=1, session="s", user="alice"), SessionList(id=1, user="alice"),
    SessionList(id=1, user="*"),
], ids=lambda r: f"{r.OP}-{r.user}")
async def test_naming_another_user_needs_the_any_right(request_: Any) -> None:
    """With sessions = "own", naming another user (or "*" on list) is `forbidden`, counted,
    and the session stays open."""
    async with running_broker(auth_config()) as broker, \
            session_of(broker.url, TOKENS["bob"]) as (bob, _):
        assert forbidden(await answer(bob, request_), 1, request_.OP)
        assert await answer(bob, Ping(id=2)) == Pong(id=2)
        assert broker.broker.counters["security_forbidden"] == 1


async def test_an_operator_with_any_sees_and_changes_every_users_sessions() -> None:
    """sessions = "any": create for another user, get, update, list every user ("*") and
    delete someone else's session; without `user` it still means its own."""
    async with principals("ops", "alice") as (ops, alice):
        only(await answer(alice, SessionCreate(id=1, session="s-a")))
        made = only(await answer(ops, SessionCreate(id=1, session="s-b", user="bob")))
        assert made["user"] == "bob"
        assert only(await answer(ops, SessionGet(id=2, sessions=("s-a",), user="alice")))
        own = await answer(ops, SessionGet(id=3, sessions=("s-a",)))
        assert isinstance(own, SessionReply) and own.sessions == (None,)
        every = await answer(ops, SessionList(id=4, user="*"))
        assert isinstance(every, SessionReply)
        assert [(r["id"], r["user"]) for r in every.sessions] == [("s-a", "alice"),
                                                                  ("s-b", "bob")]
        assert only(await answer(ops, SessionUpdate(id=5, session="s-a", user="alice",
                                                    state="active")))["state"] == "active"
        assert only(await answer(ops, SessionDelete(id=6, session="s-a", user="alice")))


@pytest.mark.parametrize("who", ["eve", "bare"])
async def test_the_none_right_or_no_role_refuses_every_registry_request(who: str) -> None:
    """sessions = "none" (or a principal without roles) is `forbidden` for every op, even on
    its own sessions."""
    async with principals(who) as (session,):
        for n, request in enumerate([
                SessionCreate(id=0), SessionGet(id=0, sessions=("s",)),
                SessionTouch(id=0, sessions=("s",)), SessionUpdate(id=0, session="s",
                                                                   state="active"),
                SessionDelete(id=0, session="s"), SessionList(id=0)], start=1):
            request = type(request)(**{**_fields(request), "id": n})
            assert forbidden(await answer(session, request), n, request.OP)
