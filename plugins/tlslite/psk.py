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
from tlslite.utils.codec import Parser

from hsd.context import HandshakeContext
from hsd.errors import HandshakeError, PeerRejected, UnknownPskIdentity
from hsd.peerlog import truncate
from hsd.psk import PskOffer, PskSelection, selected_identity
from hsd.secret import wipe
from hsd.session import Session
from hsd.wire import RecordSocket

from .handshake import HandshakeObserver, run
from .sessions import build_session
from .settings import add_psks, tls13_settings

HANDSHAKE_RECORD = 22
UNKNOWN_PSK_IDENTITY_ALERT = bytes([21, 3, 3, 0, 2, 2, 115])  # plaintext fatal alert, before any keys
MAX_CLIENT_HELLO = 1 << 17


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
    session.remote_auth = (key.serial,)
    session.details["psk_mode"] = psk_mode(session)
    return session


def _read_client_hello(records: RecordSocket) -> tuple[bytes, bytes]:
    """(raw records, ClientHello message) - as many plaintext handshake records as it spans."""
    raw = bytearray()
    message = bytearray()
    while True:
        record = records.read_record()
        raw += record
        if record[0] != HANDSHAKE_RECORD:
            raise PeerRejected("peer did not start with a ClientHello")
        message += record[5:]
        if len(message) >= 4:
            length = 4 + int.from_bytes(message[1:4], "big")
            if message[0] != 1 or length > MAX_CLIENT_HELLO:
                raise PeerRejected("peer did not start with a ClientHello")
            if len(message) >= length:
                return bytes(raw), bytes(message[:length])


def offered_identities(message: bytes) -> list[bytes]:
    """The PSK identities of a ClientHello message, in the client's order."""
    try:
        hello = ClientHello().parse(Parser(bytearray(message[1:])))  # parse() wants the 3-byte length
    except (SyntaxError, ValueError, AssertionError, IndexError) as exc:
        raise PeerRejected(f"malformed ClientHello: {truncate(str(exc))}") from None
    ext = hello.getExtension(ExtensionType.pre_shared_key)
    return [bytes(ident.identity) for ident in ext.identities] if ext is not None else []


def server_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if offer.lookup is None:
        raise HandshakeError("PSK server handshake without an identity lookup")
    records = RecordSocket(ctx.sock, ctx.deadline)
    raw, message = _read_client_hello(records)
    identities = offered_identities(message)
    selection = PskSelection()
    for identity in identities:
        key = offer.lookup(identity)
        if key is not None:
            selection.give(key)
    known = selection.given
    if not known:
        try:
            records.write(UNKNOWN_PSK_IDENTITY_ALERT)
        except HandshakeError:
            pass
        # the identities themselves are the PSK policy's to log (bounded, rate-limited per peer)
        raise UnknownPskIdentity(f"client offered {len(identities)} unknown PSK identities")
    settings = tls13_settings()
    add_psks(settings, known, offer.modes)
    observer = PskObserver("peer")
    try:
        conn, _ = run(ctx, lambda conn: conn.handshakeServer(settings=settings), observer, first=raw)
    finally:
        _wipe(settings)
    key = selection.chosen(observer.identity)
    session = build_session(conn, "server")
    session.remote_auth = (key.serial,)
    session.details["psk_mode"] = psk_mode(session)
    return session
