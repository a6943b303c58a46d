"""Authenticator plugins ([auth] mode = "NAME", the `mqbroker.plugins` entry point group).

The example plugin (examples/hmac_auth) runs in a broker process that finds it as an installed
distribution; a misbehaving plugin (tests/faulty_auth.py, registered the same way) shows that a
plugin which raises, hangs or returns nonsense never crashes the broker, never hangs the hello
beyond `authenticate_timeout`, and never delays another session's hello.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

from mqbroker.auth import AuthFailed, Principal, checked_principal
from mqbroker.broker import open_broker
from mqbroker.cli import main
from mqbroker.config import AuthConfig, Config, ConfigError, RoleConfig, ServerConfig
from mqbroker.plugins import PluginError
from mqbroker.protocol import (
    CloseCode,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    Welcome,
)
from tests import faulty_auth
from tests.daemon import running_daemon
from tests.entry_points import register_plugin
from tests.harness import running_broker, session_of
from tests.monitor import wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hmac_auth"


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The `faulty` plugin, installed as an entry point for this test."""
    monkeypatch.syspath_prepend(str(register_plugin(tmp_path / "site", "faulty",
                                                    "tests.faulty_auth:plugin")))
    faulty_auth.opened.clear()
    yield


@pytest.fixture
def hmac_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin installed in this process; returns the folder on sys.path."""
    site = register_plugin(tmp_path / "site", "hmac", "mqbroker_hmac_auth:plugin")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    return site


def faulty_config(timeout: float = 1.0) -> Config:
    return Config(server=ServerConfig(port=0), auth=AuthConfig(
        mode="faulty", authenticate_timeout=timeout,
        roles={"user": RoleConfig(publish=["user/{principal}/#"])}))


# --- The example plugin, installed, in a broker process ----------------------------------------


def write_secret(directory: Path) -> tuple[str, Path]:
    secret = secrets.token_urlsafe(32)
    path = directory / "hmac.secret"
    path.write_text(secret + "\n", encoding="utf-8")
    return secret, path


def hmac_config_file(directory: Path, secret_file: Path) -> Path:
    path = directory / "config.toml"
    path.write_text(f"""\
[auth]
mode = "hmac"
[auth.roles.user]
publish = ["mcp/session/{{session}}/#"]
[plugins.hmac]
secret_file = "{secret_file}"
""", encoding="utf-8")
    return path


async def test_the_example_plugin_installed_as_a_distribution_authenticates(
        tmp_path: Path) -> None:
    """A broker process with the example on its path (as `pip install examples/hmac_auth`
    would put it) picks it by `[auth] mode = "hmac"`: a credential it signed opens a session
    with the claims' principal and rights; a forged, expired or missing one is refused with
    `unauthorized` and 4003, logged without the credential."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import mqbroker_hmac_auth as example
    finally:
        sys.path.remove(str(EXAMPLE))
    secret, secret_file = write_secret(tmp_path)
    site = register_plugin(tmp_path / "site", "hmac", "mqbroker_hmac_auth:plugin")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(EXAMPLE)])}
    good = example.issue(secret, "alice", roles=["user"], sessions=["s1"])
    forged = example.issue("x" * 40, "alice", roles=["user"], sessions=["s1"])
    expired = example.issue(secret, "alice", roles=["user"], lifetime=-120)
    async with running_daemon(hmac_config_file(tmp_path, secret_file), env=env) as daemon:
        async with session_of(daemon.url, good) as (session, welcome):
            assert isinstance(welcome, Welcome) and welcome.principal == "alice"
            await session.send(Publish(id=1, topic="mcp/session/s1/message", payload=1),
                               Publish(id=2, topic="mcp/session/s2/message", payload=2))
            answers = [await session.next_event(), await session.next_event()]
            assert isinstance(answers[0], PubAck)
            assert isinstance(answers[1], Error) and answers[1].code == ErrorCode.FORBIDDEN
        for credential, reason in [(forged, "bad signature"), (expired, "credential expired"),
                                   (None, "no credential"), ("v1.e30.AAAA", "bad signature")]:
            async with session_of(daemon.url, credential) as (session, answer):
                assert answer == Error(code=ErrorCode.UNAUTHORIZED, ref="hello",
                                       message=f"authentication failed: {reason}")
                assert await session.closed_with() == CloseCode.UNAUTHORIZED
        await wait_until(lambda: sum(line.get("event") == "security.auth_failed"
                                     for line in daemon.lines) == 4, seconds=5)
    [started] = [line for line in daemon.lines if line.get("event") == "broker.started"]
    assert started["auth"] == "hmac"
    logged = "\n".join(str(line) for line in daemon.lines)
    assert good not in logged and forged not in logged and expired not in logged
    assert not [line for line in daemon.lines if line.get("event") is None]  # no traceback


def test_the_example_signs_and_checks(hmac_example: Path) -> None:
    """The example's credentials: what it issues it accepts until `exp` (plus the leeway), and
    a changed claim breaks the signature. Without an event loop: it never waits."""
    import mqbroker_hmac_auth as example

    authenticator = example.HmacAuthenticator(secret="s" * 32, leeway=0)
    credential = example.issue("s" * 32, "bob", roles=["r"], sessions=["a"], now=time.time())
    principal = _run(authenticator.authenticate(credential))
    assert principal == Principal(name="bob", roles=("r",), sessions=("a",))
    version, claims, signature = credential.split(".")
    tampered = ".".join([version, claims[:-2] + ("AA" if claims[-2:] != "AA" else "BB"),
                         signature])
    for bad in [tampered, "v2." + claims + "." + signature, "garbage", ""]:
        with pytest.raises(AuthFailed):
            _run(authenticator.authenticate(bad))
    slash = example.issue("s" * 32, "bob/#", now=time.time())
    with pytest.raises(AuthFailed, match="a name holds"):
        _run(authenticator.authenticate(slash))


def _run(coroutine: Any) -> Any:
    """Run a coroutine that never waits, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")


def test_check_config_validates_the_plugins_settings(
        hmac_example: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`[plugins.hmac]` is the plugin's own settings class, checked at start like the rest."""
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "hmac"\n', encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{path}: plugins.hmac.secret_file: expected a file holding a secret of at least 32 "
        "characters, got '' (str)\n")
    _, secret_file = write_secret(tmp_path)
    assert main(["check-config", str(hmac_config_file(tmp_path, secret_file))]) == 0


# --- A mode naming no plugin --------------------------------------------------------------------


def test_a_mode_naming_nothing_installed_fails_at_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` and `check-config` both stop (exit 2) naming the file, the key, what is
    installed and the built-in modes; no traceback."""
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "ldap"\n', encoding="utf-8")
    for command in (["check-config", str(path)], ["serve", "--config", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{path}: auth.mode: no plugin named 'ldap' is installed "
                              "(installed: ")
        installed = err.split("(installed: ")[1].split(")")[0].split(", ")
        assert {"memory", "redis"} <= set(installed)
        assert err.endswith("; the built-in modes are anonymous, token, jwt, mtls\n")


def test_a_mode_naming_a_plugin_without_an_authenticator_fails_at_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "memory"\n', encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{path}: auth.mode: plugin 'memory' provides no authenticator\n")


async def test_open_broker_refuses_a_mode_naming_nothing_installed() -> None:
    """Embedding the broker without the command line: the same refusal, as PluginError."""
    with pytest.raises(PluginError, match="no plugin named 'ldap' is installed"):
        async with open_broker(Config(auth=AuthConfig(mode="ldap")), "x"):
            pass  # pragma: no cover


def test_authenticate_timeout_must_be_below_hello_timeout(tmp_path: Path) -> None:
    from mqbroker.config import load_config

    path = tmp_path / "config.toml"
    path.write_text("[server]\nhello_timeout = 3\n", encoding="utf-8")
    load_config(path)  # the built-in modes never wait: the default 5 s does not apply
    path.write_text("[server]\nhello_timeout = 3\n[auth]\nmode = 'faulty'\n"
                    "authenticate_timeout = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: auth.authenticate_timeout: expected a finite number of seconds greater "
        "than 0, less than server.hello_timeout (3.0), got 3.0 (float)")


# --- A misbehaving plugin -----------------------------------------------------------------------


async def test_a_plugin_credential_is_accepted_or_refused(faulty: None) -> None:
    async with running_broker(faulty_config()) as broker:
        async with session_of(broker.url, "ok:alice") as (session, welcome):
            assert isinstance(welcome, Welcome) and welcome.principal == "alice"
            await session.send(Publish(id=1, topic="user/alice/x", payload=1),
                               Publish(id=2, topic="user/bob/x", payload=1))
            first, second = await session.next_event(), await session.next_event()
            assert isinstance(first, PubAck)
            assert isinstance(second, Error) and second.code == ErrorCode.FORBIDDEN
        async with session_of(broker.url, "who?") as (session, answer):
            assert answer == Error(code=ErrorCode.UNAUTHORIZED, ref="hello",
                                   message="authentication failed: unknown credential")
            assert await session.closed_with() == CloseCode.UNAUTHORIZED


async def test_a_plugin_that_raises_gets_internal_and_the_broker_carries_on(
        faulty: None) -> None:
    """An exception from the plugin (not AuthFailed) answers the hello `internal` and closes it
    with 1011; it is logged as security.auth_error with the exception's type and its message,
    the credential masked; the next session is served as usual."""
    credential = "raise-" + secrets.token_hex(16)
    with structlog.testing.capture_logs() as logs:
        async with running_broker(faulty_config()) as broker:
            async with session_of(broker.url, credential) as (session, answer):
                assert answer == Error(code=ErrorCode.INTERNAL, ref="hello",
                                       message="authentication failed unexpectedly")
                assert await session.closed_with() == CloseCode.INTERNAL_ERROR
            async with session_of(broker.url, "ok:alice") as (_, welcome):
                assert isinstance(welcome, Welcome)
            counters = broker.broker.counters
    assert counters["security_auth_errors"] == 1 and counters["sessions_opened"] == 1
    [logged] = [line for line in logs if line["event"] == "security.auth_error"]
    assert logged["error"] == "RuntimeError"
    assert logged["message"] == "the backend refused [credential] with a 500"
    assert credential not in str(logs)
    assert not [line for line in logs if line["event"] == "session.crashed"]


@pytest.mark.parametrize("credential", ["bad-name", "not-a-principal"])
async def test_a_plugin_returning_no_usable_principal_gets_internal(
        faulty: None, credential: str) -> None:
    """What a plugin returns is checked like a JWT's claims: a principal name with a wildcard
    would widen `{principal}` rules, so it is refused, as a fault of the plugin (1011)."""
    with structlog.testing.capture_logs() as logs:
        async with running_broker(faulty_config()) as broker, \
                session_of(broker.url, credential) as (session, answer):
            assert isinstance(answer, Error) and answer.code == ErrorCode.INTERNAL
            assert await session.closed_with() == CloseCode.INTERNAL_ERROR
    [logged] = [line for line in logs if line["event"] == "security.auth_error"]
    assert logged["error"] in ("ValueError", "TypeError")


async def test_a_slow_plugin_times_out_without_delaying_another_hello(faulty: None) -> None:
    """A hello whose plugin never answers is answered `unavailable` and closed with 1013 after
    authenticate_timeout, the plugin's call cancelled; meanwhile a second session's hello is
    answered at once, and a plugin that answers within the timeout is waited for."""
    timeout = 1.0
    with structlog.testing.capture_logs() as logs:
        async with running_broker(faulty_config(timeout)) as broker, trio.open_nursery() as n:
            slow_done = trio.Event()
            slow: dict[str, Any] = {}

            async def hang() -> None:
                started = trio.current_time()
                async with session_of(broker.url, "slow") as (session, answer):
                    slow["answer"], slow["code"] = answer, await session.closed_with()
                slow["took"] = trio.current_time() - started
                slow_done.set()

            n.start_soon(hang)
            await trio.sleep(0.1)  # the slow hello is waiting on its plugin by now
            started = trio.current_time()
            async with session_of(broker.url, "ok:bob") as (_, welcome):
                quick = trio.current_time() - started
                assert isinstance(welcome, Welcome)
            assert not slow_done.is_set()
            assert quick < timeout / 2
            async with session_of(broker.url, "late:carol") as (_, welcome):
                assert isinstance(welcome, Welcome) and welcome.principal == "carol"
            with trio.fail_after(5):
                await slow_done.wait()
            counters = broker.broker.counters
    assert slow["answer"] == Error(code=ErrorCode.UNAVAILABLE, ref="hello",
                                   message="authentication unavailable: no answer in time")
    assert slow["code"] == CloseCode.TRY_AGAIN_LATER
    assert timeout <= slow["took"] < timeout + 2
    assert faulty_auth.opened[-1].cancelled == 1
    assert counters["security_auth_unavailable"] == 1
    [logged] = [line for line in logs if line["event"] == "security.auth_unavailable"]
    assert logged["timeout"] == timeout


def test_checked_principal_refuses_what_cannot_become_part_of_a_topic() -> None:
    assert checked_principal(Principal(name="a", roles=("r",))) == Principal(name="a",
                                                                            roles=("r",))
    for bad in [Principal(name=""), Principal(name="a b"), Principal(name="a", roles=("+",)),
                Principal(name="a", sessions=("s/1",)),
                Principal(name="a", roles=["r"]),  # type: ignore[arg-type]
                Principal(name="a", expires=float("nan")), "a", None]:
        with pytest.raises((TypeError, ValueError)):
            checked_principal(bad)
