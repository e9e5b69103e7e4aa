"""TLS 1.3 external-PSK mechanics on OpenSSL (client and server), for the PSK policy plugin.

pyOpenSSL has no PSK API, so this uses the OpenSSL bindings shipped with
cryptography: the TLS 1.3 session callbacks hand OpenSSL an SSL_SESSION that
carries the PSK as its master key and a TLS 1.3 suite of the PSK's hash.  The
handshake itself runs over the shared memory-BIO driver (one record at a time,
no session tickets sent).  Each handshake has its own SSL.Context, so a cffi
callback closes over exactly one handshake's state, which keeps the callbacks
and the buffers OpenSSL points into alive until the handshake is over.

remote-auth is read from OpenSSL's own final state: the identity of the last
session a callback handed it (after a HelloRetryRequest, the one found for the
second ClientHello), checked against the master key of the session OpenSSL
holds when it reports the handshake done - before a NewSessionTicket would
replace that session - through hsd.psk.PskSelection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from hsd.context import HandshakeContext
from hsd.errors import CredentialError, HandshakeError, PeerRejected, UnknownPskIdentity
from hsd.hookspecs import Role, hookimpl
from hsd.psk import PskKey, PskOffer, PskSelection, server_first_flight
from hsd.secret import wipe
from hsd.session import Session

from . import trace
from .driver import default_translation, drive_handshake, ssl_error_text
from .secrets import TrafficSecrets
from .hello import ServerHelloReader
from .sessions import build_session
from .suites import KTLS_SUITES, tls13_context

log = logging.getLogger("hsd.openssl.psk")

TLS1_3_VERSION = 0x0304
OP_ALLOW_NO_DHE_KEX = 1 << 10
OP_PREFER_NO_DHE_KEX = 1 << 35  # OpenSSL 3.3+: a server that may choose, chooses psk_ke
# The suite stored in the PSK's session fixes the hash; the offered suites must share it.
SESSION_CIPHER = {"sha256": b"\x13\x01", "sha384": b"\x13\x02"}
SUITES = {
    "sha256": tuple(suite for suite in KTLS_SUITES if suite.endswith("SHA256")),
    "sha384": tuple(suite for suite in KTLS_SUITES if suite.endswith("SHA384")),
}
MAX_MASTER_KEY = 48  # SSL_MAX_MASTER_KEY_LENGTH


@dataclass
class _Handshake:
    """One handshake's state, reachable from its callbacks."""

    selection: PskSelection = field(default_factory=PskSelection)  # every key handed to OpenSSL
    selected: bytes | None = None  # identity of the last session a callback handed OpenSSL
    finished_with: PskKey | None = None  # the key of OpenSSL's session at handshake done
    final_error: HandshakeError | None = None  # why finished_with could not be established
    secrets: TrafficSecrets = field(default_factory=TrafficSecrets)
    pinned: list[Any] = field(default_factory=list)  # cffi callbacks and buffers OpenSSL points into
    failure: BaseException | None = None



def _psk_session(ssl: Any, key: PskKey) -> Any:
    """A fresh SSL_SESSION holding the PSK; OpenSSL takes ownership when a callback returns it."""
    cipher = lib.SSL_CIPHER_find(ssl, SESSION_CIPHER[key.hash])
    session = lib.Cryptography_SSL_SESSION_new()
    if cipher == ffi.NULL or session == ffi.NULL:
        raise CredentialError("OpenSSL cannot build a PSK session")
    if not (lib.SSL_SESSION_set1_master_key(session, ffi.from_buffer(key.secret), len(key.secret))
            and lib.SSL_SESSION_set_cipher(session, cipher)
            and lib.SSL_SESSION_set_protocol_version(session, TLS1_3_VERSION)):
        lib.SSL_SESSION_free(session)
        raise CredentialError(f"OpenSSL refused the PSK for '{key.identity.decode(errors='replace')}'")
    return session


def _session_key(conn: SSL.Connection, state: _Handshake) -> PskKey:
    """The key whose secret OpenSSL's current session holds, under the identity last handed to it."""
    session = lib.SSL_get_session(conn._ssl)
    if session == ffi.NULL:
        raise PeerRejected("OpenSSL finished the handshake without a session")
    buf = ffi.new("unsigned char[]", MAX_MASTER_KEY)
    try:
        length = lib.SSL_SESSION_get_master_key(session, buf, MAX_MASTER_KEY)
        return state.selection.chosen(state.selected, ffi.buffer(buf, length))
    finally:
        wipe(ffi.buffer(buf, MAX_MASTER_KEY))


def _note_final_session(context: SSL.Context, state: _Handshake) -> None:
    """At SSL_CB_HANDSHAKE_DONE the session is still the PSK's (a server's tickets replace it right after)."""

    def on_info(conn: SSL.Connection, where: int, _ret: int) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE or state.finished_with or state.final_error:
            return
        try:
            state.finished_with = _session_key(conn, state)
        except HandshakeError as exc:
            state.final_error = exc

    context.set_info_callback(on_info)


def _finished_key(conn: SSL.Connection, state: _Handshake) -> PskKey:
    """After drive_handshake: the key OpenSSL finished with, or why there is none."""
    if state.final_error is not None:
        raise state.final_error
    if state.finished_with is None or not lib.SSL_session_reused(conn._ssl):
        raise PeerRejected("handshake completed without the PSK")
    return state.finished_with


def _context(state: _Handshake, hash_name: str, modes: tuple[str, ...], server: bool) -> SSL.Context:
    context = tls13_context(SUITES[hash_name])
    options = 0
    if "psk_ke" in modes:
        options |= OP_ALLOW_NO_DHE_KEX
        if server and "psk_dhe_ke" not in modes:
            options |= OP_PREFER_NO_DHE_KEX
    if options:
        context.set_options(options)
    if not server:  # a server that declines the PSK and shows a certificate must fail, not pass unverified
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
    state.secrets.attach(context)
    _note_final_session(context, state)
    return context


def _connection(context: SSL.Context, ctx: HandshakeContext) -> SSL.Connection:
    """The handshake's connection on its own context, traced when [debug] tls asks for it."""
    if ctx.tls_trace is not None:
        trace.install(context)
    conn = SSL.Connection(context, None)
    trace.attach(conn, ctx.tls_trace)
    return conn


def _translate(exc: SSL.Error) -> HandshakeError:
    if "unknown psk identity" in ssl_error_text(exc).lower():
        return UnknownPskIdentity("server does not know the PSK identity (unknown_psk_identity alert)")
    return default_translation(exc)


def _session(conn: SSL.Connection, state: _Handshake, role: str, dropped: int,
             hello: ServerHelloReader) -> Session:
    key = _finished_key(conn, state)
    session = build_session(conn, state.secrets, role, hello)
    session.psk_identity = key.identity
    session.details.update(psk_identity=key.identity.decode(errors="replace"),
                           psk_hash=key.hash,
                           psk_mode="psk_dhe_ke" if session.group else "psk_ke")
    if dropped:
        session.details["dropped_post_handshake_bytes"] = str(dropped)
    return session


def _client(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if not offer.keys:
        raise CredentialError("no PSK to offer")
    key = offer.keys[0]
    if len(offer.keys) > 1:  # OpenSSL puts one external PSK in a ClientHello
        log.info("offering PSK '%s'; %d more identities not offered (one per ClientHello)",
                 key.identity.decode(errors="replace"), len(offer.keys) - 1)
    state = _Handshake()
    state.selection.give(key)
    identity = ffi.new("unsigned char[]", key.identity)
    state.pinned.append(identity)

    @ffi.callback("int(SSL *, EVP_MD *, unsigned char **, size_t *, SSL_SESSION **)")
    def use_session(ssl: Any, _md: Any, id_out: Any, idlen_out: Any, sess_out: Any) -> int:
        try:
            sess_out[0] = _psk_session(ssl, key)
            id_out[0] = identity
            idlen_out[0] = len(key.identity)
            state.selected = key.identity
            return 1
        except BaseException as exc:  # an exception must not cross into C
            state.failure = exc
            return 0

    state.pinned.append(use_session)
    context = _context(state, key.hash, offer.modes, server=False)
    lib.SSL_CTX_set_psk_use_session_callback(context._context, use_session)
    conn = _connection(context, ctx)
    records = ctx.records()
    server_hello = ServerHelloReader()
    try:
        try:
            drive_handshake(conn, records, server=False, translate=_translate, hello=server_hello)
        except HandshakeError:
            if state.failure is not None:
                raise state.failure from None
            raise
        if not lib.SSL_session_reused(conn._ssl):
            raise PeerRejected("server did not accept the PSK")
        return _session(conn, state, "client", dropped=0, hello=server_hello)
    except BaseException:
        state.secrets.wipe()  # on success the Session owns them and the core wipes them
        raise


def _server(ctx: HandshakeContext, offer: PskOffer) -> Session:
    records = ctx.records()
    first_flight, _identities, chosen = server_first_flight(records, offer)
    lookup = offer.lookup
    assert lookup is not None  # server_first_flight refused an offer without one
    state = _Handshake()
    hash_name = chosen.hash

    @ffi.callback("int(SSL *, unsigned char *, size_t, SSL_SESSION **)")
    def find_session(ssl: Any, identity: Any, identity_len: int, sess_out: Any) -> int:
        try:
            name = bytes(ffi.buffer(identity, identity_len))
            key = lookup(name)  # the offer remembers each identity's answer
            if key is None or key.hash != hash_name:
                sess_out[0] = ffi.NULL  # not this one: OpenSSL tries the next identity
                return 1
            if not state.selection.give(key):
                sess_out[0] = ffi.NULL  # another key holds this identity already: it cannot be told apart
                return 1
            sess_out[0] = _psk_session(ssl, key)
            state.selected = name
            return 1
        except BaseException as exc:  # an exception must not cross into C
            state.failure = exc
            return 0

    state.pinned.append(find_session)
    context = _context(state, hash_name, offer.modes, server=True)
    lib.SSL_CTX_set_psk_find_session_callback(context._context, find_session)
    conn = _connection(context, ctx)
    server_hello = ServerHelloReader()
    try:
        for record in first_flight:
            conn.bio_write(record)
        try:
            dropped = drive_handshake(conn, records, server=True, translate=_translate, hello=server_hello)
        except HandshakeError:
            if state.failure is not None:
                raise state.failure from None
            raise
        return _session(conn, state, "server", dropped=dropped, hello=server_hello)
    except BaseException:
        state.secrets.wipe()  # on success the Session owns them and the core wipes them
        raise


@hookimpl
def hsd_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if ctx.mode.role is Role.SERVER:
        return _server(ctx, offer)
    return _client(ctx, offer)
