"""Two identities on one OpenSSL context: the classic pair and the x509.pq.* ML-DSA pair.

OpenSSL keeps one certificate per key type and, per handshake, picks the one
the peer's signature_algorithms allow (ML-DSA first when the peer offers it).
Each certificate needs its own intermediates, which pyOpenSSL cannot set
(add_extra_chain_cert is context-wide and would send the classic intermediates
with the ML-DSA leaf), and pyOpenSSL refuses ML-DSA keys.  So both pairs go in
through the OpenSSL bindings: the chain via SSL_CTX_use_certificate_chain_file
on an in-memory file (memfd; certificates only, public data), the key as a DER
buffer read from a memory BIO, never from a file.
"""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from hsd.credentials import X509Credentials
from hsd.errors import CredentialError
from hsd.secret import wipe


def install_both_identities(context: SSL.Context, creds: X509Credentials, role: str) -> None:
    """Classic pair, then ML-DSA pair, each with its own chain; CredentialError when either is unusable."""
    if not creds.chain or creds.key is None:
        raise CredentialError(f"{role} x509 handshake needs a certificate and a private key "
                              "(x509.pq.* is a second identity next to it)")
    _install_pair(context, creds.chain, creds.key, f"{role} certificate/private key")
    if creds.pq_chain and creds.pq_key is not None:
        _install_pair(context, creds.pq_chain, creds.pq_key, f"{role} x509.pq certificate/private key")


def _install_pair(context: SSL.Context, chain: list[x509.Certificate], key: PrivateKeyTypes, what: str) -> None:
    """Leaf + its own intermediates become the current certificate; then its key, checked against it."""
    _use_chain(context, chain, what)
    _use_key(context, key, what)
    if lib.SSL_CTX_check_private_key(context._context) != 1:
        raise CredentialError(f"{what} unusable: {_openssl_error()}")


def _use_chain(context: SSL.Context, chain: list[x509.Certificate], what: str) -> None:
    pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)
    fd = os.memfd_create("hsd-chain", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        # /proc/self/fd of our own process stays readable after privileges are dropped
        if lib.SSL_CTX_use_certificate_chain_file(context._context, f"/proc/self/fd/{fd}".encode()) != 1:
            raise CredentialError(f"{what} unusable: {_openssl_error()}")
    finally:
        os.close(fd)


def _use_key(context: SSL.Context, key: PrivateKeyTypes, what: str) -> None:
    der = bytearray(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    buffer = ffi.from_buffer(der)
    bio = lib.BIO_new_mem_buf(buffer, len(der))
    try:
        if bio == ffi.NULL:
            raise CredentialError(f"{what}: out of memory")
        pkey = lib.d2i_PrivateKey_bio(bio, ffi.NULL)
        if pkey == ffi.NULL:
            raise CredentialError(f"{what}: OpenSSL cannot read the private key: {_openssl_error()}")
        try:
            if lib.SSL_CTX_use_PrivateKey(context._context, pkey) != 1:
                raise CredentialError(f"{what} unusable: {_openssl_error()}")
        finally:
            lib.EVP_PKEY_free(pkey)
    finally:
        if bio != ffi.NULL:
            lib.BIO_free(bio)
        wipe(der)  # our copy of the key bytes; OpenSSL holds its own


def _openssl_error() -> str:
    """OpenSSL's error reasons, oldest first (draining the queue so they do not leak into the handshake)."""
    reasons = []
    while (code := lib.ERR_get_error()) != 0:
        text = lib.ERR_reason_error_string(code)
        reasons.append(ffi.string(text).decode(errors="replace") if text != ffi.NULL else hex(code))
    return "; ".join(dict.fromkeys(reasons)) or "unknown OpenSSL error"
