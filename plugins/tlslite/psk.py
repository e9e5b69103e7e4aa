"""TLS 1.3 external-PSK mechanics with tlslite; the PSK policy plugin chose the keys.

Client: offer offer.keys in order; the server must select one of them (a
server that answers with a certificate instead is rejected: nobody verified
it).  Server: the identities the client offers are read from its first
ClientHello before tlslite sees it, resolved with offer.lookup(), and only the
keys found are given to tlslite; none found ends the handshake with
unknown_psk_identity.

Session.remote_auth is the serial of the key tlslite finished with: the
identity the final ServerHello's index names in the ClientHello it answers -
after a HelloRetryRequest that is the second ClientHello, whose list may differ
from the first - mapped back through the PskSelection of the keys tlslite was
given (tlslite itself matches the identity against its pskConfigs the same way).
"""

from __future__ import annotations

from tlslite.constants import TLS_1_3_HRR, ExtensionType
from tlslite.messages import ClientHello, ServerHello

from hsd.context import HandshakeContext
from hsd.errors import HandshakeError, PeerRejected
from hsd.psk import PskOffer, PskSelection, selected_identity, server_first_flight
from hsd.secret import wipe
from hsd.session import Session

from .handshake import HandshakeObserver, run
from .sessions import build_session
from .settings import add_psks, tls13_settings

class PskObserver(HandshakeObserver):
    """Also notes the identity the final ServerHello selected, in the ClientHello it answers.

    hellos_from is who sends ClientHellos: "us" (client) or "peer" (server).
    Each ClientHello replaces the list (a HelloRetryRequest's answer is a new
    hello, possibly with other identities); a HelloRetryRequest selects nothing."""

    def __init__(self, hellos_from: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.hellos_from = hellos_from
        self.hello_identities: tuple[bytes, ...] = ()
        self.identity: bytes | None = None  # what the final ServerHello selected

    def received(self, message: object) -> None:
        self._note(message, "peer")
        super().received(message)

    def sent(self, message: object) -> None:
        self._note(message, "us")
        super().sent(message)

    def _note(self, message: object, sender: str) -> None:
        if isinstance(message, ClientHello) and sender == self.hellos_from:
            ext = message.getExtension(ExtensionType.pre_shared_key)
            self.hello_identities = tuple(bytes(i.identity) for i in ext.identities) if ext is not None else ()
            self.identity = None
        elif isinstance(message, ServerHello) and sender != self.hellos_from and message.random != TLS_1_3_HRR:
            ext = message.getExtension(ExtensionType.pre_shared_key)
            self.identity = selected_identity(self.hello_identities, ext.selected if ext is not None else None)


def psk_mode(session: Session) -> str:
    """psk_dhe_ke when a key exchange group was negotiated alongside the PSK, else psk_ke."""
    return "psk_dhe_ke" if session.group else "psk_ke"


def _wipe(settings) -> None:
    for config in settings.pskConfigs:
        wipe(config[1])


def client_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if not offer.keys:
        raise HandshakeError("PSK client handshake with no key to offer")
    selection = PskSelection()
    for key in offer.keys:
        if not selection.give(key):
            ctx.log.info("not offering PSK serial %d: an earlier key has the same identity", key.serial)
    settings = tls13_settings()
    add_psks(settings, selection.given, offer.modes)
    observer = PskObserver("us", forbid_certificate="server answered our PSK offer with a certificate "
                                                    "(it selected none of our PSKs)")
    try:
        conn, _ = run(ctx, lambda conn: conn.handshakeClientCert(settings=settings), observer)
    finally:
        _wipe(settings)
    if observer.identity is None:
        raise PeerRejected("server did not select one of our PSKs")
    key = selection.chosen(observer.identity)
    session = build_session(conn, "client")
    session.psk_identity = key.identity
    session.details["psk_mode"] = psk_mode(session)
    return session


def server_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    raw, identities, _first = server_first_flight(ctx.records(), offer)
    selection = PskSelection()
    for key in map(offer.lookup, identities):  # type: ignore[arg-type]  (server_first_flight checked it)
        if key is not None:
            selection.give(key)
    known = selection.given
    settings = tls13_settings()
    add_psks(settings, known, offer.modes)
    observer = PskObserver("peer")
    try:
        conn, _ = run(ctx, lambda conn: conn.handshakeServer(settings=settings), observer, first=b"".join(raw))
    finally:
        _wipe(settings)
    key = selection.chosen(observer.identity)
    session = build_session(conn, "server")
    session.psk_identity = key.identity
    session.details["psk_mode"] = psk_mode(session)
    return session
