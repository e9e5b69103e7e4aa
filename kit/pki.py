"""A throwaway test PKI, generated with `cryptography` into a directory.

Real certificates for real handshakes: a CA, a server certificate valid for
localhost and 127.0.0.1, a client certificate, and the bad cases negative tests
need (expired, issued by an untrusted CA, revoked + CRL).  The private keys
written here are test-only keys for a test directory, nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsd.credentials import X509Credentials, parse_certificates, parse_crls, parse_private_key

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertPair:
    cert: str  # PEM certificate path
    key: str  # PEM private key path (test-only)
    chain: str  # PEM leaf + issuing CA, for peers that want a full chain


@dataclass(frozen=True)
class TestPki:
    directory: str
    ca: str  # PEM of the trusted CA
    other_ca: str  # PEM of a CA nobody trusts
    server: CertPair  # SAN DNS:localhost, IP:127.0.0.1
    client: CertPair  # SAN DNS:client.test, URI:hsd://client
    expired_server: CertPair
    untrusted_server: CertPair  # issued by other_ca
    revoked_server: CertPair
    crl: str  # PEM CRL of the CA listing revoked_server
    key_type: str

    __test__ = False  # not a pytest test class


def _new_key(key_type: str):
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {key_type!r} (p256 or rsa)")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsd test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str, key_type: str, now: datetime.datetime):
    key = _new_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY).not_valid_after(now + 30 * ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(common_name: str, sans: list[x509.GeneralName], usage, issuer, issuer_key, key_type: str,
          not_before: datetime.datetime, not_after: datetime.datetime):
    key = _new_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(issuer.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _save_pair(directory: str, stem: str, cert, key, issuer) -> CertPair:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return CertPair(
        cert=_write(os.path.join(directory, f"{stem}.pem"), _pem(cert)),
        key=_write(os.path.join(directory, f"{stem}.key"), key_pem, private=True),
        chain=_write(os.path.join(directory, f"{stem}-chain.pem"), _pem(cert) + _pem(issuer)),
    )


def make_pki(directory: str, key_type: str = "p256") -> TestPki:
    """Generate the whole test PKI under directory (created if needed); returns the file paths."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - ONE_DAY, now + 30 * ONE_DAY)
    ca, ca_key = _ca("hsd test CA", key_type, now)
    other, other_key = _ca("hsd untrusted CA", key_type, now)
    server_sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH

    server = _leaf("localhost", server_sans, server_auth, ca, ca_key, key_type, *valid)
    client = _leaf("client.test", [x509.DNSName("client.test"), x509.UniformResourceIdentifier("hsd://client")],
                   client_auth, ca, ca_key, key_type, *valid)
    expired = _leaf("localhost", server_sans, server_auth, ca, ca_key, key_type, now - 10 * ONE_DAY, now - ONE_DAY)
    untrusted = _leaf("localhost", server_sans, server_auth, other, other_key, key_type, *valid)
    revoked = _leaf("localhost", server_sans, server_auth, ca, ca_key, key_type, *valid)

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject).last_update(now - ONE_DAY).next_update(now + 30 * ONE_DAY)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked[0].serial_number)
            .revocation_date(now - ONE_DAY).build())
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    return TestPki(
        directory=directory,
        ca=_write(os.path.join(directory, "ca.pem"), _pem(ca)),
        other_ca=_write(os.path.join(directory, "other-ca.pem"), _pem(other)),
        server=_save_pair(directory, "server", *server, ca),
        client=_save_pair(directory, "client", *client, ca),
        expired_server=_save_pair(directory, "expired-server", *expired, ca),
        untrusted_server=_save_pair(directory, "untrusted-server", *untrusted, other),
        revoked_server=_save_pair(directory, "revoked-server", *revoked, ca),
        crl=_write(os.path.join(directory, "crl.pem"), crl.public_bytes(serialization.Encoding.PEM)),
        key_type=key_type,
    )


# ---------------------------------------------------------------- reading it back, as hsd would


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def load_certificates(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file, parsed the way hsd parses configured ones."""
    return parse_certificates(_read(path), path)


def load_crls(path: str) -> list[x509.CertificateRevocationList]:
    return parse_crls(_read(path), path)


def certificate_der(path: str) -> bytes:
    """The first certificate of a PEM file as DER: what Session.peer_certificates holds."""
    return load_certificates(path)[0].public_bytes(serialization.Encoding.DER)


def x509_credentials(pki: TestPki, pair: CertPair | None = None, **options) -> X509Credentials:
    """Credentials trusting the test CA, presenting pair if given; options are X509Credentials fields."""
    made = X509Credentials(trust=load_certificates(pki.ca), **options)
    if pair is not None:
        made.chain = load_certificates(pair.chain)
        made.key = parse_private_key(_read(pair.key), pair.key)
    return made
