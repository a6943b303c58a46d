"""TLS on the listener (issue 10): both clients over wss:// with certificates made at test time,
mutual TLS, a plain client against a TLS listener, and TLS settings checked at start.

Real sockets on 127.0.0.1, the real listener, the real clients; the certificates come from
tests/certificates.py (a fresh CA per test).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import structlog
import trio

from mqbroker.client import ConnectError, connect
from mqbroker.client import aio as aio_client
from mqbroker.config import Config, ConfigError, ServerConfig
from mqbroker.tls import server_context
from tests.certificates import Certificates, make_pki
from tests.harness import RunningBroker, broker_config, running_broker
from tests.rawws import RawWebSocket
from tests.test_client_aio import BrokerThread


@pytest.fixture
def pki(tmp_path: Path) -> Certificates:
    return make_pki(tmp_path)


def tls_config(pki: Certificates, *, mutual: bool = False, **server: object) -> Config:
    return broker_config(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                         tls_client_ca=str(pki.ca) if mutual else "", **server)


def wss(running: RunningBroker) -> str:
    return f"wss://127.0.0.1:{running.listener.port}/"


@asynccontextmanager
async def tls_broker(pki: Certificates, **options: object) -> AsyncIterator[RunningBroker]:
    async with running_broker(tls_config(pki, **options)) as running:  # type: ignore[arg-type]
        yield running


async def round_trip(url: str, context: ssl.SSLContext, payload: object = "over TLS") -> None:
    """A subscriber and a publisher over `url`; the message arrives intact."""
    async with connect(url, ssl_context=context) as subscriber, \
            connect(url, ssl_context=context) as publisher:
        subscription = await subscriber.subscribe("tls/+")
        await publisher.publish("tls/a", payload, ack=True)
        with trio.fail_after(5):
            message = await anext(aiter(subscription))
        assert message.payload == payload  # type: ignore[union-attr]


# --- wss:// with both clients ---------------------------------------------------------------


async def test_the_trio_client_connects_over_wss(pki: Certificates) -> None:
    async with tls_broker(pki) as running:
        await round_trip(wss(running), pki.client_context())


async def test_large_frames_cross_tls_both_ways(pki: Certificates) -> None:
    """Frames of many TLS records (16 KiB each), more than a socket buffer takes at once: the
    never-waiting write keeps the records in order through the writer task."""
    payload = bytes(range(256)) * 3000  # 768 KB
    async with tls_broker(pki, max_frame_bytes=1024 * 1024) as running:
        await round_trip(wss(running), pki.client_context(), payload)


def test_the_asyncio_client_connects_over_wss(pki: Certificates) -> None:
    broker = BrokerThread(config=tls_config(pki))
    broker.start()
    try:
        url = f"wss://127.0.0.1:{broker.port}/"

        async def scenario() -> None:
            context = pki.client_context()
            async with aio_client.connect(url, ssl_context=context) as subscriber, \
                    aio_client.connect(url, ssl_context=context) as publisher:
                subscription = await subscriber.subscribe("tls/+")
                await publisher.publish("tls/a", {"over": "TLS"}, ack=True)
                async with asyncio.timeout(5):
                    message = await anext(aiter(subscription))
                assert message.payload == {"over": "TLS"}  # type: ignore[union-attr]

        asyncio.run(scenario())
    finally:
        broker.stop()


async def test_a_client_that_does_not_trust_the_certificate_cannot_connect(
        pki: Certificates) -> None:
    """The default context (the system's CAs) does not know the test CA: no session."""
    async with tls_broker(pki) as running:
        with pytest.raises(ConnectError):
            async with connect(wss(running), open_timeout=5):
                pass
        assert not running.broker.sessions


async def test_an_ssl_context_for_a_plain_url_is_refused() -> None:
    """A context that would silently not be used is a mistake, said at once."""
    with pytest.raises(ValueError, match="not wss://"):
        async with connect("ws://127.0.0.1:1/", ssl_context=ssl.create_default_context()):
            pass


# --- plain clients against a TLS listener ---------------------------------------------------


async def test_a_plain_client_fails_cleanly_and_the_broker_serves_on(pki: Certificates) -> None:
    async with tls_broker(pki) as running:
        with structlog.testing.capture_logs() as logs:
            raw = await RawWebSocket.open_tcp(running.listener.port)
            await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            with trio.fail_after(5):
                while await raw.sock.recv(4096):
                    pass  # a TLS alert, then the close
            raw.sock.close()
            with pytest.raises(ConnectError):
                async with connect(f"ws://127.0.0.1:{running.listener.port}/",
                                   open_timeout=5):
                    pass
        failed = [entry for entry in logs if entry["event"] == "connection.tls_failed"]
        assert len(failed) == 2
        assert running.broker.stats()["tls_handshakes_failed"] == 2
        assert running.listener.open_connections == 0
        await round_trip(wss(running), pki.client_context())


async def test_a_silent_client_is_dropped_after_hello_timeout(
        pki: Certificates, autojump_clock: trio.abc.Clock) -> None:
    """A TCP connection that never starts TLS holds nothing past hello_timeout."""
    async with tls_broker(pki, hello_timeout=3.0) as running:
        raw = await RawWebSocket.open_tcp(running.listener.port)
        with trio.fail_after(10):
            assert await raw.sock.recv(4096) == b""
        raw.sock.close()
        assert running.listener.open_connections == 0


async def test_a_forged_record_ends_that_connection_only(pki: Certificates) -> None:
    """After a good handshake, a record that fails its integrity check (bytes injected on the
    wire) ends that connection; the broker serves on."""
    async with tls_broker(pki) as running:
        tcp = await trio.open_tcp_stream("127.0.0.1", running.listener.port)
        tls = trio.SSLStream(tcp, pki.client_context(), server_hostname="127.0.0.1")
        await tls.do_handshake()
        # An application-data record of TLS 1.2/1.3 framing, with 32 bytes no key made.
        await tcp.send_all(b"\x17\x03\x03\x00\x20" + bytes(range(32)))
        with trio.fail_after(5):
            while await tcp.receive_some(4096):
                pass  # an alert perhaps, then the close
        await tcp.aclose()
        for _ in range(100):
            if running.listener.open_connections == 0:
                break
            await trio.sleep(0.01)
        assert running.listener.open_connections == 0
        await round_trip(wss(running), pki.client_context())


# --- mutual TLS -------------------------------------------------------------------------------


async def test_mutual_tls_accepts_a_client_certificate_of_the_ca(pki: Certificates) -> None:
    async with tls_broker(pki, mutual=True) as running:
        await round_trip(wss(running), pki.client_context(certificate=pki.client))


async def test_mutual_tls_refuses_a_client_without_certificate(pki: Certificates) -> None:
    async with tls_broker(pki, mutual=True) as running:
        for certificate in (None, pki.stranger):
            with pytest.raises(ConnectError):
                async with connect(wss(running), open_timeout=5,
                                   ssl_context=pki.client_context(certificate=certificate)):
                    pass
        assert not running.broker.sessions
        assert running.broker.stats()["tls_handshakes_failed"] == 2


# --- settings checked at start ------------------------------------------------------------------


def tls_error(**settings: str) -> str:
    with pytest.raises(ConfigError) as raised:
        server_context(ServerConfig(**settings))
    return str(raised.value)


def test_no_tls_settings_no_context() -> None:
    assert server_context(ServerConfig()) is None


def test_a_missing_file_is_named(pki: Certificates, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    assert tls_error(tls_cert=missing, tls_key=str(pki.server.key)) == (
        f"config.toml: server.tls_cert: cannot read {missing!r}: No such file or directory")


def test_a_key_without_a_certificate_is_named(pki: Certificates) -> None:
    assert tls_error(tls_key=str(pki.server.key)) == (
        "config.toml: server.tls_cert: missing: TLS needs the certificate (a PEM file)")
    assert tls_error(tls_cert=str(pki.server.cert)) == (
        "config.toml: server.tls_key: missing: TLS needs its private key (a PEM file)")


def test_a_key_of_another_certificate_is_named(pki: Certificates) -> None:
    assert tls_error(tls_cert=str(pki.server.cert), tls_key=str(pki.client.key)) == (
        "config.toml: server.tls_key: the private key does not match the certificate in "
        "server.tls_cert")


def test_a_file_that_is_not_pem_is_named(pki: Certificates, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert tls_error(tls_cert=str(junk), tls_key=str(pki.server.key)).startswith(
        f"config.toml: server.tls_cert: no PEM certificate in {str(junk)!r}")
    assert tls_error(tls_cert=str(pki.server.cert), tls_key=str(junk)).startswith(
        "config.toml: server.tls_key: not a PEM private key")
    assert tls_error(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                     tls_client_ca=str(junk)).startswith(
        f"config.toml: server.tls_client_ca: no PEM certificate in {str(junk)!r}")


async def test_the_listener_checks_before_binding(pki: Certificates, tmp_path: Path) -> None:
    """`serve` says the problem before it listens (the CLI checks earlier still)."""
    server = attrs.evolve(tls_config(pki).server, tls_key=str(tmp_path / "gone.key"))
    expected = pytest.RaisesExc(ConfigError, match="server.tls_key: cannot read")
    with pytest.RaisesGroup(expected, flatten_subgroups=True):
        async with running_broker(Config(server=server)):
            pass
