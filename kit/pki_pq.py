"""A throwaway ML-DSA test PKI next to the classic one (hsd_kit.pki), for x509.pq.* tests.

ML-DSA-65 root -> ML-DSA-65 intermediate -> server and client leaves, so a
handshake shows whether the ML-DSA leaf travels with its own intermediate.
The private keys written here are test-only keys for a test directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pki import TestPki, make_pki

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class PqPair:
    chain: str  # PEM leaf + intermediate: what x509.pq.certificate names
    key: str  # PEM PKCS#8 ML-DSA-65 key (test-only)
    leaf_der: bytes
    intermediate_der: bytes


@dataclass(frozen=True)
class PqPki:
    classic: TestPki  # P-256 CA, server and client pairs
    pq_ca: str  # PEM of the ML-DSA-65 root
    trust_both: str  # PEM: classic CA + ML-DSA root (what an ML-DSA-capable verifier trusts)
    server: PqPair  # SAN DNS:localhost, IP:127.0.0.1
    client: PqPair  # SAN DNS:client.test, URI:hsd://client

    __test__ = False  # not a pytest test class


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsd pq test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(builder: x509.CertificateBuilder, issuer_key: mldsa.MLDSA65PrivateKey) -> x509.Certificate:
    return builder.sign(issuer_key, None)  # ML-DSA signs the message itself: no separate hash


def _base(subject: str, issuer: x509.Name, key: mldsa.MLDSA65PrivateKey, now: datetime.datetime):
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY).not_valid_after(now + 30 * ONE_DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _ca(subject: str, issuer: x509.Certificate | None, issuer_key, now: datetime.datetime):
    key = mldsa.MLDSA65PrivateKey.generate()
    builder = (
        _base(subject, issuer.subject if issuer else _name(subject), key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    )
    return _sign(builder, issuer_key or key), key


def _leaf(subject: str, sans: list[x509.GeneralName], usage, issuer: x509.Certificate, issuer_key,
          now: datetime.datetime):
    key = mldsa.MLDSA65PrivateKey.generate()
    builder = (
        _base(subject, issuer.subject, key, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return _sign(builder, issuer_key), key


def _write(path: str, data: bytes, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _save(directory: str, stem: str, leaf, key, intermediate) -> PqPair:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return PqPair(
        chain=_write(os.path.join(directory, f"{stem}-chain.pem"), _pem(leaf) + _pem(intermediate)),
        key=_write(os.path.join(directory, f"{stem}.key"), key_pem, private=True),
        leaf_der=leaf.public_bytes(serialization.Encoding.DER),
        intermediate_der=intermediate.public_bytes(serialization.Encoding.DER),
    )


def make_pq_pki(directory: str) -> PqPki:
    """Classic P-256 PKI under directory/classic plus the ML-DSA-65 hierarchy under directory/pq."""
    classic = make_pki(os.path.join(directory, "classic"))
    pq_dir = os.path.join(directory, "pq")
    os.makedirs(pq_dir, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    root, root_key = _ca("hsd ML-DSA root", None, None, now)
    inter, inter_key = _ca("hsd ML-DSA intermediate", root, root_key, now)
    server = _leaf("localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   ExtendedKeyUsageOID.SERVER_AUTH, inter, inter_key, now)
    client = _leaf("client.test", [x509.DNSName("client.test"), x509.UniformResourceIdentifier("hsd://client")],
                   ExtendedKeyUsageOID.CLIENT_AUTH, inter, inter_key, now)
    with open(classic.ca, "rb") as handle:
        classic_ca = handle.read()
    return PqPki(
        classic=classic,
        pq_ca=_write(os.path.join(pq_dir, "ca.pem"), _pem(root)),
        trust_both=_write(os.path.join(directory, "trust-both.pem"), classic_ca + _pem(root)),
        server=_save(pq_dir, "server", *server, inter),
        client=_save(pq_dir, "client", *client, inter),
    )
