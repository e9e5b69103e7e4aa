"""Drive an OpenSSL handshake over memory BIOs, one TLS record at a time.

OpenSSL never touches the socket: each time it wants more we read the next
piece of the peer's current record - its header, then its body
(hsd.wire.RecordSocket.read_next: deadline-bounded, charged to the handshake
read limit, works on O_NONBLOCK fds) - feed it to the library and send
whatever it wants to send.  OpenSSL sees every header itself, so it answers
an empty, non-TLS or oversized record exactly as it would on its own socket.  So no byte after the peer's
Finished is consumed in user space (it belongs to kTLS), and on a server we
can drop the NewSessionTickets OpenSSL queues once the handshake is complete
(kTLS then starts at record 0, and NVMe hosts never see a ticket).

Reused by the PSK mechanics (plugins/openssl/psk.py), so it knows nothing
about certificates: failures are translated by a caller-supplied function.
"""

from __future__ import annotations

import logging
from typing import Callable

from OpenSSL import SSL

from hsd.errors import HandshakeError, PeerClosed, PeerRejected
from hsd.wire import NOT_TLS, RecordSocket

from .hello import ServerHelloReader

log = logging.getLogger("hsd.openssl")

PENDING_CHUNK = 65536

ErrorTranslator = Callable[[SSL.Error], HandshakeError]


def ssl_error_text(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one readable line ("reason (lib)"; ...)."""
    parts = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        if isinstance(item, tuple) and len(item) == 3:
            parts.append(str(item[2]))
    return "; ".join(parts) or str(exc) or type(exc).__name__


def default_translation(exc: SSL.Error) -> HandshakeError:
    """Any library failure during the handshake is a rejection (alert sent or received)."""
    if isinstance(exc, SSL.ZeroReturnError):
        return PeerClosed("peer closed the TLS session during the handshake")
    return PeerRejected(f"TLS handshake failed: {ssl_error_text(exc)}")


def pending_output(conn: SSL.Connection) -> bytes:
    """Everything OpenSSL has queued in its outgoing memory BIO."""
    out = bytearray()
    while True:
        try:
            chunk = conn.bio_read(PENDING_CHUNK)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _flush(conn: SSL.Connection, records: RecordSocket, hello: ServerHelloReader | None = None) -> int:
    data = pending_output(conn)
    if data:
        if hello is not None:
            hello.feed(data)
        records.write(data)
    return len(data)


def _flush_quietly(conn: SSL.Connection, records: RecordSocket) -> None:
    """Best effort: deliver a fatal alert OpenSSL queued; the failure is reported anyway."""
    try:
        _flush(conn, records)
    except HandshakeError:
        pass


def drive_handshake(conn: SSL.Connection, records: RecordSocket, *, server: bool,
                    translate: ErrorTranslator = default_translation,
                    hello: ServerHelloReader | None = None) -> int:
    """Run conn (created with SSL.Connection(ctx, None)) to the end of the handshake.

    Client: the final flight (Finished) is sent.  Server: what OpenSSL queued
    after the handshake completed (NewSessionTickets) is dropped, never sent.
    Returns the number of post-handshake bytes dropped (0 on a client).
    hello, if given, sees the server's side of the stream (what we send as a
    server, what we read as a client) to learn the group from the ServerHello.
    Raises a HandshakeError (PeerClosed / HandshakeTimeout come from the socket).
    """
    if server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    sent, received = (hello, None) if server else (None, hello)
    while True:
        try:
            conn.do_handshake()
            break
        except (SSL.WantReadError, SSL.WantWriteError):
            _flush(conn, records, sent)
            piece = records.read_next()
            if received is not None:
                received.feed(piece)
            conn.bio_write(piece)
        except SSL.Error as exc:
            _flush_quietly(conn, records)  # OpenSSL's own alert, if it queued one
            if records.saw_foreign_header:
                raise PeerRejected(f"{NOT_TLS} ({ssl_error_text(exc)})") from None
            raise translate(exc) from None
    dropped = 0
    if server:
        dropped = len(pending_output(conn))
        if dropped:
            log.debug("dropped %d bytes of post-handshake messages (session tickets)", dropped)
    else:
        _flush(conn, records)
    return dropped
