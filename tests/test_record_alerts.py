"""Through hsd a peer gets the answer the TLS library alone gives to odd records (issue 16, point 14).

hsd.wire used to refuse zero-length records, SSLv2 hellos and other non-TLS
headers itself and close, so the peer got no alert where RFC 8446 (5, 5.1)
and the libraries send one.  Each case here is first run against the plain
library - a pyOpenSSL server or a tlslite-ng server, configured like hsd's, on
its own socketpair - and then the same bytes go to the daemon's server on
that backend: the records the peer gets back must have the same shape (alert
records byte for byte, other records by content type), and the request gets
exactly one DONE with the status that answer means.

What the libraries do (established by the reference runs below, OpenSSL 4.0
in cryptography 50, tlslite-ng 0.8.2): a zero-length application_data record
before the hello is done -> both send unexpected_message; a zero-length
handshake record -> tlslite sends unexpected_message, OpenSSL ignores it and
goes on with the handshake; an SSLv2 ClientHello -> tlslite sends
protocol_version, OpenSSL closes without an alert.
"""

from __future__ import annotations

import socket

import pytest
from cryptography.hazmat.backends.openssl.backend import backend
from OpenSSL import SSL
from tlslite import TLSConnection

from hsd.errors import HandshakeTimeout, PeerRejected
from hsd_kit.soak import tcp_pair
from hsd_kit.pki import TestPki, x509_credentials
from hsd_openssl.suites import tls13_context
from hsd_tlslite.identity import tlslite_identity
from hsd_tlslite.settings import tls13_settings

from test_hostile_peers import BACKENDS, WAIT, daemon, pki, record  # noqa: F401 (pki is a fixture)

ALERT, HANDSHAKE, APPLICATION_DATA = 21, 22, 23
UNEXPECTED_MESSAGE_ALERT = bytes.fromhex("15 03 03 00 02 02 0a")
PROTOCOL_VERSION_ALERT = bytes.fromhex("15 03 03 00 02 02 46")
OPENSSL_VERSION = backend.openssl_version_number()  # the OpenSSL hsd's openssl backend runs on
FRAGMENT = 64


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello record from OpenSSL (memory BIOs, never sent anywhere)."""
    conn = SSL.Connection(tls13_context(), None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def interleaved(between: bytes) -> bytes:
    """The ClientHello in FRAGMENT-byte handshake records with `between` after each but the last."""
    body = client_hello()[5:]
    return between.join(record(HANDSHAKE, body[i:i + FRAGMENT]) for i in range(0, len(body), FRAGMENT))


def sslv2_client_hello() -> bytes:
    """An SSLv2-compatible ClientHello (RFC 5246 appendix E.2) offering TLS 1.2 and three suites."""
    ciphers = bytes.fromhex("00002f 000035 0000ff")
    challenge = bytes(range(16))
    msg = (b"\x01\x03\x03" + len(ciphers).to_bytes(2, "big") + b"\x00\x00" + len(challenge).to_bytes(2, "big")
           + ciphers + challenge)
    return bytes([0x80 | len(msg) >> 8, len(msg) & 0xFF]) + msg


# A zero-length application_data record with padding (RFC 8446 5.4) as it is on the wire: the
# encrypted TLSInnerPlaintext of no content, its type byte and 15 zero bytes of padding, plus the
# 16-byte AEAD tag - 32 bytes the server cannot decrypt (no keys yet) and must not take as handshake.
PADDED_EMPTY_APPDATA = bytes.fromhex("9f0c6d2a7e51b3c8d4f60a19e2873b5c" "41d8a06f3e9c27b5d1480fa6c3e95b72")

CASES = {  # what a hostile client sends to a server
    "empty-appdata-between-hello-fragments": interleaved(record(APPLICATION_DATA, b"")),
    "padded-empty-appdata-between-hello-fragments": interleaved(record(APPLICATION_DATA, PADDED_EMPTY_APPDATA)),
    "empty-handshake-between-hello-fragments": interleaved(record(HANDSHAKE, b"")),
    "empty-appdata-before-the-hello": record(APPLICATION_DATA, b"") + client_hello(),
    "empty-handshake-before-the-hello": record(HANDSHAKE, b"") + client_hello(),
    "sslv2-client-hello": sslv2_client_hello(),
    "http-request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "oversized-record-header": b"\x16\x03\x03\x48\x01" + bytes(64),
    "heartbeat-record": record(24, b"\x01\x00\x10"),
}


def records_of(data: bytes) -> list[tuple]:
    """The shape of what a server sent: alerts byte for byte, other records by content type."""
    shape: list[tuple] = []
    while len(data) >= 5:
        length = int.from_bytes(data[3:5], "big")
        rec, data = data[:5 + length], data[5 + length:]
        shape.append((ALERT, rec) if rec[0] == ALERT else (rec[0],))
    if data:
        shape.append(("trailing", data))
    return shape


def read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def openssl_alone(pki: TestPki, server_end: socket.socket) -> None:
    """Run until OpenSSL fails or wants bytes the peer has not sent (the socket is non-blocking)."""
    ctx = tls13_context()
    ctx.use_certificate_chain_file(pki.server.chain)
    ctx.use_privatekey_file(pki.server.key)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)  # hsd's server asks for a client certificate too
    conn = SSL.Connection(ctx, server_end)
    conn.set_accept_state()
    try:
        conn.do_handshake()
    except SSL.Error:  # WantReadError included: it waits for more, as it would on a real peer
        pass


def tlslite_alone(pki: TestPki, server_end: socket.socket) -> None:
    """Run until tlslite fails or wants bytes the peer has not sent (its async API yields 0)."""
    chain, key = tlslite_identity(x509_credentials(pki, pki.server), "server")
    conn = TLSConnection(server_end)
    conn.closeSocket = False  # else it closes the socket on failure, before the peer reads its alert
    steps = conn.handshakeServerAsync(certChain=chain, privateKey=key, reqCert=True, settings=tls13_settings())
    try:
        for step in steps:
            if step == 0:
                break
    except Exception:  # noqa: BLE001 - whatever tlslite raises, only what it sent matters here
        pass


LIBRARIES = {"openssl": openssl_alone, "tlslite": tlslite_alone}


def library_answer(pki: TestPki, backend: str, data: bytes) -> bytes:
    """What the library alone, on a socketpair, sends back to `data` before it fails or waits."""
    server_end, peer = socket.socketpair()
    with server_end, peer:
        peer.sendall(data)  # all of it is queued before the library runs
        server_end.setblocking(False)
        LIBRARIES[backend](pki, server_end)
        server_end.shutdown(socket.SHUT_WR)
        return read_to_eof(peer)


def expected_status(answer: list[tuple]) -> int:
    """An alert ends the handshake at once (EACCES); no alert: the library waits for the deadline,
    or hsd ends it by the same rule the library used (OpenSSL refusing silently: EACCES)."""
    if any(rec[0] == ALERT for rec in answer):
        return PeerRejected.status
    if any(rec[0] == HANDSHAKE for rec in answer):  # it answered with its flight and waits for the client's
        return HandshakeTimeout.status
    return PeerRejected.status


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_peer_gets_the_libraries_own_answer(pki, backend: str, case: str) -> None:
    alone = records_of(library_answer(pki, backend, CASES[case]))
    with daemon(pki, backend) as (sim, running):
        mine, theirs = tcp_pair()
        with theirs:
            req = sim.server_hello_x509(mine, timeout_ms=1500)
            theirs.sendall(CASES[case])
            status = req.wait(WAIT)[0]
            assert req.done_calls == 1 and req.ktls_tx is None
            mine.shutdown(socket.SHUT_WR)  # hsd wrote its answer before DONE; FIN (no RST) ends it
            through_hsd = records_of(read_to_eof(theirs))
            mine.close()
    assert through_hsd == alone, running.outcomes[0].line()
    assert status == expected_status(alone), running.outcomes[0].line()


@pytest.mark.parametrize("backend,case,answer", [
    ("openssl", "empty-appdata-between-hello-fragments", [(ALERT, UNEXPECTED_MESSAGE_ALERT)]),
    ("tlslite", "empty-appdata-between-hello-fragments", [(ALERT, UNEXPECTED_MESSAGE_ALERT)]),
    ("openssl", "padded-empty-appdata-between-hello-fragments", [(ALERT, UNEXPECTED_MESSAGE_ALERT)]),
    ("tlslite", "padded-empty-appdata-between-hello-fragments", [(ALERT, UNEXPECTED_MESSAGE_ALERT)]),
    ("tlslite", "empty-handshake-between-hello-fragments", [(ALERT, UNEXPECTED_MESSAGE_ALERT)]),
    ("tlslite", "sslv2-client-hello", [(ALERT, PROTOCOL_VERSION_ALERT)]),
    # OpenSSL 4.0 (cryptography 50's wheel) sends nothing to an SSLv2-compatible ClientHello; 3.x
    # (3.3 in cryptography 43's wheel, Debian's 3.5 and 3.6) refuse it on a TLS-1.3-only server with protocol_version.
    ("openssl", "sslv2-client-hello", [] if OPENSSL_VERSION >= 0x40000000 else [(ALERT, PROTOCOL_VERSION_ALERT)]),
])
def test_what_each_library_alone_answers(pki, backend: str, case: str, answer: list[tuple]) -> None:
    """Pins the reference runs' answers (RFC 8446 5.1 for the empty ones), so a library upgrade that
    changes them is noticed."""
    assert records_of(library_answer(pki, backend, CASES[case])) == answer


def test_openssl_alone_ignores_empty_handshake_records_and_answers_the_hello(pki) -> None:
    shape = records_of(library_answer(pki, "openssl", CASES["empty-handshake-between-hello-fragments"]))
    assert shape[0] == (HANDSHAKE,) and (ALERT, UNEXPECTED_MESSAGE_ALERT) not in shape
