"""Certificate-based TLS 1.3 handshakes (client unauth/x509, server x509) with OpenSSL.

Contexts (trust policy, our identity, verify mode) are shared between requests
that would build identical ones (plugins/openssl/contexts.py); everything of
one handshake - peer name check, SNI, secret capture, verification outcome,
[debug] tls tracer - lives on its SSL.Connection, reached from the context's
callbacks through conn.get_app_data() (the tracer through trace.attach()).
No session cache, no tickets.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL

from hsd import x509verify
from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials
from hsd.errors import HandshakeError, PeerClosed, PeerRejected
from hsd.session import Session

from . import trace
from .contexts import context_key, contexts
from .driver import ErrorTranslator, drive_handshake, ssl_error_text
from .identity import install_identity
from .secrets import TrafficSecrets, route_keylog
from .sessions import build_session, group_reader
from .suites import tls13_context
from .verification import VerifyOutcome, install_trust, pin_peer_name, routed_verify


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


@dataclass
class ConnectionState:
    """What the shared context's callbacks find on one connection (conn.get_app_data())."""

    secrets: TrafficSecrets
    outcome: VerifyOutcome


def _run(ctx: HandshakeContext, context: SSL.Context, outcome: VerifyOutcome, prepare=None) -> Session:
    role = ctx.request.role
    secrets = TrafficSecrets()
    hello = group_reader()
    conn = SSL.Connection(context, None)
    conn.set_app_data(ConnectionState(secrets, outcome))
    trace.attach(conn, ctx.tls_trace)
    try:
        if prepare is not None:
            prepare(conn)
        dropped = drive_handshake(conn, ctx.records(), server=role == "server",
                                  translate=_translator(outcome), hello=hello)
        session = build_session(conn, secrets, role, hello)
    except BaseException:
        secrets.wipe()
        raise
    finally:
        conn.set_app_data(None)
    if dropped:
        session.details["dropped_post_handshake_bytes"] = str(dropped)
    return session


def _shared_context(verify_mode: int, traced: bool) -> SSL.Context:
    """A TLS 1.3 context whose callbacks route to each connection's own state."""
    context = tls13_context()
    route_keylog(context)
    if traced:
        trace.install(context)
    if verify_mode == SSL.VERIFY_NONE:
        context.set_verify(SSL.VERIFY_NONE)
    else:
        context.set_verify(verify_mode, routed_verify)
    return context


def _client_context(ctx: HandshakeContext, creds: X509Credentials) -> SSL.Context:
    context = _shared_context(SSL.VERIFY_PEER if creds.verify_peer else SSL.VERIFY_NONE, ctx.tls_trace is not None)
    if creds.verify_peer:
        install_trust(context, creds)
    if ctx.request.auth == "x509":
        install_identity(context, creds, "client")
    return context


def _server_context(creds: X509Credentials, traced: bool) -> SSL.Context:
    mode = SSL.VERIFY_PEER
    # an allow-list of client names is meaningless if a client can send no certificate at all
    if creds.require_peer_cert or creds.allowed_sans:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context = _shared_context(mode, traced)
    install_identity(context, creds, "server")
    install_trust(context, creds)
    return context


def client_handshake(ctx: HandshakeContext) -> Session:
    """Client unauth (server verified) or x509 (and we present our certificate)."""
    creds = ctx.x509
    verify = creds.verify_peer
    name = ctx.server_name
    if not verify:
        ctx.log.debug("server certificate verification disabled by configuration")
    context = contexts.obtain(context_key(ctx, creds), lambda: _client_context(ctx, creds))
    outcome = VerifyOutcome("server", [], enforce=True)

    def prepare(conn: SSL.Connection) -> None:
        if name is not None:
            pin_peer_name(conn, name, check=verify)

    return _run(ctx, context, outcome, prepare)


def server_handshake(ctx: HandshakeContext) -> Session:
    """Server x509: always asks for a client certificate, verifies it when sent."""
    creds = ctx.x509
    outcome = VerifyOutcome("client", creds.allowed_sans, enforce=creds.verify_peer)
    context = contexts.obtain(context_key(ctx, creds), lambda: _server_context(creds, ctx.tls_trace is not None))
    session = _run(ctx, context, outcome)
    return x509verify.record_proven_client_name(session, creds.allowed_sans)
