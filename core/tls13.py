"""The few TLS 1.3 messages hsd reads or writes itself, before a TLS library runs: ClientHello, alerts.

A PSK server must pick its cipher suites before its library matches a PSK, and
the suite's hash must be the PSK's (SHA-256 vs SHA-384), so it reads the
offered identities first - and refuses what it cannot use with a plaintext
alert of its own.  A server without usable credentials refuses every client
the same way (refuse_handshake).  Every backend uses these, so they live here,
once.  The parsing is sans-I/O (records in, identities out); read_client_hello()
and send_alert() are the two thin I/O steps over hsd.wire.RecordSocket.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .errors import HandshakeError, PeerRejected
from .peerlog import truncate
from .wire import MAX_RECORD, RecordSocket

ALERT = 21
HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
SNI_HOST_NAME = 0  # the only NameType RFC 6066 defines
EXT_PRE_SHARED_KEY = 41
EXT_PSK_KEY_EXCHANGE_MODES = 45
MAX_CLIENT_HELLO = 1 << 17  # far above any real ClientHello; a bound against abuse


# alert descriptions (RFC 8446 section 6) hsd sends itself
HANDSHAKE_FAILURE = 40
ACCESS_DENIED = 49  # a server without usable credentials of its own, as tlshd 1.3.1 and later send it
DECODE_ERROR = 50
UNKNOWN_PSK_IDENTITY = 115


class MalformedClientHello(ValueError):
    """The peer's first flight is not a parseable ClientHello."""


@dataclass(frozen=True)
class OfferedPsks:
    identities: tuple[bytes, ...]
    modes: tuple[int, ...]  # psk_key_exchange_modes: 0 psk_ke, 1 psk_dhe_ke


def handshake_bytes(records: list[bytes]) -> bytes:
    """The handshake-message bytes carried by plaintext handshake records."""
    out = bytearray()
    for record in records:
        if len(record) < 5 or record[0] != HANDSHAKE:
            raise MalformedClientHello("expected a handshake record")
        out += record[5:]
    return bytes(out)


def client_hello_length(data: bytes) -> int | None:
    """Total length of the ClientHello message at the start of data, None while incomplete."""
    if len(data) < 4:
        return None
    if data[0] != CLIENT_HELLO:
        raise MalformedClientHello(f"first handshake message is type {data[0]}, not ClientHello")
    length = 4 + int.from_bytes(data[1:4], "big")
    if length > MAX_CLIENT_HELLO:
        raise MalformedClientHello(f"ClientHello of {length} bytes")
    return length


class Reader:
    """Reads a TLS message's fields in order (RFC 8446 3: numbers and length-prefixed vectors).

    Every read past the end raises `error` ("<what> is truncated"): one bounds rule for each
    handshake message hsd parses itself (the ClientHello here, the ServerHello in the openssl
    backend)."""

    def __init__(self, data: bytes, error: type[ValueError] = MalformedClientHello, what: str = "ClientHello") -> None:
        self.data = data
        self.pos = 0
        self.error, self.what = error, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"{self.what} is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    def done(self) -> bool:
        return self.pos == len(self.data)


def client_hello_extensions(message: bytes) -> list[tuple[int, bytes]]:
    """(type, data) of each extension of one ClientHello message, in the client's order."""
    reader = Reader(message)
    if reader.number(1) != CLIENT_HELLO:
        raise MalformedClientHello("not a ClientHello")
    body = Reader(reader.vector(3))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    if body.done():
        return []
    extensions = Reader(body.vector(2))
    found = []
    while not extensions.done():
        found.append((extensions.number(2), extensions.vector(2)))
    return found


def server_name(message: bytes) -> bytes | None:
    """The host_name of a ClientHello's server_name extension (RFC 6066), as sent; None when there is none.

    None too when the list holds more than one host_name (RFC 6066 forbids it:
    no name is then trusted to choose anything)."""
    for ext_type, data in client_hello_extensions(message):
        if ext_type != EXT_SERVER_NAME:
            continue
        names = Reader(Reader(data).vector(2))
        hosts = []
        while not names.done():
            name_type = names.number(1)
            name = names.vector(2)
            if name_type == SNI_HOST_NAME:
                hosts.append(name)
        return hosts[0] if len(hosts) == 1 else None
    return None


def offered_psks(message: bytes) -> OfferedPsks:
    """Identities (in the client's order) and key-exchange modes of one ClientHello message."""
    identities: tuple[bytes, ...] = ()
    modes: tuple[int, ...] = ()
    for ext_type, data in client_hello_extensions(message):
        ext = Reader(data)
        if ext_type == EXT_PRE_SHARED_KEY:
            listed = Reader(ext.vector(2))
            found = []
            while not listed.done():
                found.append(listed.vector(2))
                listed.take(4)  # obfuscated_ticket_age
            identities = tuple(found)
        elif ext_type == EXT_PSK_KEY_EXCHANGE_MODES:
            modes = tuple(ext.vector(1))
    return OfferedPsks(identities, modes)


def fatal_alert(description: int) -> bytes:
    """A plaintext fatal alert record (legacy version 3.3), as sent before any keys exist."""
    return bytes([ALERT, 3, 3, 0, 2, 2, description])


def send_alert(records: RecordSocket, description: int) -> None:
    """Best effort: the failure is reported in DONE whether or not the peer still listens."""
    try:
        records.write(fatal_alert(description))
    except HandshakeError:
        pass


def refuse_handshake(sock: socket.socket, deadline: float, description: int = ACCESS_DENIED) -> None:
    """A server that cannot serve this request at all says so now: a fatal alert, before any hello is read.

    Without it the client sees only the connection close, which NFS and NVMe
    clients take for a transient failure and retry until their own timeout.  A
    TLS 1.3 client accepts a plaintext alert where it waits for the ServerHello
    (and reads it after writing its ClientHello if it comes sooner).  Best
    effort and bounded by the deadline; what the peer already sent is read and
    dropped, so the consumer's close is a FIN, not a reset that could overtake
    the alert."""
    records = RecordSocket(sock, deadline)
    send_alert(records, description)
    records.discard_arrived()


def read_client_hello(records: RecordSocket) -> tuple[list[bytes], bytes]:
    """The records holding the peer's first ClientHello (to feed a library later) and the message itself.

    Raises MalformedClientHello for a first flight that is not a ClientHello."""
    raw: list[bytes] = []
    while True:
        raw.append(records.read_record())
        data = handshake_bytes(raw)
        length = client_hello_length(data)
        if length is not None and len(data) >= length:
            return raw, data[:length]


def peek_client_hello(records: RecordSocket) -> bytes | None:
    """The peer's ClientHello message, read ahead and given back to the socket for the library that runs next.

    Reads exactly what the library would (record header, then body, through
    read_next) and stops at the first thing that is not a plaintext handshake
    record of a ClientHello - returning None, so the library judges and answers
    it as if hsd had read nothing.  The socket's own failures (timeout, close)
    are raised: the library would have met the same."""
    pieces: list[bytes] = []
    data = bytearray()
    try:
        while True:
            header = records.read_next()
            pieces.append(header)
            length = int.from_bytes(header[3:5], "big")
            if header[0] != HANDSHAKE or header[1] != 3 or not 0 < length <= MAX_RECORD:
                return None
            body = records.read_next()
            pieces.append(body)
            data += body
            total = client_hello_length(bytes(data))
            if total is not None and len(data) >= total:
                return bytes(data[:total])
    except MalformedClientHello:
        return None
    finally:
        records.give_back(pieces)


def offered_psk_identities(records: RecordSocket) -> tuple[list[bytes], tuple[bytes, ...]]:
    """A PSK server's first step: the ClientHello's records and the identities it offers, in its order.

    A first flight that is no ClientHello gets decode_error, one that offers no
    PSK handshake_failure; both are PeerRejected (EACCES), the same for every backend."""
    try:
        raw, hello = read_client_hello(records)
        offered = offered_psks(hello)
    except MalformedClientHello as exc:
        send_alert(records, DECODE_ERROR)
        raise PeerRejected(f"client sent a malformed ClientHello: {truncate(str(exc))}") from None
    if not offered.identities:
        send_alert(records, HANDSHAKE_FAILURE)
        raise PeerRejected("client offered no PSK")
    return raw, offered.identities
