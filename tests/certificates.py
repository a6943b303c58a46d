"""Test certificates made at test time (the `cryptography` package): a CA, a server certificate
for 127.0.0.1 and localhost signed by it, and a client certificate for mutual TLS.

Nothing is checked in: every run makes fresh keys, so no test can depend on a certificate that
expires or leaks. EC P-256 keys: quick to generate, accepted by every TLS 1.2/1.3 stack.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


@attrs.frozen
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@attrs.frozen
class Certificates:
    ca: Path
    server: Pair
    client: Pair
    #: Another client certificate of the CA (CN "mcp-server-2"): valid, but named nowhere.
    unlisted: Pair
    #: A second CA and a client certificate it signed: a certificate the broker must refuse.
    stranger: Pair

    def client_context(self, *, certificate: Pair | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting `certificate` if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if certificate is not None:
            context.load_cert_chain(certificate.cert, certificate.key)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Pair:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Pair(cert_path, key_path)


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(common_name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *,
          server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - DAY).not_valid_after(now + DAY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Certificates:
    """Fresh certificates under `directory`."""
    ca = _ca("mqbroker test CA")
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    stranger_ca = _ca("some other CA")
    return Certificates(
        ca=ca_path,
        server=_write(directory, "server", *_leaf("127.0.0.1", ca, server=True)),
        client=_write(directory, "client", *_leaf("mcp-server-1", ca, server=False)),
        unlisted=_write(directory, "unlisted", *_leaf("mcp-server-2", ca, server=False)),
        stranger=_write(directory, "stranger", *_leaf("intruder", stranger_ca, server=False)),
    )
