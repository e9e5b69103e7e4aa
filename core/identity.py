"""The peer identity reported in DONE's remote-auth, as the reference daemon reports it.

- PSK: the serial of the key used (set by the PSK plugin in Session.remote_auth).
- client x509/unauth: each server certificate as an "asymmetric" key in the user
  keyring, described "TLS x509 <peername>"; when the kernel cannot parse the
  certificate's key algorithm (add_key fails), a "user" key with the DER instead,
  so the consumer still sees a non-zero identity.
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


def remote_auth_for(request: HandshakeRequest, session: Session) -> tuple[int, ...]:
    certs = session.peer_certificates[:MAX_IDENTITIES]
    if not certs:
        return ()
    if request.message_type == MessageType.SERVERHELLO:
        return tuple(SERVER_X509_SENTINEL for _ in certs)
    peer = request.peername or ""
    # the leaf is described exactly like the reference daemon's key; the rest of the chain
    # gets its own keys (one shared description would make every add_key overwrite the leaf)
    descriptions = [f"TLS x509 {peer}".strip()] + [f"TLS x509 {peer} #{i}".strip() for i in range(1, len(certs))]
    return tuple(s for s in (_cert_key(der, d) for der, d in zip(certs, descriptions)) if s)


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
            if keyring.search(keyring.KEY_SPEC_USER_KEYRING, key_type, description) == serial:
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
            return keyring.add_key(key_type, description, der, keyring.KEY_SPEC_USER_KEYRING), key_type
        except keyring.KeyringError as exc:
            log.debug("cannot store peer certificate as %s key: %s", key_type, exc.strerror)
    return 0, ""
