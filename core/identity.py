"""The peer identity reported in DONE's remote-auth, as the reference daemon reports it.

- PSK: the serial of the key used (set by the PSK plugin in Session.remote_auth).
- client x509/unauth: the server's verified leaf certificate as one "asymmetric"
  key in root's user keyring, described "TLS x509 <peername>"; when the kernel
  cannot parse the certificate's key algorithm (add_key fails), a "user" key
  with the DER instead, so the consumer still sees a non-zero identity.
  Only the leaf: the kernel hands its consumer one peerid (the first
  remote-auth), which names the server; intermediates and roots are not its
  identity and are not stored.  (tlshd adds every certificate under the
  leaf's description, so only the last one sent stays linked - the leaf's key,
  the one it reports first, is gone.)  In unauth mode tlshd reports nothing;
  hsd reports the verified leaf there too, which unauth consumers ignore.
- client with verification off (verify_server = false): nothing is stored and
  no remote-auth is reported.  tlshd creates peer keys only in its certificate
  verification callback, after the chain verified; an unverified certificate
  is the peer's claim, not an identity, and must not land in a keyring.
- server x509: the kernel must not parse client certificates, so each verified
  client certificate is reported as the sentinel 0xFFFFFFFF (UINT_MAX), which
  NFSD reads as "peer authenticated"; no client certificate -> no remote-auth.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from . import keyring
from .protocol import HandshakeRequest, MessageType
from .session import Session

log = logging.getLogger(__name__)

SERVER_X509_SENTINEL = 0xFFFFFFFF
MAX_IDENTITIES = 5


def remote_auth_for(request: HandshakeRequest, session: Session, verified: bool) -> tuple[int, ...]:
    """The remote-auth serials for a successful handshake; verified: the backend verified the peer's chain."""
    certs = session.peer_certificates[:MAX_IDENTITIES]
    if not certs:
        return ()
    if request.message_type == MessageType.SERVERHELLO:
        return tuple(SERVER_X509_SENTINEL for _ in certs)
    if not verified:
        return ()
    serial = _cert_key(certs[0], f"TLS x509 {request.peername or ''}".strip())
    return (serial,) if serial else ()


# Where peer-certificate keys go: root's user keyring, as tlshd does.  The simulator, the demo and the
# test kit switch to this process's own keyring (keep_peer_keys_private): nothing lands in root's
# real user keyring, and what they add goes with the process.
_peer_ring = keyring.KEY_SPEC_USER_KEYRING


def keep_peer_keys_private() -> None:
    """Store peer-certificate keys in this process's keyring instead of root's user keyring (not for the kernel)."""
    global _peer_ring
    _peer_ring = keyring.KEY_SPEC_PROCESS_KEYRING


_known: dict[tuple[str, bytes], tuple[int, str]] = {}  # (description, digest) -> (serial, key type)
_known_lock = threading.Lock()


def _cert_key(der: bytes, description: str) -> int:
    """Serial of a key holding this certificate; add_key only when no linked key holds it yet.

    The kernel parses an "asymmetric" payload on every add_key, so reconnecting
    to the same server re-uses the key still linked in the user keyring.
    """
    cache_key = (description, hashlib.sha256(der).digest())
    with _known_lock:
        known = _known.get(cache_key)
    if known:
        serial, key_type = known
        try:
            if keyring.search(_peer_ring, key_type, description) == serial:
                return serial
        except keyring.KeyringError:
            pass
    serial, key_type = _add_cert_key(der, description)
    if serial:
        with _known_lock:
            for stale in [k for k in _known if k[0] == description]:  # add_key replaced its payload
                del _known[stale]
            if len(_known) > 1024:
                _known.clear()
            _known[cache_key] = (serial, key_type)
    return serial


def _add_cert_key(der: bytes, description: str) -> tuple[int, str]:
    for key_type in ("asymmetric", "user"):
        try:
            return keyring.add_key(key_type, description, der, _peer_ring), key_type
        except keyring.KeyringError as exc:
            log.debug("cannot store peer certificate as %s key: %s", key_type, exc.strerror)
    return 0, ""
