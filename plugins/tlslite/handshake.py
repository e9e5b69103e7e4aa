"""Run one tlslite TLS 1.3 handshake on the core's socket and turn the outcome into hsd terms.

Certificate modes (client unauth/x509, server x509) and the PSK mechanics share
this driver: a fresh ObservedConnection over a RecordTransport, a
MessageObserver that verifies the peer's certificates (hsd.x509verify) or
checks the PSK selection while the handshake runs, and one place that maps
tlslite's exceptions to hsd's typed failures.
"""

from __future__ import annotations

import logging
from typing import Callable

from tlslite.constants import AlertDescription, ExtensionType
from tlslite.errors import TLSAbruptCloseError, TLSError, TLSLocalAlert, TLSRemoteAlert
from tlslite.messages import Certificate, ServerHello

from hsd import x509verify
from hsd.context import HandshakeContext
from hsd.errors import HandshakeError, PeerClosed, PeerRejected
from hsd.session import Session

from .connection import ObservedConnection, Rejection
from .identity import chain_certificates, tlslite_identity
from .sessions import build_session
from .settings import tls13_settings
from .transport import RecordTransport

log = logging.getLogger("hsd.tlslite")


class HandshakeObserver:
    """Verifies the peer's Certificate message and notes the PSK the ServerHello selected."""

    def __init__(self, check_peer_chain: Callable[[list], None] | None = None, *,
                 forbid_certificate: str | None = None) -> None:
        self.check_peer_chain = check_peer_chain
        self.forbid_certificate = forbid_certificate  # PSK client: a server certificate means no PSK was taken
        self.selected_psk: int | None = None
        self.peer_chain_checked = False

    def received(self, message: object) -> None:
        if isinstance(message, ServerHello):
            self._note_psk(message)
        elif isinstance(message, Certificate):
            if self.forbid_certificate:
                raise Rejection(PeerRejected(self.forbid_certificate), AlertDescription.handshake_failure)
            if self.check_peer_chain is not None:
                try:
                    self.check_peer_chain(chain_certificates(message.cert_chain))
                except PeerRejected as exc:
                    raise Rejection(exc, _alert_for(exc.reason)) from None
                self.peer_chain_checked = True

    def sent(self, message: object) -> None:
        if isinstance(message, ServerHello):
            self._note_psk(message)

    def _note_psk(self, hello: ServerHello) -> None:
        ext = hello.getExtension(ExtensionType.pre_shared_key)
        self.selected_psk = ext.selected if ext is not None else None


def _alert_for(reason: str) -> int:
    if "no certificate" in reason:
        return AlertDescription.certificate_required
    if "expired" in reason:
        return AlertDescription.certificate_expired
    if "revoked" in reason:
        return AlertDescription.certificate_revoked
    if "issuer" in reason:
        return AlertDescription.unknown_ca
    return AlertDescription.bad_certificate


def translate(conn: ObservedConnection, exc: BaseException) -> HandshakeError:
    """tlslite's failure (or ours, raised through it) as the typed error the core reports."""
    if conn.rejection is not None:
        return conn.rejection.error
    if isinstance(exc, HandshakeError):
        return exc
    if isinstance(exc, TLSRemoteAlert):
        name = AlertDescription.toStr(exc.description)
        if exc.description == AlertDescription.unknown_psk_identity:
            return PeerRejected(f"peer rejected our PSK identity (alert {name})")
        return PeerRejected(f"peer sent a fatal alert: {name}")
    if isinstance(exc, TLSAbruptCloseError):
        return PeerClosed("peer closed the connection during the handshake")
    if isinstance(exc, TLSLocalAlert):
        return PeerRejected(f"TLS handshake failed: {exc.message or AlertDescription.toStr(exc.description)}")
    return PeerRejected(f"TLS handshake failed: {type(exc).__name__}: {exc}")


def run(ctx: HandshakeContext, start: Callable[[ObservedConnection], None], observer: HandshakeObserver,
        first: bytes = b"") -> tuple[ObservedConnection, RecordTransport]:
    """Create the connection, run start(conn) (a tlslite handshake call), map failures."""
    transport = RecordTransport(ctx.records(), first)
    conn = ObservedConnection(transport, observer)
    conn.trace = ctx.tls_trace
    try:
        start(conn)
    except (TLSError, HandshakeError, AssertionError, SyntaxError, ValueError) as exc:
        # tlslite parses peer input with asserts and SyntaxError in places; all of it is the peer's doing
        raise translate(conn, exc) from None
    if transport.unread:
        raise PeerRejected(f"peer sent {transport.unread} bytes in the record of its Finished message "
                           "after it; they cannot be handed to kTLS")
    return conn, transport


def client_handshake(ctx: HandshakeContext) -> Session:
    """Client unauth (server verified) or x509 (and we present our certificate)."""
    creds = ctx.x509
    verify = creds.verify_peer
    name = ctx.server_name
    chain = key = None
    if ctx.request.auth == "x509":
        chain, key = tlslite_identity(creds, "client", ctx.log)

    def check(peer_chain: list) -> None:
        x509verify.verify_server_certificate(peer_chain, creds, name)

    observer = HandshakeObserver(check if verify else None)
    if not verify:
        ctx.log.debug("server certificate verification disabled by configuration")
    settings = tls13_settings()
    server_name = name.sni if name is not None else None

    def start(conn: ObservedConnection) -> None:
        conn.handshakeClientCert(chain, key, settings=settings, serverName=server_name)

    conn, _ = run(ctx, start, observer)
    if verify and not observer.peer_chain_checked:
        raise PeerRejected("the server certificate was never verified (tlslite hook not reached)")
    return build_session(conn, "client")


def server_handshake(ctx: HandshakeContext) -> Session:
    """Server x509: always asks for a client certificate, verifies it when sent."""
    creds = ctx.x509
    x509verify.allowed_san_values(tuple(creds.allowed_sans))  # an unusable entry fails before anything is sent
    chain, key = tlslite_identity(creds, "server", ctx.log)
    observer = HandshakeObserver(lambda peer_chain: x509verify.verify_client_certificate(peer_chain, creds))
    settings = tls13_settings()

    def start(conn: ObservedConnection) -> None:
        conn.handshakeServer(certChain=chain, privateKey=key, reqCert=True, settings=settings)

    conn, _ = run(ctx, start, observer)
    if not observer.peer_chain_checked:
        raise PeerRejected("the client certificate was never checked (tlslite hook not reached)")
    session = build_session(conn, "server")
    return x509verify.record_proven_client_name(session, creds.allowed_sans)
