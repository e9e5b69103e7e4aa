"""Typed handshake failures, each carrying the DONE status the kernel consumer sees.

Backends raise these; the dispatcher turns them into DONE.  The statuses follow
the reference daemon (tlshd) so NFS and NVMe consumers behave unchanged.
"""

from __future__ import annotations

import errno


class HandshakeError(Exception):
    """A handshake that ended without a session.  `status` is a positive errno."""

    status: int = errno.EIO

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        if status is not None:
            self.status = status

    @property
    def reason(self) -> str:
        return str(self)


class PeerRejected(HandshakeError):
    """Verification or negotiation failed (bad certificate, alert, wrong key)."""

    status = errno.EACCES


class HandshakeTooLarge(PeerRejected):
    """The peer sent more than the handshake read limit (hsd.wire) before the handshake completed.

    EMSGSIZE ("message too long") says what happened in the DONE the kernel
    logs and hands on: NVMe hosts return it as the connect error, the NFS
    client folds every status but 0/EACCES/ETIMEDOUT into EACCES, servers
    just drop the connection.  Never ETIMEDOUT: that tells the NFS client to
    retry, and the same peer would be read again."""

    status = errno.EMSGSIZE


class PeerClosed(HandshakeError):
    """The peer closed or reset the connection mid-handshake (the consumer may retry)."""

    status = errno.ETIMEDOUT


class HandshakeTimeout(HandshakeError):
    """The handshake did not finish before its deadline."""

    status = errno.ETIMEDOUT


class UnknownPskIdentity(HandshakeError):
    """No PSK matched the offered identity (unknown_psk_identity alert)."""

    status = errno.EKEYREJECTED


class Unsupported(HandshakeError):
    """No backend serves this (role, auth mode) or the request asks for something we lack."""

    status = errno.EOPNOTSUPP


class CredentialError(HandshakeError):
    """Certificates, keys or PSKs could not be loaded (configuration or keyring)."""

    status = errno.EIO


class KtlsError(HandshakeError):
    """The kernel refused the session keys (no kTLS, bad crypto_info, ...)."""

    status = errno.EIO
