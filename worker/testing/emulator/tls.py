"""A throw-away certificate authority and a server certificate for loopback HTTPS.

:func:`ensure_tls_files` writes ``ca.pem`` (what clients must trust), ``server.pem`` (leaf then
CA) and ``server-key.pem`` into a directory, reusing them when they are still valid for a day,
so a worker configured with the CA bundle keeps working across emulator restarts. It blocks
(key generation, file writes): call it in a thread.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS: Final = ("localhost", "127.0.0.1", "::1")
_CA_DAYS: Final = 365
_SERVER_DAYS: Final = 30


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: str
    cert_file: str
    key_file: str


def ensure_tls_files(directory: str) -> TlsFiles:
    """The CA, server certificate and key in ``directory``, made when missing or expiring."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        str(folder / "ca.pem"), str(folder / "server.pem"), str(folder / "server-key.pem")
    )
    if not _still_valid(files):
        _write(files)
    return files


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS server context presenting the emulator's certificate chain (blocking file reads)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_file, files.key_file)
    return context


def _still_valid(files: TlsFiles) -> bool:
    paths = (files.ca_file, files.cert_file, files.key_file)
    if not all(os.path.exists(path) for path in paths):
        return False
    try:
        cert = x509.load_pem_x509_certificate(Path(files.cert_file).read_bytes())
        x509.load_pem_x509_certificate(Path(files.ca_file).read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc > _now() + dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "biot-worker emulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name("biot-worker emulator CA")
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _alt_names() -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(host)) for host in HOSTS[1:]]
    return x509.SubjectAlternativeName(names)


def _server(
    key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_alt_names(), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(files: TlsFiles) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca(ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    server = _server(key, ca, ca_key)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(files.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    Path(files.cert_file).write_bytes(_pem(server) + _pem(ca))
    Path(files.ca_file).write_bytes(_pem(ca))
