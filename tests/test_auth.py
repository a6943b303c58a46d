"""Authentication in `hello` and authorization per request ([auth], docs/security.md).

The matrix runs every operation for each kind of principal against a real broker over real
sockets, and checks, through an admin watching the topic and replaying its history, that
nothing forbidden was delivered or recorded.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import structlog
import structlog.testing
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from mqbroker.auth import (
    AuthFailed,
    Operation,
    Permissions,
    Principal,
    Rules,
    TokenAuthenticator,
    access_of,
    token_hash,
)
from mqbroker.client import connect
from mqbroker.config import (
    AuthConfig,
    Config,
    ConfigError,
    FanoutConfig,
    HistoryConfig,
    RoleConfig,
    ServerConfig,
    TokenConfig,
    load_config,
)
from mqbroker.protocol import (
    CloseCode,
    Delivery,
    Error,
    ErrorCode,
    Forget,
    Forgot,
    PubAck,
    Publish,
    ServerEvent,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
)
from mqbroker.topics import covers, matches
from tests.harness import RawSession, running_broker, session_of
from tests.redis_server import RedisServer

# --- covers: "filter A is covered by filter B" ------------------------------------------------

LEVELS = ("a", "b", "+", "#", "$s")
TOPIC_LEVELS = ("a", "b", "c", "", "$s")


def _filters() -> st.SearchStrategy[str]:
    def valid(levels: list[str]) -> bool:
        return all(level != "#" for level in levels[:-1]) and all(
            level != "$s" or index == 0 for index, level in enumerate(levels))
    return st.lists(st.sampled_from(LEVELS), min_size=1, max_size=3).filter(valid).map("/".join)


#: Every topic of up to 4 levels over a, b, c (a level no filter names), "" and a `$` level
#: first: long enough to witness any difference between filters of up to 3 levels.
ALL_TOPICS = [
    "/".join(levels)
    for size in range(1, 5)
    for levels in itertools.product(TOPIC_LEVELS, repeat=size)
    if all(level != "$s" or index == 0 for index, level in enumerate(levels))
]


@given(_filters(), _filters())
def test_covers_agrees_with_brute_force(wide: str, narrow: str) -> None:
    """`covers(wide, narrow)` holds exactly when every topic `narrow` matches, `wide` matches."""
    expected = all(matches(wide, topic) for topic in ALL_TOPICS if matches(narrow, topic))
    assert covers(wide, narrow) == expected


@pytest.mark.parametrize(("wide", "narrow", "covered"), [
    ("#", "a/#", True),
    ("a/#", "a", True),  # `#` matches its parent level
    ("a/+", "a/#", False),  # a/# matches `a`, and a/b/c
    ("a/+", "a/+", True),
    ("a/b", "a/+", False),
    ("+/b", "a/b", True),
    ("#", "$s/x", False),  # a leading wildcard never matches a `$` topic
    ("+/#", "#", True),  # found by the property: every topic has a first level
])
def test_covers_examples(wide: str, narrow: str, covered: bool) -> None:
    assert covers(wide, narrow) is covered


# --- the pure parts ---------------------------------------------------------------------------


def test_a_token_is_known_by_its_hash_only() -> None:
    principal = Principal(name="mcp-a", roles=("server",))
    authenticator = TokenAuthenticator({token_hash("secret-token-a"): principal})
    assert authenticator.check("secret-token-a") == principal
    with pytest.raises(AuthFailed, match="unknown token"):
        authenticator.check("secret-token-b")
    with pytest.raises(AuthFailed, match="no credential"):
        authenticator.check(None)


def test_substitutions_give_one_filter_per_session_and_none_without() -> None:
    rules = {"r": Rules(publish=("s/{session}/#", "u/{principal}"))}
    both = Permissions.of(Principal(name="p", roles=("r",), sessions=("1", "2")), rules)
    assert both.filters[Operation.PUBLISH] == ("s/1/#", "s/2/#", "u/p")
    none = Permissions.of(Principal(name="p", roles=("r",)), rules)
    assert none.filters[Operation.PUBLISH] == ("u/p",)
    assert not none.allows_topic(Operation.PUBLISH, "s/1/x")


def test_decisions_are_cached_within_a_bound() -> None:
    permissions = Permissions.of(Principal(name="p", roles=("r",)), {"r": Rules(publish=("#",))})
    for n in range(10_000):
        assert permissions.allows_topic(Operation.PUBLISH, f"t/{n}")
    assert len(permissions._cache) <= 4096


def test_config_errors_name_the_key(tmp_path: Any) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "token"\n[[auth.tokens]]\n'
                    f'sha256 = "{token_hash("x")}"\nprincipal = "a"\nroles = ["nope"]\n')
    with pytest.raises(ConfigError, match=r"auth\.tokens\[0\]\.roles\[0\]: unknown role 'nope'"):
        load_config(path)
    path.write_text('[auth.roles.r]\npublish = ["a/#/b"]\n')
    with pytest.raises(ConfigError, match=r"auth\.roles\.r\.publish\[0\]"):
        load_config(path)
    path.write_text('[[auth.tokens]]\nsha256 = "abc"\nprincipal = "a"\n')
    with pytest.raises(ConfigError, match=r"auth\.tokens\[0\]\.sha256: expected the SHA-256"):
        load_config(path)
    path.write_text(f'[[auth.tokens]]\nsha256 = "{token_hash("x")}"\nprincipal = "a/b"\n')
    with pytest.raises(ConfigError, match=r"auth\.tokens\[0\]\.principal"):
        load_config(path)


# --- the broker ------------------------------------------------------------------------------

OWN = "mcp/session/{session}/#"
ROLES = {
    # An MCP server instance: its own sessions' topics, and the broadcasts to read.
    "server": RoleConfig(publish=(OWN,), subscribe=(OWN, "mcp/broadcast/#"),
                         replay=(OWN,), forget=(OWN,)),
    # May announce and listen to broadcasts, nothing else.
    "broadcaster": RoleConfig(publish=("mcp/broadcast/#",), subscribe=("mcp/broadcast/#",)),
    "admin": RoleConfig(publish=("#",), subscribe=("#",), replay=("#",), forget=("#",)),
}
TOKENS = {"alice": "token-of-alice-0123", "bob": "token-of-bob-456789",
          "caster": "token-of-caster-0000", "admin": "token-of-admin-99999"}
PRINCIPALS = {
    "alice": TokenConfig(sha256=token_hash(TOKENS["alice"]), principal="alice",
                         roles=("server",), sessions=("s-alice",)),
    "bob": TokenConfig(sha256=token_hash(TOKENS["bob"]), principal="bob",
                       roles=("server",), sessions=("s-bob",)),
    "caster": TokenConfig(sha256=token_hash(TOKENS["caster"]), principal="caster",
                          roles=("broadcaster",)),
    "admin": TokenConfig(sha256=token_hash(TOKENS["admin"]), principal="admin",
                         roles=("admin",)),
}
ALICE_TOPIC = "mcp/session/s-alice/message"
BROADCAST = "mcp/broadcast/news"


def token_config() -> Config:
    return Config(server=ServerConfig(port=0),
                  auth=AuthConfig(mode="token", roles=ROLES, tokens=tuple(PRINCIPALS.values())))


async def answer_to(session: RawSession) -> ServerEvent:
    """The next event that is not a delivery."""
    while True:
        event = await session.next_event()
        if type(event) is not Delivery:
            return event


@pytest.mark.parametrize("auth", [None, "", "token-nobody-has-000"])
async def test_a_hello_without_a_valid_token_is_refused_with_4003(auth: str | None) -> None:
    async with running_broker(token_config()) as broker:
        async with session_of(broker.url, auth) as (session, answer):
            assert answer == Error(code=ErrorCode.UNAUTHORIZED, ref="hello", message=(
                "authentication failed: no credential" if not auth
                else "authentication failed: unknown token"))
            assert await session.closed_with() == CloseCode.UNAUTHORIZED
        assert broker.broker.counters["security_auth_failed"] == 1
        assert broker.broker.counters["sessions_opened"] == 0


async def test_the_welcome_says_the_principal() -> None:
    async with running_broker(token_config()) as broker:
        async with session_of(broker.url, TOKENS["alice"]) as (_, welcome):
            assert isinstance(welcome, Welcome)
            assert welcome.principal == "alice"


async def test_anonymous_mode_lets_everyone_do_everything() -> None:
    async with running_broker() as broker, session_of(broker.url, None) as (session, welcome):
        assert isinstance(welcome, Welcome) and welcome.principal is None
        await session.send(Subscribe(id=1, filter="#"), Publish(id=2, topic="x", payload=1))
        assert await answer_to(session) == SubAck(id=1)
        assert isinstance(await answer_to(session), PubAck)


#: (principal, topic) -> whether (subscribe, subscribe with since, publish, forget) are allowed.
MATRIX = [
    ("alice", ALICE_TOPIC, (True, True, True, True)),  # its own session's topics
    ("bob", ALICE_TOPIC, (False, False, False, False)),  # another principal's session
    ("caster", ALICE_TOPIC, (False, False, False, False)),
    ("caster", BROADCAST, (True, False, True, False)),  # broadcast only: no replay, no forget
    ("alice", BROADCAST, (True, False, False, False)),
    ("admin", ALICE_TOPIC, (True, True, True, True)),
    ("admin", BROADCAST, (True, True, True, True)),
]


@pytest.mark.parametrize(("who", "topic", "allowed"), MATRIX)
async def test_every_operation_is_allowed_or_forbidden_and_nothing_forbidden_happens(
        who: str, topic: str, allowed: tuple[bool, bool, bool, bool]) -> None:
    may_subscribe, may_replay, may_publish, may_forget = allowed
    async with (running_broker(token_config()) as broker,
                session_of(broker.url, TOKENS["admin"]) as (admin, _),
                session_of(broker.url, TOKENS[who]) as (session, welcome)):
        assert isinstance(welcome, Welcome) and welcome.principal == who
        # The admin publishes a first message (for `since`) and watches the topic.
        await admin.send(Publish(id=1, topic=topic, payload="first"))
        first = await answer_to(admin)
        assert isinstance(first, PubAck)
        await admin.send(Subscribe(id=2, filter=topic))
        assert await answer_to(admin) == SubAck(id=2)

        await session.send(Subscribe(id=1, filter=topic))
        assert (await answer_to(session) == SubAck(id=1)) is may_subscribe
        await session.send(Subscribe(id=2, filter=topic, since=first.event))
        replayed = await answer_to(session)
        assert (replayed == SubAck(id=2, recovered=True)) is may_replay
        if not may_replay:
            assert replayed == _forbidden(2, "subscribe", replayed)
        await session.send(Unsubscribe(id=1))
        unsubscribed = await answer_to(session)
        assert (unsubscribed == UnsubAck(id=1)) is may_subscribe  # else unknown_subscription

        await session.send(Publish(id=10, topic=topic, payload="single"))
        await session.send(Publish(id=11, topic=topic, payload="batch-1"),
                           Publish(id=12, topic=topic, payload="batch-2"),
                           Publish(id=13, topic="mcp/session/s-bob/message", payload="elsewhere"))
        for request in (10, 11, 12):
            answer = await answer_to(session)
            if may_publish:
                assert isinstance(answer, PubAck) and answer.id == request
            else:
                assert answer == _forbidden(request, "publish", answer)
        answer = await answer_to(session)  # bob's session: only the admin may
        assert isinstance(answer, PubAck) is (who in ("admin", "bob"))

        # Delivered: what the admin sees live. Recorded: what a replay from `first` gives.
        published = ["single", "batch-1", "batch-2"] if may_publish else []
        await admin.send(Publish(id=3, topic=topic, payload="last"))
        live = await payloads_until(
            admin, lambda e: type(e) is Delivery and e.payload == "last")
        assert live == [*published, "last"]
        await admin.send(Subscribe(id=4, filter=topic, since=first.event))
        replayed = await payloads_until(
            admin, lambda e: type(e) is Delivery and e.payload == "last", sub=4)
        assert replayed == [*published, "last"]

        await session.send(Forget(id=20, filter=topic))
        forgot = await answer_to(session)
        assert isinstance(forgot, Forgot) is may_forget
        if not may_forget:
            assert forgot == _forbidden(20, "forget", forgot)
            await admin.send(Subscribe(id=5, filter=topic, since=first.event))
            while not isinstance(event := await admin.next_event(), SubAck):
                # Still recorded: the forget was not done (a forgotten topic answers
                # recovered: false).
                assert type(event) is Delivery
            assert (event.id, event.recovered) == (5, True)
        # The session stays open whatever it was refused.
        await session.send(Subscribe(id=30, filter="mcp/session/s-alice/+"))
        still = await answer_to(session)
        assert still in (SubAck(id=30), _forbidden(30, "subscribe", still))
        assert (broker.broker.counters["security_forbidden"] == 0) is (who == "admin")


async def payloads_until(session: RawSession, last: Callable[[Any], bool],
                         sub: int | None = None) -> list[Any]:
    """The payloads delivered (to subscription `sub`, if given) up to the event `last`
    accepts (included)."""
    payloads = []
    while True:
        event = await session.next_event()
        if type(event) is Delivery and (sub is None or sub in event.subs):
            payloads.append(event.payload)
        if last(event):
            return payloads


def _forbidden(id: int, op: str, actual: Any) -> Error:
    """The `forbidden` error answering request `id` (its message compared as sent)."""
    message = actual.message if isinstance(actual, Error) else ""
    return Error(code=ErrorCode.FORBIDDEN, message=message, id=id, ref=op)


@pytest.mark.parametrize(("filter", "allowed"), [
    ("mcp/session/s-alice/+", True),
    ("mcp/session/s-alice/#", True),
    ("mcp/session/+/message", False),  # would match bob's session too
    ("mcp/#", False),
    ("#", False),
    ("mcp/broadcast/#", True),
])
async def test_a_wildcard_subscribe_needs_rights_over_every_topic_it_matches(
        filter: str, allowed: bool) -> None:
    async with (running_broker(token_config()) as broker,
                session_of(broker.url, TOKENS["alice"]) as (session, _)):
        await session.send(Subscribe(id=1, filter=filter))
        answer = await answer_to(session)
        assert (answer == SubAck(id=1)) is allowed
        if not allowed:
            assert isinstance(answer, Error) and answer.code == ErrorCode.FORBIDDEN


async def test_forbidden_publishes_without_id_get_one_error_and_are_dropped() -> None:
    async with (running_broker(token_config()) as broker,
                session_of(broker.url, TOKENS["admin"]) as (admin, _),
                session_of(broker.url, TOKENS["alice"]) as (session, _)):
        await admin.send(Subscribe(id=1, filter="#"))
        assert await answer_to(admin) == SubAck(id=1)
        await session.send(*(Publish(topic=BROADCAST, payload=n) for n in range(5)),
                           Publish(id=9, topic=ALICE_TOPIC, payload="ok"))
        error = await answer_to(session)
        assert isinstance(error, Error) and error.code == ErrorCode.FORBIDDEN and error.id is None
        assert isinstance(await answer_to(session), PubAck)
        delivered = await admin.next_event()
        assert type(delivered) is Delivery and delivered.payload == "ok"
        assert broker.broker.counters["security_forbidden"] == 5


async def test_the_clients_send_the_token() -> None:
    async with running_broker(token_config()) as broker:
        async with connect(broker.url, auth=TOKENS["alice"]) as client:
            await client.publish(ALICE_TOPIC, "hi")


async def test_a_refused_token_is_logged_as_auth_failed_without_the_token() -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_broker(token_config()) as broker:
            async with session_of(broker.url, "token-nobody-has-000") as (session, _):
                with pytest.raises(ConnectionClosed):
                    await session.ws.get_message()
    failed = [entry for entry in logs if entry["event"] == "security.auth_failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "unknown token"
    assert "token-nobody-has-000" not in repr(logs)


# --- JWT ---------------------------------------------------------------------------------------

SECRET = "a-shared-secret-of-at-least-32-characters"
AUDIENCE, ISSUER = "mqbroker", "https://issuer.example"


def jwt_config(tmp_path: Path, **keys: str) -> Config:
    if not keys:
        (tmp_path / "secret").write_text(SECRET + "\n")
        keys = {"jwt_secret_file": str(tmp_path / "secret")}
    return Config(server=ServerConfig(port=0), auth=AuthConfig(
        mode="jwt", roles=ROLES, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_leeway=5.0,
        **keys))


def claims(**changes: Any) -> dict[str, Any]:
    now = time.time()
    values: dict[str, Any] = {"sub": "alice", "roles": ["server"], "sessions": ["s-alice"],
                              "iss": ISSUER, "aud": AUDIENCE, "nbf": now - 1,
                              "exp": now + 600}
    values.update(changes)
    return {key: value for key, value in values.items() if value is not None}


def hs256(**changes: Any) -> str:
    return jwt.encode(claims(**changes), SECRET, algorithm="HS256")


@pytest.mark.parametrize(("token", "reason"), [
    (lambda: hs256(exp=time.time() - 60), "token expired"),
    (lambda: hs256(nbf=time.time() + 60), "token not yet valid"),
    (lambda: hs256(aud="another-service"), "token for another audience"),
    (lambda: hs256(iss="https://elsewhere.example"), "token from another issuer"),
    (lambda: hs256(exp=None), "invalid token (MissingRequiredClaimError)"),
    (lambda: jwt.encode(claims(), "x" * 40, algorithm="HS256"),
     "invalid token (InvalidSignatureError)"),
    (lambda: hs256(sub="a/#"), "claim 'sub' is not a name without / + # { } $ or spaces"),
    (lambda: "not-a-jwt-at-all", "invalid token (DecodeError)"),
])
async def test_a_jwt_that_is_not_valid_now_here_and_signed_is_refused(
        tmp_path: Path, token: Callable[[], str], reason: str) -> None:
    """Every operation is out of reach: the session never opens (nothing can be done)."""
    async with running_broker(jwt_config(tmp_path)) as broker:
        async with session_of(broker.url, token()) as (session, answer):
            assert answer == Error(code=ErrorCode.UNAUTHORIZED, ref="hello",
                                   message=f"authentication failed: {reason}")
            assert await session.closed_with() == CloseCode.UNAUTHORIZED
        assert broker.broker.counters["sessions_opened"] == 0


async def test_a_jwt_within_the_leeway_is_accepted(tmp_path: Path) -> None:
    async with (running_broker(jwt_config(tmp_path)) as broker,
                session_of(broker.url, hs256(exp=time.time() - 2)) as (_, welcome)):
        assert isinstance(welcome, Welcome) and welcome.principal == "alice"


async def test_a_jwt_gives_principal_roles_and_sessions(tmp_path: Path) -> None:
    async with (running_broker(jwt_config(tmp_path)) as broker,
                session_of(broker.url, hs256()) as (session, welcome)):
        assert isinstance(welcome, Welcome) and welcome.principal == "alice"
        await session.send(Publish(id=1, topic=ALICE_TOPIC, payload=1),
                           Publish(id=2, topic="mcp/session/s-bob/message", payload=2))
        assert isinstance(await answer_to(session), PubAck)
        refused = await answer_to(session)
        assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN


async def test_a_session_is_told_and_closed_when_its_jwt_expires(tmp_path: Path) -> None:
    config = jwt_config(tmp_path)
    config = attrs.evolve(config, auth=attrs.evolve(config.auth, jwt_leeway=0.0))
    async with (running_broker(config) as broker,
                session_of(broker.url, hs256(exp=time.time() + 1.5)) as (session, welcome)):
        assert isinstance(welcome, Welcome)
        with trio.fail_after(4):
            told = await session.next_event()
        assert told == Error(code=ErrorCode.UNAUTHORIZED, message="credential expired",
                             ref="hello")
        assert await session.closed_with() == CloseCode.UNAUTHORIZED


def _rsa_and_ec() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return (rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec.generate_private_key(ec.SECP256R1()))


async def test_rs256_with_a_pem_public_key_and_es256_with_a_jwks(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    rsa_key, ec_key = _rsa_and_ec()
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "public.pem").write_bytes(pem)
    async with (running_broker(jwt_config(tmp_path, jwt_public_key_file=str(
                    tmp_path / "public.pem"))) as broker,
                session_of(broker.url, jwt.encode(claims(), rsa_key, algorithm="RS256"))
                as (_, welcome)):
        assert isinstance(welcome, Welcome) and welcome.principal == "alice"
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    config = jwt_config(tmp_path, jwt_jwks_file=str(tmp_path / "jwks.json"))
    token = jwt.encode(claims(sub="bob"), ec_key, algorithm="ES256", headers={"kid": "k1"})
    async with (running_broker(config) as broker,
                session_of(broker.url, token) as (_, welcome)):
        assert isinstance(welcome, Welcome) and welcome.principal == "bob"
        # The public key is no HS256 secret: a token signed with it as one is refused.
        forged = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "k1"})
        async with session_of(broker.url, forged) as (_, answer):
            assert isinstance(answer, Error) and answer.code == ErrorCode.UNAUTHORIZED


def test_jwt_mode_needs_exactly_one_key_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "jwt"\n')
    with pytest.raises(ConfigError, match=r"auth\.jwt_secret_file: mode \"jwt\" needs exactly"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"auth\.jwt_secret_file: cannot read"):
        access_of(Config(auth=AuthConfig(mode="jwt",
                                      jwt_secret_file=str(tmp_path / "missing"))))


async def test_forbidden_requests_are_logged_once_per_window_and_counted() -> None:
    with structlog.testing.capture_logs() as logs:
        async with (running_broker(token_config()) as broker,
                    session_of(broker.url, TOKENS["caster"]) as (session, _)):
            await session.send(*(Publish(id=n, topic=ALICE_TOPIC, payload=n) for n in range(20)),
                               Forget(id=99, filter=BROADCAST))
            for _ in range(21):
                answer = await answer_to(session)
                assert isinstance(answer, Error) and answer.code == ErrorCode.FORBIDDEN
            assert broker.broker.counters["security_forbidden"] == 21
    forbidden = [entry for entry in logs if entry["event"] == "security.forbidden"]
    assert len(forbidden) == 1
    assert forbidden[0]["op"] == "publish" and forbidden[0]["topic"] == ALICE_TOPIC


async def test_publishes_with_the_redis_fanout_are_authorized_in_order(
        redis_server: RedisServer) -> None:
    """The pipelined publish path (a publishing task per session) answers in request order."""
    config = attrs.evolve(token_config(), history=HistoryConfig(plugin="redis"),
                          fanout=FanoutConfig(plugin="redis"),
                          plugins={"redis": {"url": redis_server.url, "key_prefix": "au:"}})
    async with (running_broker(config) as broker,
                session_of(broker.url, TOKENS["admin"]) as (admin, _),
                session_of(broker.url, TOKENS["alice"]) as (session, _)):
        await admin.send(Subscribe(id=1, filter="mcp/#"))
        assert await answer_to(admin) == SubAck(id=1)
        await session.send(Publish(id=1, topic=ALICE_TOPIC, payload=1),
                           Publish(id=2, topic=BROADCAST, payload=2),
                           Publish(id=3, topic=ALICE_TOPIC, payload=3))
        answers = [await answer_to(session) for _ in range(3)]
        assert [type(a).__name__ for a in answers] == ["PubAck", "Error", "PubAck"]
        assert [a.id for a in answers] == [1, 2, 3]  # type: ignore[union-attr]
        assert await payloads_until(admin, lambda e: type(e) is Delivery and e.payload == 3) == [
            1, 3]
