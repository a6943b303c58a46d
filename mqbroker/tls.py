"""The listener's TLS settings turned into an `ssl.SSLContext`, checked once at start.

A file that is missing, unreadable, not PEM, or a key that does not belong to its certificate is
a ConfigError naming the key (`server.tls_key: ...`), said before the broker listens: found on
the first connection instead, it would be one log line per client and no service.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mqbroker.config import ConfigError, ServerConfig


class _Encrypted(Exception):
    """The private key asks for a passphrase: the broker has none to give (and must not prompt)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def server_context(config: ServerConfig, *, source: str = "config.toml") -> ssl.SSLContext | None:
    """The listener's TLS context; None when `tls_cert` is empty (plain ws://).

    Raises ConfigError naming `source`, the key and the problem.
    """
    if not config.tls_cert and not config.tls_key and not config.tls_client_ca:
        return None
    _require(config.tls_cert, "server.tls_cert", "the certificate", source)
    _require(config.tls_key, "server.tls_key", "its private key", source)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 client asking to renegotiate makes the server do a handshake's work again on
    # demand: a cheap way to burn our CPU, and nothing a client of ours needs.
    context.options |= ssl.OP_NO_RENEGOTIATION
    _check_certificates(config.tls_cert, "server.tls_cert", source)
    _readable(config.tls_key, "server.tls_key", source)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(f"{source}: server.tls_key: the private key is encrypted; give an "
                          "unencrypted PEM key (readable by the broker's user only)") from None
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            problem = "the private key does not match the certificate in server.tls_cert"
        else:
            problem = f"not a PEM private key ({error.reason or error})"
        raise ConfigError(f"{source}: server.tls_key: {problem}") from error
    if config.tls_client_ca:
        _check_certificates(config.tls_client_ca, "server.tls_client_ca", source)
        context.load_verify_locations(cafile=config.tls_client_ca)
        # Mutual TLS: a client without a certificate signed by these CAs is refused in the
        # TLS handshake, before it can send a byte of HTTP.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _require(path: str, key: str, what: str, source: str) -> None:
    if not path:
        raise ConfigError(f"{source}: {key}: missing: TLS needs {what} (a PEM file)")


def _readable(path: str, key: str, source: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{source}: {key}: cannot read {path!r}: "
                          f"{error.strerror or error}") from error


def _check_certificates(path: str, key: str, source: str) -> None:
    """`path` is readable and holds at least one PEM certificate."""
    _readable(path, key, source)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as error:
        raise ConfigError(f"{source}: {key}: no PEM certificate in {path!r} "
                          f"({error.reason or error})") from error
