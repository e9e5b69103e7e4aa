"""Our certificate chain and key, and the peer's chain, between `cryptography` and tlslite forms.

RSA and ECDSA keys are handed to tlslite as numbers (its key constructors take
the integers `cryptography` reports), so no PEM or DER text of the private key
is made for it.  Other key types (EdDSA) still go through PKCS#8 PEM text in
memory, an immutable copy dropped as soon as tlslite has its key object; the
integers themselves cannot be wiped either (docs/secrets.md).
"""

from __future__ import annotations

import logging
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from ecdsa.curves import curves as ecdsa_curves
from tlslite.utils.keyfactory import parsePEMKey
from tlslite.utils.python_ecdsakey import Python_ECDSAKey
from tlslite.utils.python_rsakey import Python_RSAKey
from tlslite.x509 import X509
from tlslite.x509certchain import X509CertChain

from hsd.credentials import X509Credentials
from hsd.errors import CredentialError


_pq_warned: set[str] = set()  # roles already warned about in this process
_pq_lock = threading.Lock()


def note_pq_ignored(creds: X509Credentials, role: str, log: logging.Logger) -> None:
    """tlslite-ng has no ML-DSA: say so once per process and role (warning), then per handshake (debug)."""
    if not creds.pq_chain:
        return
    with _pq_lock:
        first = role not in _pq_warned
        _pq_warned.add(role)
    if first:
        log.warning("tlslite backend cannot sign with ML-DSA: [authenticate.%s] x509.pq.certificate / "
                    "x509.pq.private_key are ignored, the classic x509.certificate is used for every peer "
                    "(the openssl backend offers both)", role)
    else:
        log.debug("tlslite backend: x509.pq.* ignored for this %s handshake, classic certificate used", role)


def tlslite_identity(creds: X509Credentials, role: str,
                     log: logging.Logger | None = None) -> tuple[X509CertChain, object]:
    """(chain, private key) in tlslite's types; CredentialError when tlslite cannot use them."""
    note_pq_ignored(creds, role, log or logging.getLogger("hsd.handshake"))
    try:
        chain = X509CertChain([_tlslite_certificate(cert) for cert in creds.chain])
        key = tlslite_private_key(creds.key)
    except (SyntaxError, ValueError, TypeError, AttributeError) as exc:
        raise CredentialError(f"{role} certificate/private key unusable with tlslite: {exc}") from None
    return chain, key


# cryptography's curve names -> python-ecdsa's (tlslite picks TLS 1.3 signature hashes by the latter)
_OPENSSL_CURVE_NAMES = {"secp256r1": "prime256v1"}


def tlslite_private_key(key: object) -> object:
    """tlslite's private key object for a `cryptography` one; RSA and ECDSA without any key text."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        public = numbers.public_numbers
        return Python_RSAKey(public.n, public.e, numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1,
                             numbers.iqmp)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        wanted = _OPENSSL_CURVE_NAMES.get(key.curve.name, key.curve.name)
        curve = next((c for c in ecdsa_curves if wanted in (c.openssl_name, c.name)), None)
        if curve is None:
            raise ValueError(f"curve {key.curve.name} is not supported by tlslite")
        numbers = key.private_numbers()
        return Python_ECDSAKey(numbers.public_numbers.x, numbers.public_numbers.y, curve.name,
                               numbers.private_value)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                            serialization.NoEncryption())
    return parsePEMKey(pem.decode("ascii"), private=True, implementations=["python"])


def _tlslite_certificate(cert: x509.Certificate) -> X509:
    parsed = X509()
    parsed.parseBinary(bytearray(cert.public_bytes(serialization.Encoding.DER)))  # returns None
    return parsed


def chain_der(chain: X509CertChain | None) -> tuple[bytes, ...]:
    """A tlslite chain as DER, leaf first (empty for no chain)."""
    if chain is None:
        return ()
    return tuple(bytes(cert.bytes) for cert in chain.x509List)


def chain_certificates(chain: X509CertChain | None) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in chain_der(chain)]
