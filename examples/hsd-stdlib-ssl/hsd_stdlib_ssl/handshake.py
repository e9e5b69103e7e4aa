"""The client handshake: an SSLObject over memory BIOs, fed one TLS record at a time.

Why memory BIOs: the library never touches the socket, so it cannot read
records that belong to kTLS (the server's NewSessionTickets stay in the socket),
and the deadline is enforced by hsd.wire.RecordSocket.
"""

from __future__ import annotations

import ssl

from cryptography.hazmat.primitives.serialization import Encoding

from hsd.context import HandshakeContext
from hsd.errors import CredentialError, PeerRejected
from hsd.session import Session
from hsd.wire import RecordSocket

from .secrets import KeylogPipe


def _context(ctx: HandshakeContext) -> ssl.SSLContext:
    """A fresh SSLContext per handshake: its keylog target is this handshake's own pipe."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    creds = ctx.x509
    if not creds.verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if creds.crls:
        raise CredentialError("the stdlib-ssl backend cannot check CRLs; refusing rather than skipping them")
    if creds.trust is not None:
        context.load_verify_locations(cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in creds.trust))
    else:
        context.load_default_certs()
    return context


def _flush(obj_out: ssl.MemoryBIO, records: RecordSocket) -> None:
    data = obj_out.read()
    if data:
        records.write(data)


def client_handshake(ctx: HandshakeContext) -> Session:
    context = _context(ctx)  # hsd has already refused a verifying request without a peer name
    records = ctx.records()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with KeylogPipe(context) as keylog:
        obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=ctx.peername)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                _flush(outgoing, records)
                incoming.write(records.read_record())
            except ssl.SSLCertVerificationError as exc:
                _flush(outgoing, records)  # our alert, so the peer knows why
                raise PeerRejected(f"server certificate verify failed: {exc.verify_message}") from None
            except ssl.SSLError as exc:
                _flush(outgoing, records)
                raise PeerRejected(f"TLS handshake failed: {exc.reason or exc}") from None
        _flush(outgoing, records)  # our Finished
        secrets = keylog.collect()
    if obj.version() != "TLSv1.3":
        raise PeerRejected(f"negotiated {obj.version()}, kTLS here needs TLS 1.3")
    cipher = obj.cipher()[0]
    peer_cert = obj.getpeercert(binary_form=True)
    return Session(cipher=cipher, tx_secret=secrets.pop("CLIENT_TRAFFIC_SECRET_0"),
                   rx_secret=secrets.pop("SERVER_TRAFFIC_SECRET_0"),
                   peer_certificates=(peer_cert,) if peer_cert else (),
                   details={"library": ssl.OPENSSL_VERSION, "secrets": "keylog pipe"})
