"""Certificate-based TLS 1.3 handshakes (client unauth/x509, server x509) with OpenSSL.

One fresh SSL.Context per handshake: the trust policy, our identity and the
secret capture belong to this request only, and nothing leaks between
requests (no session cache, no tickets).
"""

from __future__ import annotations

from OpenSSL import SSL

from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials
from hsd.errors import CredentialError, HandshakeError, PeerClosed, PeerRejected
from hsd.session import Session
from hsd.wire import RecordSocket

from .driver import ErrorTranslator, drive_handshake, ssl_error_text
from .identity import install_identity
from .secrets import TrafficSecrets
from .sessions import build_session
from .suites import tls13_context
from .verification import VerifyOutcome, install_trust, pin_peer_name


def _translator(outcome: VerifyOutcome) -> ErrorTranslator:
    """Map an OpenSSL failure to a typed error, naming the verification reason when there is one."""

    def translate(exc: SSL.Error) -> HandshakeError:
        text = ssl_error_text(exc)
        if isinstance(exc, SSL.ZeroReturnError):
            return PeerClosed("peer closed the TLS session during the handshake")
        if outcome.reason:
            return outcome.rejection(text)
        if "peer did not return a certificate" in text:
            return PeerRejected("client sent no certificate, and one is required")
        if "unsupported protocol" in text or "protocol version" in text:
            return PeerRejected(f"peer does not speak TLS 1.3 ({text})")
        if "alert" in text:
            return PeerRejected(f"peer sent a fatal alert: {text}")
        return PeerRejected(f"TLS handshake failed: {text}")

    return translate


def _trace(context: SSL.Context, ctx: HandshakeContext) -> None:
    """[debug] tls > 0: log the handshake's state machine (no secrets in state names)."""
    if ctx.config.tls_debug <= 0:
        return
    role = ctx.request.role

    def on_info(conn: SSL.Connection, where: int, ret: int) -> None:
        ctx.log.debug("openssl %s: %s", role, conn.get_state_string().decode(errors="replace"))

    context.set_info_callback(on_info)


def _run(ctx: HandshakeContext, context: SSL.Context, secrets: TrafficSecrets, outcome: VerifyOutcome,
         prepare=None) -> Session:
    role = ctx.request.role
    _trace(context, ctx)
    conn = SSL.Connection(context, None)
    if prepare is not None:
        prepare(conn)
    try:
        dropped = drive_handshake(conn, RecordSocket(ctx.sock, ctx.deadline), server=role == "server",
                                  translate=_translator(outcome))
        session = build_session(conn, secrets, role)
    except BaseException:
        secrets.wipe()
        raise
    if dropped:
        session.details["dropped_post_handshake_bytes"] = str(dropped)
    return session


def client_handshake(ctx: HandshakeContext) -> Session:
    """Client unauth (server verified) or x509 (and we present our certificate)."""
    creds = ctx.x509 or X509Credentials()
    verify = creds.verify_peer
    if verify and not ctx.peername:
        raise PeerRejected("client handshake without a peer name: the server certificate cannot be "
                           "checked (hsd does no reverse DNS lookup; the kernel consumer must pass one)")
    context = tls13_context()
    secrets = TrafficSecrets()
    secrets.attach(context)
    outcome = VerifyOutcome("server", [], enforce=True)
    if verify:
        install_trust(context, creds)
        context.set_verify(SSL.VERIFY_PEER, outcome.callback)
    else:
        context.set_verify(SSL.VERIFY_NONE)
        ctx.log.debug("server certificate verification disabled by configuration")
    if ctx.request.auth == "x509":
        install_identity(context, creds, "client")

    def prepare(conn: SSL.Connection) -> None:
        if ctx.peername:
            pin_peer_name(conn, ctx.peername, check=verify)

    return _run(ctx, context, secrets, outcome, prepare)


def server_handshake(ctx: HandshakeContext) -> Session:
    """Server x509: always asks for a client certificate, verifies it when sent."""
    creds = ctx.x509
    if creds is None:
        raise CredentialError("server x509 handshake but no server credentials were loaded")
    context = tls13_context()
    secrets = TrafficSecrets()
    secrets.attach(context)
    install_identity(context, creds, "server")
    install_trust(context, creds)
    mode = SSL.VERIFY_PEER
    # an allow-list of client names is meaningless if a client can send no certificate at all
    if creds.require_peer_cert or creds.allowed_sans:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    outcome = VerifyOutcome("client", creds.allowed_sans, enforce=creds.verify_peer)
    context.set_verify(mode, outcome.callback)
    return _run(ctx, context, secrets, outcome)
