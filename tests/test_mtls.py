"""Mode mtls: the verified client certificate names the principal ([auth] mode "mtls").

A real TLS listener with client certificates made at test time (tests/certificates.py): a
certificate listed in `[[auth.identities]]` (by its subject CN) gets that principal and its
rights; one of the same CA that is not listed is refused like a bad token (unauthorized, 4003,
security.auth_failed); a client without a certificate, or with one of another CA, never gets
past the TLS handshake. The `auth` of the hello plays no part, and there is nothing to refresh.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import structlog.testing

from mqbroker.client import ConnectError, connect
from mqbroker.config import AuthConfig, Config, ConfigError, IdentityConfig, load_config
from mqbroker.protocol import (
    CloseCode,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    Refresh,
    SubAck,
    Subscribe,
    Welcome,
)
from tests.certificates import Certificates, make_pki
from tests.harness import running_broker
from tests.test_auth import ROLES, TOKENS, answer_to, session_of
from tests.test_tls import tls_config

OWN_TOPIC = "mcp/session/s-1/message"


@pytest.fixture
def pki(tmp_path: Path) -> Certificates:
    return make_pki(tmp_path)


def mtls_config(pki: Certificates) -> Config:
    config = tls_config(pki, mutual=True, shutdown_grace=0.5)
    identity = IdentityConfig(principal="mcp-server-1", roles=("server",), sessions=("s-1",))
    return attrs.evolve(config, auth=AuthConfig(mode="mtls", roles=ROLES,
                                                identities=(identity,)))


def url_of(port: int) -> str:
    return f"wss://127.0.0.1:{port}/"


async def test_a_listed_certificate_names_the_principal_and_its_rights(
        pki: Certificates) -> None:
    async with running_broker(mtls_config(pki)) as broker:
        context = pki.client_context(certificate=pki.client)
        # A hello credential means nothing here: the certificate decides.
        async with session_of(url_of(broker.listener.port), TOKENS["admin"],
                              ssl_context=context) as (session, welcome):
            assert isinstance(welcome, Welcome) and welcome.principal == "mcp-server-1"
            assert welcome.ttl is None  # a certificate's identity lasts the connection
            await session.send(Subscribe(id=1, filter="mcp/session/s-1/#"),
                               Publish(id=2, topic=OWN_TOPIC, payload="own"),
                               Publish(id=3, topic="mcp/session/s-2/message", payload="other"))
            assert await answer_to(session) == SubAck(id=1)
            assert isinstance(await answer_to(session), PubAck)
            refused = await answer_to(session)
            assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
            await session.send(Refresh(id=4, auth=TOKENS["admin"]))
            unsupported = await answer_to(session)
            assert isinstance(unsupported, Error)
            assert unsupported.code == ErrorCode.REFRESH_UNSUPPORTED


async def test_the_clients_connect_with_a_listed_certificate(pki: Certificates) -> None:
    async with running_broker(mtls_config(pki)) as broker:
        async with connect(url_of(broker.listener.port),
                           ssl_context=pki.client_context(certificate=pki.client)) as client:
            subscription = await client.subscribe(OWN_TOPIC)
            assert subscription.ack == SubAck(id=subscription.id)
            await client.publish(OWN_TOPIC, "hi")


async def test_a_certificate_of_the_ca_not_listed_is_refused_like_a_bad_token(
        pki: Certificates) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_broker(mtls_config(pki)) as broker:
            context = pki.client_context(certificate=pki.unlisted)
            async with session_of(url_of(broker.listener.port), None,
                                  ssl_context=context) as (session, answer):
                assert answer == Error(code=ErrorCode.UNAUTHORIZED, ref="hello",
                                       message="authentication failed: unknown client "
                                               "certificate")
                assert await session.closed_with() == CloseCode.UNAUTHORIZED
            assert broker.broker.counters["security_auth_failed"] == 1
            assert broker.broker.counters["sessions_opened"] == 0
    failed = [entry for entry in logs if entry["event"] == "security.auth_failed"]
    assert [entry["reason"] for entry in failed] == ["unknown client certificate"]


@pytest.mark.parametrize("certificate", ["none", "another CA"])
async def test_no_certificate_or_one_of_another_ca_never_gets_a_session(
        pki: Certificates, certificate: str) -> None:
    async with running_broker(mtls_config(pki)) as broker:
        context = pki.client_context(
            certificate=None if certificate == "none" else pki.stranger)
        with pytest.raises(ConnectError):
            async with connect(url_of(broker.listener.port), open_timeout=5,
                               ssl_context=context):
                pass
        assert broker.broker.counters["sessions_opened"] == 0
        assert broker.broker.counters["tls_handshakes_failed"] == 1


def test_mode_mtls_without_a_client_ca_fails_at_start_naming_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[auth]\nmode = "mtls"\n[[auth.identities]]\nprincipal = "a"\n')
    with pytest.raises(ConfigError, match=r'auth\.mode: mode "mtls" needs server\.tls_client_ca'):
        load_config(path)


def test_identities_are_checked_like_tokens(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    base = '[server]\ntls_client_ca = "ca.crt"\n[auth]\nmode = "mtls"\n[auth.roles.r]\n'
    path.write_text(base + '[[auth.identities]]\nprincipal = "a"\nroles = ["nope"]\n')
    with pytest.raises(ConfigError, match=r"auth\.identities\[0\]\.roles\[0\]: unknown role"):
        load_config(path)
    path.write_text(base + '[[auth.identities]]\nprincipal = "a/#"\n')
    with pytest.raises(ConfigError, match=r"auth\.identities\[0\]\.principal"):
        load_config(path)
    path.write_text(base + '[[auth.identities]]\nprincipal = "a"\n'
                           '[[auth.identities]]\nprincipal = "a"\n')
    with pytest.raises(ConfigError, match=r"auth\.identities\[1\]\.principal: .* listed twice"):
        load_config(path)
