"""TLS 1.3 external-PSK mechanics with tlslite; the PSK policy plugin chose the keys.

Client: offer offer.keys in order; the server must select one of them (a
server that answers with a certificate instead is rejected: nobody verified
it).  Server: the identities the client offers are read from its ClientHello
before tlslite sees it, resolved with offer.lookup(), and only the keys found
are given to tlslite; none found ends the handshake with unknown_psk_identity.
Session.remote_auth is the serial of the key the ServerHello selected.
"""

from __future__ import annotations

from tlslite.messages import ClientHello
from tlslite.constants import ExtensionType
from tlslite.utils.codec import Parser

from hsd.context import HandshakeContext
from hsd.errors import HandshakeError, PeerRejected, UnknownPskIdentity
from hsd.psk import PskKey, PskOffer
from hsd.session import Session
from hsd.wire import RecordSocket

from .handshake import HandshakeObserver, run
from .sessions import build_session
from .settings import add_psks, tls13_settings

HANDSHAKE_RECORD = 22
UNKNOWN_PSK_IDENTITY_ALERT = bytes([21, 3, 3, 0, 2, 2, 115])  # plaintext fatal alert, before any keys
MAX_CLIENT_HELLO = 1 << 17


def psk_mode(session: Session) -> str:
    """psk_dhe_ke when a key exchange group was negotiated alongside the PSK, else psk_ke."""
    return "psk_dhe_ke" if session.group else "psk_ke"


def _wipe(settings) -> None:
    for config in settings.pskConfigs:
        secret = config[1]
        secret[:] = bytes(len(secret))


def client_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if not offer.keys:
        raise HandshakeError("PSK client handshake with no key to offer")
    settings = tls13_settings()
    add_psks(settings, offer.keys, offer.modes)
    observer = HandshakeObserver(forbid_certificate="server answered our PSK offer with a certificate "
                                                    "(it selected none of our PSKs)")
    try:
        conn, _ = run(ctx, lambda conn: conn.handshakeClientCert(settings=settings), observer)
    finally:
        _wipe(settings)
    if observer.selected_psk is None or not 0 <= observer.selected_psk < len(offer.keys):
        raise PeerRejected("server did not select one of our PSKs")
    session = build_session(conn, "client")
    session.remote_auth = (offer.keys[observer.selected_psk].serial,)
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
        raise PeerRejected(f"malformed ClientHello: {exc}") from None
    ext = hello.getExtension(ExtensionType.pre_shared_key)
    return [bytes(ident.identity) for ident in ext.identities] if ext is not None else []


def server_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if offer.lookup is None:
        raise HandshakeError("PSK server handshake without an identity lookup")
    records = RecordSocket(ctx.sock, ctx.deadline)
    raw, message = _read_client_hello(records)
    identities = offered_identities(message)
    known: list[PskKey] = []
    for identity in identities:
        key = offer.lookup(identity)
        if key is not None and key not in known:
            known.append(key)
    if not known:
        try:
            records.write(UNKNOWN_PSK_IDENTITY_ALERT)
        except HandshakeError:
            pass
        shown = ", ".join(repr(i) for i in identities) or "none"
        raise UnknownPskIdentity(f"no PSK matches the client's identities ({shown})")
    settings = tls13_settings()
    add_psks(settings, known, offer.modes)
    observer = HandshakeObserver()
    try:
        conn, _ = run(ctx, lambda conn: conn.handshakeServer(settings=settings), observer, first=raw)
    finally:
        _wipe(settings)
    if observer.selected_psk is None or not 0 <= observer.selected_psk < len(identities):
        raise PeerRejected("handshake finished without a PSK")
    chosen = identities[observer.selected_psk]
    session = build_session(conn, "server")
    session.remote_auth = (next(key.serial for key in known if key.identity == chosen),)
    session.details["psk_mode"] = psk_mode(session)
    return session
