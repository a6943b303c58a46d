"""Refreshing a session's credential without reconnecting ([auth] modes jwt and token).

Against a real broker over real sockets: a refreshed session keeps its subscriptions past the
old expiry; a refresh that is not valid, or names another principal, closes that session (4003)
and no other; rights are recomputed (subscriptions no longer allowed end with `forbidden`);
the expiry watchdog follows the new credential. Then both clients, given a credential provider
of short-lived tokens, refresh by themselves and keep one session past several expiries.
Tokens live for seconds of real time (the broker compares them with the wall clock).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import msgpack
import pytest
import structlog.testing
import trio

from mqbroker.auth import MAX_CREDENTIAL_CHARS, Access, AuthFailed, access_of, token_hash
from mqbroker.client import ConnectError, CredentialError, Forbidden, Message, connect
from mqbroker.client import aio as aio_client
from mqbroker.client.core import ClientCore, Resolved, refresh_delay
from mqbroker.config import Config, LimitsConfig, TokenConfig
from mqbroker.protocol import (
    CloseCode,
    Delivery,
    Error,
    ErrorCode,
    Format,
    Ping,
    Pong,
    PubAck,
    Publish,
    Refresh,
    Refreshed,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
)
from mqbroker.protocol.codec import encode
from tests.harness import running_broker, tcp_proxy
from tests.test_auth import (
    ALICE_TOPIC,
    TOKENS,
    answer_to,
    hs256,
    jwt_config,
    session_of,
    token_config,
)
from tests.test_client_aio import BrokerThread

BOB_TOPIC = "mcp/session/s-bob/message"


def strict_jwt_config(tmp_path: Path, **limits: float) -> Config:
    """JWT mode without leeway: a credential expires exactly at its `exp`."""
    config = jwt_config(tmp_path)
    # A short grace: a raw test session never closes its socket after the broker's close, and
    # the broker waits that long for it before it lets the connection go.
    return attrs.evolve(config, auth=attrs.evolve(config.auth, jwt_leeway=0.0),
                        server=attrs.evolve(config.server, shutdown_grace=0.5),
                        limits=LimitsConfig(**limits))


def admin_token() -> str:
    return hs256(sub="admin", roles=["admin"], sessions=[])


def bob_token() -> str:
    return hs256(sub="bob", sessions=["s-bob"])


# --- the pure rules ------------------------------------------------------------------------------


async def test_a_refresh_must_name_the_same_principal_and_may_change_its_rights() -> None:
    config = token_config()
    access = access_of(config)
    alice = await access.authenticate(TOKENS["alice"])
    assert access.refreshed(alice, await access.authenticate(TOKENS["alice"])) == alice
    with pytest.raises(AuthFailed, match="credential for another principal"):
        access.refreshed(alice, await access.authenticate(TOKENS["bob"]))
    with pytest.raises(AuthFailed, match="unknown token"):
        await access.authenticate("not-a-token-anyone-has")
    with pytest.raises(AuthFailed, match=f"longer than {MAX_CREDENTIAL_CHARS}"):
        await access.authenticate("x" * (MAX_CREDENTIAL_CHARS + 1))
    assert access.refreshable and not Access.anyone().refreshable


def test_refreshes_come_at_three_quarters_of_the_ttl_and_never_in_a_tight_loop() -> None:
    assert refresh_delay(600.0) == 450.0
    assert refresh_delay(0.1) == 1.0  # about to expire: at most one try a second


def test_the_core_settles_a_refresh_with_its_ttl_and_never_resends_one() -> None:
    core = ClientCore(auth="first")
    core.open_connection()
    core.receive(encode(Welcome(version=1, instance="i", session="s", ttl=60.0), Format.MSGPACK))
    assert core.ttl == 60.0
    event = core.refresh("second")
    assert core.auth == "second" and core.pending == {("refresh", event.id): event}
    assert core.receive(encode(Refreshed(id=event.id, ttl=90.0), Format.MSGPACK)) == [
        Resolved(("refresh", event.id), 90.0)]
    unanswered = core.refresh("third")
    core.open_connection()
    events, outcomes = core.resume()
    # The new hello carried the current credential: the refresh is settled, not resent.
    assert events == [] and outcomes == [Resolved(("refresh", unanswered.id), None)]
    assert "third" not in repr(core) and "third" not in repr(unanswered)


# --- the broker ----------------------------------------------------------------------------------


async def test_a_refreshed_session_keeps_receiving_past_the_old_expiry(tmp_path: Path) -> None:
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                session_of(broker.url, admin_token()) as (admin, _),
                session_of(broker.url, hs256(exp=time.time() + 2)) as (alice, welcome)):
        assert isinstance(welcome, Welcome) and welcome.ttl is not None
        assert 0 < welcome.ttl <= 2
        await alice.send(Subscribe(id=1, filter=ALICE_TOPIC))
        assert await answer_to(alice) == SubAck(id=1)
        await alice.send(Refresh(id=2, auth=hs256(exp=time.time() + 600)))
        refreshed = await answer_to(alice)
        assert isinstance(refreshed, Refreshed) and refreshed.id == 2
        assert refreshed.ttl is not None and 590 < refreshed.ttl <= 600
        await trio.sleep(3)  # past the first credential's expiry, and a watchdog round
        await admin.send(Publish(id=1, topic=ALICE_TOPIC, payload="after"))
        delivered = await alice.next_event()
        assert type(delivered) is Delivery and delivered.payload == "after"
        assert broker.broker.counters["sessions_closed"] == 0


async def test_the_watchdog_follows_the_new_expiry(tmp_path: Path) -> None:
    """A refresh to a credential that expires sooner: the session closes at the new expiry."""
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                session_of(broker.url, hs256()) as (alice, _)):
        await alice.send(Refresh(id=1, auth=hs256(exp=time.time() + 1.5)))
        refreshed = await answer_to(alice)
        assert isinstance(refreshed, Refreshed) and refreshed.ttl is not None
        assert refreshed.ttl <= 1.5
        with trio.fail_after(4):
            told = await alice.next_event()
        assert told == Error(code=ErrorCode.UNAUTHORIZED, message="credential expired",
                             ref="hello")
        assert await alice.closed_with() == CloseCode.UNAUTHORIZED


#: (what, the refresh's credential, the reason the error gives)
BAD_REFRESHES: list[tuple[str, Callable[[], str], str]] = [
    ("another principal", bob_token, "credential for another principal"),
    ("expired", lambda: hs256(exp=time.time() - 60), "token expired"),
    ("another audience", lambda: hs256(aud="elsewhere"), "token for another audience"),
    ("forged", lambda: hs256()[:-4] + "AAAA", "invalid token (InvalidSignatureError)"),
    ("garbage", lambda: "garbage\u0000\u00e9-not-a-jwt", "invalid token (DecodeError)"),
    ("empty", lambda: "", "no credential"),
    ("huge", lambda: "x" * 500_000, f"credential longer than {MAX_CREDENTIAL_CHARS} characters"),
]


@pytest.mark.parametrize(("what", "credential", "reason"), BAD_REFRESHES,
                         ids=[what for what, _, _ in BAD_REFRESHES])
async def test_a_refresh_that_is_not_valid_closes_that_session_only(
        tmp_path: Path, what: str, credential: Callable[[], str], reason: str) -> None:
    token = credential()
    with structlog.testing.capture_logs() as logs:
        async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                    session_of(broker.url, admin_token()) as (admin, _),
                    session_of(broker.url, bob_token()) as (bob, _),
                    session_of(broker.url, hs256()) as (alice, _)):
            await bob.send(Subscribe(id=1, filter=BOB_TOPIC))
            assert await answer_to(bob) == SubAck(id=1)
            # What follows the refused refresh in its frame is not done.
            await alice.send(Refresh(id=7, auth=token),
                             Publish(id=8, topic=ALICE_TOPIC, payload="after"))
            assert await alice.next_event() == Error(
                code=ErrorCode.UNAUTHORIZED, id=7, ref="refresh",
                message=f"refresh failed: {reason}")
            assert await alice.closed_with() == CloseCode.UNAUTHORIZED
            # The bystander saw nothing, and is served as before.
            await admin.send(Publish(id=1, topic=BOB_TOPIC, payload="for bob"))
            assert isinstance(await answer_to(admin), PubAck)
            delivered = await bob.next_event()
            assert type(delivered) is Delivery and delivered.payload == "for bob"
            await bob.send(Ping(id=2))
            assert await bob.next_event() == Pong(id=2)
            assert broker.broker.counters["security_auth_failed"] == 1
            assert broker.broker.counters["published"] == 1
    failed = [entry for entry in logs if entry["event"] == "security.auth_failed"]
    assert [(entry["reason"], entry["op"]) for entry in failed] == [(reason, "refresh")]
    if token:
        assert token[:200] not in repr(logs)


async def test_a_refresh_of_the_wrong_type_is_a_bad_event(tmp_path: Path) -> None:
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                session_of(broker.url, hs256()) as (alice, _)):
        for auth in (5, None, ["a", "list"], {"a": "map"}):
            await alice.send_frame(msgpack.packb({"op": "refresh", "id": 3, "auth": auth}))
            answer = await alice.next_event()
            assert isinstance(answer, Error) and answer.code == ErrorCode.BAD_EVENT
            assert answer.id == 3 and answer.ref == "refresh"
        await alice.send(Ping(id=4))
        assert await alice.next_event() == Pong(id=4)
        assert broker.broker.counters["security_auth_failed"] == 0


async def test_in_anonymous_mode_a_refresh_is_unsupported_and_the_session_stays() -> None:
    async with running_broker() as broker, session_of(broker.url, None) as (session, welcome):
        assert isinstance(welcome, Welcome) and welcome.ttl is None
        await session.send(Refresh(id=1, auth=TOKENS["alice"]), Ping(id=2))
        refused = await session.next_event()
        assert isinstance(refused, Error) and refused.code == ErrorCode.REFRESH_UNSUPPORTED
        assert (refused.id, refused.ref) == (1, "refresh")
        assert await session.next_event() == Pong(id=2)


async def test_a_static_token_refreshes_to_another_token_of_the_same_principal() -> None:
    """Mode token: nothing expires (no ttl anywhere), but a token can be rotated in place."""
    config = token_config()
    config = attrs.evolve(config, server=attrs.evolve(config.server, shutdown_grace=0.5))
    second = "second-token-of-alice"
    rotated = TokenConfig(sha256=token_hash(second), principal="alice", roles=("server",),
                          sessions=("s-alice",))
    config = attrs.evolve(config, auth=attrs.evolve(
        config.auth, tokens=(*config.auth.tokens, rotated)))
    async with running_broker(config) as broker:
        async with session_of(broker.url, TOKENS["alice"]) as (alice, welcome):
            assert isinstance(welcome, Welcome) and welcome.ttl is None
            await alice.send(Refresh(id=1, auth=second))
            assert await alice.next_event() == Refreshed(id=1)
            await alice.send(Refresh(id=2, auth=TOKENS["bob"]))
            answer = await alice.next_event()
            assert isinstance(answer, Error) and answer.code == ErrorCode.UNAUTHORIZED
            assert await alice.closed_with() == CloseCode.UNAUTHORIZED


async def test_a_refresh_recomputes_the_rights_and_ends_subscriptions_no_longer_allowed(
        tmp_path: Path) -> None:
    two = "mcp/session/s-two/message"
    three = "mcp/session/s-three/message"
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                session_of(broker.url, admin_token()) as (admin, _),
                session_of(broker.url, hs256(sessions=["s-alice", "s-two"])) as (alice, _)):
        await alice.send(Subscribe(id=1, filter=ALICE_TOPIC),
                         Subscribe(id=2, filter="mcp/session/s-two/#"),
                         Subscribe(id=3, filter="mcp/broadcast/#"))
        assert [await answer_to(alice) for _ in range(3)] == [SubAck(id=n) for n in (1, 2, 3)]
        await admin.send(Publish(id=1, topic=two, payload="before"))
        before = await alice.next_event()
        assert type(before) is Delivery and before.subs == (2,)

        await alice.send(Refresh(id=4, auth=hs256(sessions=["s-alice", "s-three"])))
        refreshed = await alice.next_event()
        assert isinstance(refreshed, Refreshed) and refreshed.id == 4
        ended = await alice.next_event()
        assert isinstance(ended, Error) and ended.code == ErrorCode.FORBIDDEN
        assert (ended.id, ended.ref) == (2, "subscribe") and "s-two" in ended.message

        # Subscription 2 is gone (and only it); s-three is now the principal's.
        await admin.send(Publish(id=2, topic=two, payload="lost"),
                         Publish(id=3, topic=ALICE_TOPIC, payload="kept"))
        kept = await alice.next_event()
        assert type(kept) is Delivery and kept.payload == "kept" and kept.subs == (1,)
        await alice.send(Unsubscribe(id=2), Publish(id=5, topic=three, payload="new right"),
                         Publish(id=6, topic=two, payload="old right"))
        gone = await alice.next_event()
        assert isinstance(gone, Error) and gone.code == ErrorCode.UNKNOWN_SUBSCRIPTION
        assert isinstance(await alice.next_event(), PubAck)
        refused = await alice.next_event()
        assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
        await alice.send(Unsubscribe(id=3))
        assert await alice.next_event() == UnsubAck(id=3)


async def test_refreshes_count_against_the_request_rate_limit(tmp_path: Path) -> None:
    config = strict_jwt_config(tmp_path, requests_per_second=1.0, requests_burst=1.0)
    async with (running_broker(config) as broker,
                session_of(broker.url, hs256()) as (alice, _)):
        await alice.send(Refresh(id=1, auth=hs256()), Refresh(id=2, auth=hs256()))
        assert isinstance(await alice.next_event(), Refreshed)
        limited = await alice.next_event()
        assert isinstance(limited, Error) and limited.code == ErrorCode.RATE_LIMITED
        assert (limited.id, limited.ref) == (2, "refresh")
        await alice.send(Ping(id=3))
        assert await alice.next_event() == Pong(id=3)


# --- the clients ---------------------------------------------------------------------------------


@attrs.define
class ShortLivedTokens:
    """A credential provider: a fresh JWT for `principal` living `lifetime` seconds per call."""

    lifetime: float
    calls: int = 0
    fail: bool = False

    async def __call__(self) -> str:
        self.calls += 1
        if self.fail:
            raise RuntimeError("the identity provider is down")
        return hs256(exp=time.time() + self.lifetime)


#: Tokens of 2 s: refreshed at 1.5 s, so a session lives on for 5 s through three refreshes.
LIFETIME, OUTLIVE = 2.0, 5.0


async def test_the_trio_client_refreshes_by_itself_and_keeps_its_session(
        tmp_path: Path) -> None:
    tokens = ShortLivedTokens(LIFETIME)
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                connect(broker.url, auth=admin_token()) as admin,
                connect(broker.url, auth=tokens) as alice):
        subscription = await alice.subscribe(ALICE_TOPIC)
        await trio.sleep(OUTLIVE)
        await admin.publish(ALICE_TOPIC, "still here")
        with trio.fail_after(5):
            message = await anext(aiter(subscription))
        assert isinstance(message, Message) and message.payload == "still here"
        assert tokens.calls >= 4  # the hello's, then one refresh every 1.5 s
        assert broker.broker.counters["sessions_opened"] == 2  # never reconnected
        assert broker.broker.counters["sessions_closed_unauthorized"] == 0


def test_the_asyncio_client_refreshes_by_itself_and_keeps_its_session(tmp_path: Path) -> None:
    tokens = ShortLivedTokens(LIFETIME)
    broker = BrokerThread(config=strict_jwt_config(tmp_path))
    broker.start()
    try:
        async def scenario() -> None:
            async with (aio_client.connect(broker.url, auth=admin_token()) as admin,
                        aio_client.connect(broker.url, auth=tokens) as alice):
                subscription = await alice.subscribe(ALICE_TOPIC)
                await asyncio.sleep(OUTLIVE)
                await admin.publish(ALICE_TOPIC, "still here")
                async with asyncio.timeout(5):
                    message = await anext(aiter(subscription))
                assert isinstance(message, Message) and message.payload == "still here"

        asyncio.run(scenario())
        assert tokens.calls >= 4
        assert broker.broker is not None
        assert broker.broker.counters["sessions_opened"] == 2
        assert broker.broker.counters["sessions_closed_unauthorized"] == 0
    finally:
        broker.stop()


async def test_the_provider_gives_the_credential_of_every_connection(tmp_path: Path) -> None:
    tokens = ShortLivedTokens(600)
    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                tcp_proxy(broker.listener.port) as proxy,
                connect(f"ws://127.0.0.1:{proxy.port}/", auth=tokens) as alice):
        assert tokens.calls == 1
        await proxy.cut()
        with trio.fail_after(10):  # waits for the new connection (resent there)
            await alice.publish(ALICE_TOPIC, "on the new connection")
        assert tokens.calls == 2
        assert broker.broker.counters["sessions_opened"] == 2


async def test_a_failing_provider_fails_the_connection_attempt(tmp_path: Path) -> None:
    tokens = ShortLivedTokens(600, fail=True)
    async with running_broker(strict_jwt_config(tmp_path)) as broker:
        with pytest.raises(ConnectError) as raised:
            async with connect(broker.url, auth=tokens):
                pass
        assert isinstance(raised.value.__cause__, CredentialError)
        assert broker.broker.counters["sessions_opened"] == 0
        with pytest.raises(ConnectError, match="must be an async callable"):
            async with connect(broker.url, auth=lambda: "a-sync-provider"):  # type: ignore[arg-type,return-value]
                pass


async def test_a_subscription_ended_by_a_refresh_raises_forbidden_in_the_client(
        tmp_path: Path) -> None:
    sessions = [["s-alice", "s-two"], ["s-alice"]]

    async def narrowing() -> str:
        return hs256(exp=time.time() + 2, sessions=sessions.pop(0) if sessions else ["s-alice"])

    async with (running_broker(strict_jwt_config(tmp_path)) as broker,
                connect(broker.url, auth=narrowing) as alice):
        kept = await alice.subscribe(ALICE_TOPIC)
        lost = await alice.subscribe("mcp/session/s-two/message")
        with trio.fail_after(5), pytest.raises(Forbidden, match="s-two"):
            await anext(aiter(lost))
        await alice.publish(ALICE_TOPIC, "kept")
        with trio.fail_after(5):
            message = await anext(aiter(kept))
        assert isinstance(message, Message) and message.payload == "kept"
