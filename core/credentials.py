"""Certificates, private keys, trust stores and CRLs for one handshake.

They come from the config file (PEM) or, when the request names them, from key
serials in kernel keyrings (PEM or DER payloads).  Backends receive parsed
`cryptography` objects and translate them into their library's form.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import filetrust, keyring, pkcs11
from .config import Config, RoleConfig, SniPair
from .errors import CredentialError
from .protocol import HandshakeRequest
from .secret import frombase64_into, wipe

MAX_CHAIN = 10
try:  # ML-DSA keys arrived in cryptography 47; Debian trixie ships 43 (x509.pq.* is then refused)
    from cryptography.hazmat.primitives.asymmetric import mldsa
    MLDSA_PUBLIC_KEYS: tuple[type, ...] = (mldsa.MLDSA44PublicKey, mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)
    MLDSA_PRIVATE_KEYS: tuple[type, ...] = (mldsa.MLDSA44PrivateKey, mldsa.MLDSA65PrivateKey,
                                            mldsa.MLDSA87PrivateKey)
except ImportError:
    MLDSA_PUBLIC_KEYS = MLDSA_PRIVATE_KEYS = ()

log = logging.getLogger("hsd")


@dataclass
class X509Credentials:
    chain: list[x509.Certificate] = field(default_factory=list)  # ours, leaf first
    key: PrivateKeyTypes | pkcs11.TokenKey | None = None  # TokenKey: a handle to a key in a PKCS#11 token
    trust: list[x509.Certificate] | None = None  # None: the system trust store
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    verify_peer: bool = True  # client: verify the server; server: verify a client cert if sent
    require_peer_cert: bool = False  # server: a client certificate is mandatory
    allowed_sans: list[str] = field(default_factory=list)  # server: accepted client SANs (empty: any)
    # x509.pq.*: a second, ML-DSA identity offered next to the classic one to peers that sign with ML-DSA
    pq_chain: list[x509.Certificate] = field(default_factory=list)  # leaf first
    pq_key: PrivateKeyTypes | None = None
    from_files: bool = False  # chain and key are _FileCache's objects (not a request's keyring, not a token)

    def __repr__(self) -> str:
        pq = f", pq_chain={len(self.pq_chain)}, pq_key={'yes' if self.pq_key else 'no'}" if self.pq_chain else ""
        return f"X509Credentials(chain={len(self.chain)}, key={'yes' if self.key else 'no'}{pq})"


def parse_certificates(data: bytes | bytearray, what: str) -> list[x509.Certificate]:
    data = bytes(data)  # public; cryptography's certificate loaders take only bytes
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CredentialError(f"{what}: not a certificate ({exc})") from None
    if not certs:
        raise CredentialError(f"{what}: no certificate found")
    return certs


# Fully validating an RSA key (primality of p and q) costs ~60 ms of CPU on every load; a key is
# validated on first sight only, remembered by a keyed digest (a re-read changed file, a keyring key).
_VALIDATED_SALT = os.urandom(32)
_validated_keys: set[bytes] = set()


def pem_private_key_der(data: bytes | bytearray) -> bytearray | None:
    """The DER of the first PEM private-key block, decoded into a bytearray the caller wipes.

    cryptography's PEM loader leaves its decoded copy of the key in freed memory;
    its DER loader reads the caller's buffer.  None when the block is encrypted or
    carries headers: cryptography's PEM loader then judges (and refuses) it."""
    pos = 0
    while (begin := data.find(b"-----BEGIN ", pos)) >= 0:
        label_end = data.find(b"-----", begin + 11)
        end = data.find(b"-----END ", label_end + 5) if label_end >= 0 else -1
        if end < 0:
            return None
        label = bytes(data[begin + 11:label_end])  # e.g. "PRIVATE KEY", "EC PARAMETERS": not secret
        if label.endswith(b"PRIVATE KEY"):
            if label.startswith(b"ENCRYPTED") or data.find(b":", label_end, end) >= 0:
                return None
            with memoryview(data) as view:
                return frombase64_into(view[label_end + 5:end])
        pos = end + 9
    return None


def parse_private_key(data: bytes | bytearray, what: str) -> PrivateKeyTypes:
    """PEM or DER from the caller's buffer; PEM is decoded into a bytearray wiped after parsing."""
    seen = hmac.new(_VALIDATED_SALT, data, hashlib.sha256).digest()
    skip = seen in _validated_keys
    der: bytearray | None = None
    try:
        if b"-----BEGIN" in data:
            der = pem_private_key_der(data)
        if der is not None:
            key = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=skip)
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=skip)
        else:
            key = serialization.load_der_private_key(data, password=None, unsafe_skip_rsa_key_validation=skip)
    except (ValueError, TypeError) as exc:
        raise CredentialError(f"{what}: not an unencrypted private key ({exc})") from None
    finally:
        wipe(der)
    _validated_keys.add(seen)
    return key


def parse_crls(data: bytes, what: str) -> list[x509.CertificateRevocationList]:
    try:
        if b"-----BEGIN" not in data:
            return [x509.load_der_x509_crl(data)]
        blocks = data.split(b"-----END X509 CRL-----")
        return [x509.load_pem_x509_crl(b + b"-----END X509 CRL-----\n") for b in blocks if b"-----BEGIN" in b]
    except ValueError as exc:
        raise CredentialError(f"{what}: not a CRL ({exc})") from None


class _FileCache:
    """Parsed files keyed by path and file identity: a changed file is re-read, an unchanged one is not.

    The identity is filetrust's (device, inode, size, mode, owner, mtime, ctime): nobody can
    replace, rewrite, chmod or chown the file without changing it.  Private keys are kept too,
    as the library's parsed objects only (never their text, never written anywhere): the same
    key already lives inside every cached OpenSSL context (hsd_openssl.contexts); parsing it
    per request cost about 5% of a handshake's daemon CPU (docs/performance.md)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], tuple[tuple[int, ...], object]] = {}

    def get(self, path: str, kind: str, parse) -> object:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CredentialError(f"{path}: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                 st.st_ctime_ns)
        with self._lock:
            hit = self._items.get((path, kind))
            if hit and hit[0] == stamp:
                return hit[1]
        try:
            data = _read_secret_file(path) if kind == "key" else _read_file(path)
        except OSError as exc:
            raise CredentialError(f"{path}: {exc.strerror}") from None
        try:
            value = parse(data, path)
        finally:
            wipe(data)  # a key file's text is zeroed once parsed (others: a no-op on bytes)
        with self._lock:
            old = self._items.get((path, kind))
            self._items[(path, kind)] = (stamp, value)
        if old is not None:  # a replaced (rotated) key must not live on in the public-half memo
            _forget_public(old[1])
        return value


_cache = _FileCache()


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _read_secret_file(path: str) -> bytearray:
    """A private key file read into a bytearray the caller wipes (no immutable copy of its text)."""
    with open(path, "rb", buffering=0) as handle:
        buf = bytearray(os.fstat(handle.fileno()).st_size + 1)  # +1: a file that grew is noticed
        got = 0
        while True:
            with memoryview(buf) as view:
                step = handle.readinto(view[got:])
            if not step:
                break
            got += step
            if got == len(buf):  # it grew while we read: a larger buffer, and the old one zeroed
                bigger = bytearray(2 * len(buf))
                bigger[:got] = buf
                wipe(buf)
                buf = bigger
        if 2 * got < len(buf):  # shrinking this much would reallocate and free an unzeroed copy
            with memoryview(buf) as view:
                exact = bytearray(view[:got])
            wipe(buf)
            return exact
        del buf[got:]  # in place: a bytearray keeps its allocation when it shrinks by less than half
        return buf


def _from_keyring(serial: int, parse, what: str):
    try:
        payload = keyring.read_key(serial)
    except keyring.KeyringError as exc:
        raise CredentialError(f"{what} key {serial}: {exc.strerror}") from None
    try:
        return parse(payload, f"{what} key {serial}")
    finally:
        wipe(payload)


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_public_ders: dict[int, tuple[object, bytes]] = {}  # id(obj) -> (obj, its SPKI DER); obj held, so id stays its
_public_ders_lock = threading.Lock()


def public_der(obj: PrivateKeyTypes | x509.Certificate, remember: bool = False) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key or certificate; remember: of an object _FileCache keeps.

    Every request asks it of the same cached key and certificate (the match check here, the
    OpenSSL context cache's key).  Only objects the file cache holds anyway are remembered: a
    key from a request's keyring or a token handle is never kept beyond its request.
    TypeError/ValueError: a key type cryptography cannot serialise."""
    if not remember:
        return obj.public_key().public_bytes(*_SPKI)
    with _public_ders_lock:
        hit = _public_ders.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    der = obj.public_key().public_bytes(*_SPKI)
    with _public_ders_lock:
        if len(_public_ders) >= 256:
            _public_ders.clear()
        _public_ders[id(obj)] = (obj, der)
    return der


def _forget_public(value: object) -> None:
    """Drop the memo entries of a file cache value (a key, or a list of certificates) it no longer holds."""
    with _public_ders_lock:
        for obj in (value if isinstance(value, list) else [value]):
            hit = _public_ders.get(id(obj))
            if hit is not None and hit[0] is obj:
                del _public_ders[id(obj)]


def key_belongs_to(key: PrivateKeyTypes, cert: x509.Certificate, remember: bool = False) -> bool:
    """Whether key is cert's private key: their public keys (SubjectPublicKeyInfo DER) are the same."""
    try:
        return public_der(key, remember) == public_der(cert, remember)
    except (TypeError, ValueError):  # a key type cryptography cannot serialise: not provably the same
        return False


def check_private_key_file(path: str, strict: bool) -> None:
    """A private key others could read or replace: warn once per file and problem; refuse when strict."""
    warning = filetrust.enforce(path, "private key", strict, refuse=CredentialError, secret=True)
    if warning:
        log.warning("%s", warning)


def check_trusted_file(path: str, strict: bool, what: str = "trusted") -> None:
    """A trust store, CRL or certificate others could replace: warn once; refuse when strict."""
    warning = filetrust.enforce(path, what, strict, refuse=CredentialError)
    if warning:
        log.warning("%s", warning)


def _load_pq_pair(rc: RoleConfig, config: Config,
                  request: HandshakeRequest) -> tuple[list[x509.Certificate], PrivateKeyTypes | None]:
    """The role's x509.pq.* ML-DSA chain and key: both or neither, and the key must match the leaf.

    A request that names its own certificate (keyring serial) gets exactly that
    identity: the configured ML-DSA pair is not added to it.
    """
    role = request.role
    if not rc.pq_certificate and not rc.pq_private_key:
        return [], None
    if not (rc.pq_certificate and rc.pq_private_key):
        missing = "x509.pq.private_key" if rc.pq_certificate else "x509.pq.certificate"
        raise CredentialError(f"[authenticate.{role}] x509.pq.certificate and x509.pq.private_key must be "
                              f"configured together ({missing} is missing)")
    if request.certificate:
        log.debug("%s request names its own certificate: x509.pq.* not added", role)
        return [], None
    chain = list(_cache.get(rc.pq_certificate, "chain", parse_certificates))
    if len(chain) > MAX_CHAIN:
        raise CredentialError(f"{rc.pq_certificate}: {len(chain)} certificates, at most {MAX_CHAIN}")
    public = chain[0].public_key()
    if not isinstance(public, MLDSA_PUBLIC_KEYS):
        raise CredentialError(f"{rc.pq_certificate}: x509.pq.certificate must hold an ML-DSA certificate, "
                              f"its leaf key is {type(public).__name__.removesuffix('PublicKey')}")
    check_private_key_file(rc.pq_private_key, config.strict_permissions)
    key = _cache.get(rc.pq_private_key, "key", parse_private_key)
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if not isinstance(key, MLDSA_PRIVATE_KEYS) or key.public_key().public_bytes(*raw) != public.public_bytes(*raw):
        raise CredentialError(f"{rc.pq_private_key}: x509.pq.private_key is not the key of {rc.pq_certificate}")
    return chain, key


def load_x509(config: Config, request: HandshakeRequest, sni: SniPair | None = None) -> X509Credentials:
    """Credentials for this request's role: request serials first, config files second.

    sni: the [hsd.server.sni] pair hsd.sni chose for the client's server_name
    (server role, a request naming no certificate of its own); it replaces
    [authenticate.server]'s pair and takes the same checks."""
    role = request.role
    rc = config.role(role)
    if sni is not None and role == "server" and not request.certificate and not request.privkey:
        # the x509.pq.* pair is a second identity of tlshd's pair (its names), not of this one
        rc = dataclasses.replace(rc, certificate=sni.certificate, private_key=sni.private_key,
                                 pq_certificate=None, pq_private_key=None)
    creds = X509Credentials()
    for trusted, what in ((rc.truststore, "trust store"), (rc.crl, "CRL"), (rc.certificate, "certificate"),
                          (rc.pq_certificate, "certificate")):
        if trusted and not pkcs11.is_uri(trusted):
            check_trusted_file(trusted, config.strict_permissions, what)
    if rc.truststore:
        creds.trust = list(_cache.get(rc.truststore, "trust", parse_certificates))
    if rc.crl:
        creds.crls = list(_cache.get(rc.crl, "crl", parse_crls))
    if request.certificate:
        creds.chain = _from_keyring(request.certificate, parse_certificates, "certificate")
    elif pkcs11.is_uri(rc.certificate):
        creds.chain = pkcs11.load_certificates(rc.certificate)
    elif rc.certificate:
        creds.chain = list(_cache.get(rc.certificate, "chain", parse_certificates))
    if len(creds.chain) > MAX_CHAIN:
        raise CredentialError(f"certificate chain has {len(creds.chain)} certificates, at most {MAX_CHAIN}")
    if request.privkey:
        creds.key = _from_keyring(request.privkey, parse_private_key, "private")
    elif pkcs11.is_uri(rc.private_key):
        creds.key = pkcs11.load_key(rc.private_key)  # a handle: the key stays in the token
    elif rc.private_key:
        check_private_key_file(rc.private_key, config.strict_permissions)
        creds.key = _cache.get(rc.private_key, "key", parse_private_key)
    if bool(creds.chain) != bool(creds.key):
        raise CredentialError(f"{role} certificate and private key must be configured together")
    from_files = not (request.privkey or request.certificate or pkcs11.is_uri(rc.private_key)
                      or pkcs11.is_uri(rc.certificate))
    creds.from_files = from_files
    if creds.key is not None and not key_belongs_to(creds.key, creds.chain[0], from_files):
        key_from = f"private key {request.privkey}" if request.privkey else pkcs11.redact(rc.private_key)
        cert_from = f"certificate key {request.certificate}" if request.certificate else pkcs11.redact(rc.certificate)
        raise CredentialError(f"{key_from} is not the private key of {cert_from} (their public keys differ): "
                              "configure the key the certificate was issued for")
    creds.pq_chain, creds.pq_key = _load_pq_pair(rc, config, request)
    second = " (x509.pq.* is a second identity next to it, not a replacement)" if creds.pq_chain else ""
    if role == "server":
        if not creds.chain:
            unmatched = ", and no [hsd.server.sni] name matched the client's server_name" if config.sni else ""
            raise CredentialError("server x509 handshake but no server certificate is configured "
                                  f"([authenticate.server] x509.certificate / x509.private_key){unmatched}{second}")
        creds.require_peer_cert = config.require_client_certificate
        creds.allowed_sans = list(config.allowed_client_sans)
    else:
        creds.verify_peer = config.verify_server
        if request.auth == "x509" and not creds.chain:
            raise CredentialError("client x509 (mutual TLS) handshake but no client certificate is configured "
                                  f"([authenticate.client] x509.certificate / x509.private_key){second}")
    return creds
