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

import logging

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
    return tuple(s for s in (_cert_key(der, request.peername or "") for der in certs) if s)


def _cert_key(der: bytes, peername: str) -> int:
    description = f"TLS x509 {peername}".strip()
    for key_type in ("asymmetric", "user"):
        try:
            return keyring.add_key(key_type, description, der, keyring.KEY_SPEC_USER_KEYRING)
        except keyring.KeyringError as exc:
            log.debug("cannot store peer certificate as %s key: %s", key_type, exc.strerror)
    return 0
