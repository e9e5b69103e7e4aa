"""tlslite's record AEADs and X25519 computed by `cryptography` (OpenSSL) instead of pure Python.

Without M2Crypto or PyCrypto, tlslite-ng 0.8 encrypts every handshake record
with a pure-Python AES/GHASH and does X25519 with Python integers: about half
of a tlslite handshake's CPU (docs/performance.md, "Per-handshake cost").
`cryptography` is already one of hsd's dependencies, so the backend swaps the
two factories tlslite's record layer calls, the X25519 function its key
exchange calls and the two methods that sign and verify with ECDSA keys
(python-ecdsa's point arithmetic); the protocol logic, parsing and state
machine stay tlslite's.

Secrets: the AEAD object keeps tlslite's own key bytearray (`.key`, zeroed by
ObservedConnection.wipe_secrets) and builds the library cipher only on first
use, so the application-traffic keys tlslite derives but never uses (kTLS does)
are never handed to the library.  The pure-Python ciphers this replaces kept
their key schedules as lists of ints, which nothing could wipe either.
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

IMPLEMENTATION = "cryptography"
X25519_BASE = bytes([9]) + bytes(31)


class LazyAEAD:
    """tlslite's AEAD interface (seal/open, the attributes its record layer reads) over a library cipher."""

    isBlockCipher = False
    isAEAD = True
    nonceLength = 12
    tagLength = 16
    implementation = IMPLEMENTATION

    def __init__(self, key: bytearray, name: str, factory: Callable[[Any], Any]) -> None:
        self.key = key
        self.name = name
        self._factory = factory
        self._cipher: Any = None

    def _get(self) -> Any:
        if self._cipher is None:
            self._cipher = self._factory(self.key)
        return self._cipher

    def seal(self, nonce: bytearray, plaintext: bytearray, data: bytearray) -> bytearray:
        if len(nonce) != self.nonceLength:
            raise ValueError("Bad nonce length")
        return bytearray(self._get().encrypt(bytes(nonce), bytes(plaintext), bytes(data)))

    def open(self, nonce: bytearray, ciphertext: bytearray, data: bytearray) -> bytearray | None:
        """The plaintext, or None when the tag does not verify (what tlslite's own ciphers return)."""
        if len(nonce) != self.nonceLength:
            raise ValueError("Bad nonce length")
        if len(ciphertext) < self.tagLength:
            return None
        try:
            return bytearray(self._get().decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
        except InvalidTag:
            return None


def create_aesgcm(key: bytearray, implList: Any = None) -> LazyAEAD:  # noqa: N803  tlslite's signature
    return LazyAEAD(key, "aes128gcm" if len(key) == 16 else "aes256gcm", AESGCM)


def create_aesccm(key: bytearray, implList: Any = None) -> LazyAEAD:  # noqa: N803
    return LazyAEAD(key, "aes128ccm" if len(key) == 16 else "aes256ccm", lambda k: AESCCM(k, tag_length=16))


def create_chacha20(key: bytearray, implList: Any = None) -> LazyAEAD:  # noqa: N803
    return LazyAEAD(key, "chacha20-poly1305", ChaCha20Poly1305)


def x25519(scalar: bytearray, u: bytearray) -> bytearray:
    """RFC 7748 X25519(k, u), as tlslite.utils.x25519.x25519 computes it (the library clamps k too).

    A small-order peer point gives all zeros, exactly like tlslite's own function,
    so tlslite's check still rejects it with its illegal_parameter alert."""
    private = X25519PrivateKey.from_private_bytes(bytes(scalar))
    if bytes(u) == X25519_BASE:
        return bytearray(private.public_key().public_bytes_raw())
    try:
        return bytearray(private.exchange(X25519PublicKey.from_public_bytes(bytes(u))))
    except ValueError:  # the library refuses an all-zero shared secret
        return bytearray(32)


_DIGESTS = {32: hashes.SHA256, 48: hashes.SHA384, 64: hashes.SHA512}


def _curve(key: Any) -> ec.EllipticCurve:
    oid = ".".join(str(part) for part in key.public_key.curve.oid)
    return ec.get_curve_for_oid(x509.ObjectIdentifier(oid))()


def ecdsa_verify(self: Any, signature: bytearray, hash_bytes: bytearray) -> bool:
    """Python_ECDSAKey._verify: a DER signature over a digest, False when it does not verify."""
    digest = _DIGESTS.get(len(hash_bytes))
    if digest is None:  # not a digest length TLS 1.3 uses: python-ecdsa's own (slow) check
        return _python_verify(self, signature, hash_bytes)
    point = self.public_key.pubkey.point
    try:
        public = ec.EllipticCurvePublicNumbers(point.x(), point.y(), _curve(self)).public_key()
        public.verify(bytes(signature), bytes(hash_bytes), ec.ECDSA(Prehashed(digest())))
    except (InvalidSignature, ValueError):
        return False
    return True


def ecdsa_sign(self: Any, data: bytearray, hAlg: str) -> bytearray:  # noqa: N803  tlslite's signature
    """Python_ECDSAKey._sign: a DER ECDSA signature over a digest (random nonce, from OpenSSL)."""
    digest = getattr(hashes, hAlg.upper(), None)
    if digest is None or digest.digest_size != len(data):
        return _python_sign(self, data, hAlg)
    private = ec.derive_private_key(self.private_key.privkey.secret_multiplier, _curve(self))
    return bytearray(private.sign(bytes(data), ec.ECDSA(Prehashed(digest()))))


_python_verify: Callable[..., bool]
_python_sign: Callable[..., bytearray]


def install() -> None:
    """Point tlslite's record layer and key exchange at the functions above (idempotent)."""
    global _python_verify, _python_sign
    from tlslite import keyexchange, recordlayer
    from tlslite.utils.python_ecdsakey import Python_ECDSAKey

    if Python_ECDSAKey._verify is not ecdsa_verify:
        _python_verify, _python_sign = Python_ECDSAKey._verify, Python_ECDSAKey._sign
    Python_ECDSAKey._verify = ecdsa_verify
    Python_ECDSAKey._sign = ecdsa_sign
    recordlayer.createAESGCM = create_aesgcm
    recordlayer.createAESCCM = create_aesccm
    recordlayer.createCHACHA20 = create_chacha20
    keyexchange.x25519 = x25519
