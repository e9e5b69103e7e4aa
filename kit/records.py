"""A user-space TLS 1.3 record layer keyed by exactly what hsd hands the kernel.

This machine (and CI) may have no kTLS.  To prove the keys anyway, tests take
the very CryptoInfo structs hsd would install (hsd.ktls.session_crypto_info)
and exchange application data with the real peer through this record layer:
if a key, IV, salt or sequence number were wrong, the peer or this layer would
fail on the first record's tag.  It never sees secrets, only crypto_info.
"""

from __future__ import annotations

import select
import socket
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from hsd.ktls import TLS_1_3_VERSION, CryptoInfo, session_crypto_info
from hsd.session import Session

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
MAX_PLAINTEXT = 16384
MAX_CIPHERTEXT = 16384 + 256
NEW_SESSION_TICKET = 4
KEY_UPDATE = 24
CLOSE_NOTIFY = 0


class RecordError(Exception):
    """The peer's bytes are not a valid record under the installed keys (bad tag, framing, ...)."""


class TlsAlert(RecordError):
    """The peer sent an alert (close_notify included)."""

    def __init__(self, level: int, description: int) -> None:
        super().__init__(f"peer sent alert level={level} description={description}")
        self.level = level
        self.description = description


def _aead(info: CryptoInfo):
    name = info.spec.name
    if name in ("AES_GCM_128", "AES_GCM_256"):
        return AESGCM(info.key)
    if name == "AES_CCM_128":
        return AESCCM(info.key, tag_length=16)
    if name == "CHACHA20_POLY1305":
        return ChaCha20Poly1305(info.key)
    raise ValueError(f"the record checker does not implement {name}")


class RecordProtection:
    """One direction of TLS 1.3 record protection (RFC 8446 5.2/5.3), sans-I/O."""

    def __init__(self, info: CryptoInfo) -> None:
        if info.version != TLS_1_3_VERSION:
            raise ValueError("only TLS 1.3 crypto_info is supported")
        self._aead = _aead(info)
        self._base = int.from_bytes(info.nonce_base(), "big")
        self.seq = info.rec_seq

    def _nonce(self) -> bytes:
        return (self._base ^ self.seq).to_bytes(12, "big")

    def seal(self, content_type: int, payload: bytes) -> bytes:
        """Encrypt one record (payload at most 2^14 bytes) and advance the sequence number."""
        if len(payload) > MAX_PLAINTEXT:
            raise ValueError("record payload too large")
        inner = payload + bytes([content_type])
        header = bytes([APPLICATION_DATA, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
        record = header + self._aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return record

    def open(self, record: bytes) -> tuple[int, bytes]:
        """Decrypt one whole record -> (inner content type, payload); advances the sequence number."""
        header, body = record[:5], record[5:]
        if header[0] != APPLICATION_DATA:
            raise RecordError(f"unprotected record of type {header[0]} after the handshake")
        try:
            inner = self._aead.decrypt(self._nonce(), body, header)
        except InvalidTag:
            raise RecordError(f"record {self.seq}: bad authentication tag (wrong key, IV or sequence number)") from None
        self.seq += 1
        stripped = inner.rstrip(b"\x00")
        if not stripped:
            raise RecordError("record without a content type")
        return stripped[-1], stripped[:-1]


class KtlsRecordChecker:
    """Application data over a socket with hsd's TX/RX crypto_info, like kTLS would do it."""

    def __init__(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo, timeout: float = 10.0,
                 max_payload: int = MAX_PLAINTEXT) -> None:
        """max_payload: TLS_TX_MAX_PAYLOAD_LEN, the largest plaintext the kernel puts in one TX record."""
        self.sock = sock
        self.max_payload = max_payload
        self.sent_sizes: list[int] = []  # plaintext bytes of each application data record sent
        self.tx = RecordProtection(tx)
        self.rx = RecordProtection(rx)
        self.timeout = timeout
        self.handshake_messages: list[int] = []  # post-handshake message types skipped (4 = NewSessionTicket)
        self._pending = bytearray()

    # ---- sending
    def send(self, data: bytes) -> None:
        for start in range(0, max(len(data), 1), self.max_payload):
            chunk = data[start : start + self.max_payload]
            self.sent_sizes.append(len(chunk))
            self._send_all(self.tx.seal(APPLICATION_DATA, chunk))

    def send_close_notify(self) -> None:
        self._send_all(self.tx.seal(ALERT, bytes([1, CLOSE_NOTIFY])))

    def _send_all(self, raw: bytes) -> None:
        view = memoryview(raw)
        deadline = time.monotonic() + self.timeout
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline)

    # ---- receiving
    def _wait(self, events: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError("peer sent nothing in time")

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)
                continue
            if not chunk:
                raise EOFError("peer closed the connection")
            buf += chunk
        return bytes(buf)

    def recv_record(self) -> tuple[int, bytes]:
        """The next decrypted record -> (content type, payload)."""
        deadline = time.monotonic() + self.timeout
        header = self._recv_exact(5, deadline)
        length = int.from_bytes(header[3:5], "big")
        if header[1:3] != b"\x03\x03" or length > MAX_CIPHERTEXT:
            raise RecordError(f"bad record header {header.hex()}")
        body = self._recv_exact(length, deadline)
        if header[0] == CHANGE_CIPHER_SPEC:  # compatibility-mode CCS is never protected
            return CHANGE_CIPHER_SPEC, body
        return self.rx.open(header + body)

    def recv_data(self) -> bytes:
        """The next application data; skips post-handshake messages, raises TlsAlert on alerts."""
        while True:
            content_type, payload = self.recv_record()
            if content_type == APPLICATION_DATA:
                return payload
            if content_type == ALERT:
                raise TlsAlert(payload[0], payload[1]) if len(payload) >= 2 else RecordError("short alert")
            if content_type == HANDSHAKE:
                self._skip_handshake(payload)
            elif content_type != CHANGE_CIPHER_SPEC:
                raise RecordError(f"unexpected content type {content_type}")

    def _skip_handshake(self, payload: bytes) -> None:
        pos = 0
        while pos + 4 <= len(payload):
            msg_type = payload[pos]
            self.handshake_messages.append(msg_type)
            if msg_type == KEY_UPDATE:
                raise RecordError("peer sent KeyUpdate: the record checker cannot rekey from crypto_info")
            pos += 4 + int.from_bytes(payload[pos + 1 : pos + 4], "big")

    def recv_until(self, marker: bytes) -> bytes:
        """Application data up to and including marker (what is beyond stays buffered)."""
        while marker not in self._pending:
            self._pending += self.recv_data()
        end = self._pending.index(marker) + len(marker)
        data = bytes(self._pending[:end])
        del self._pending[:end]
        return data


def session_records(sock: socket.socket, session: Session, timeout: float = 10.0) -> KtlsRecordChecker:
    """A record checker keyed by exactly the crypto_info hsd would install for this finished session.

    The socket goes non-blocking so every read and write is bounded by the
    checker's own timeout, whatever mode the handshake left it in."""
    sock.setblocking(False)
    tx, rx = session_crypto_info(session)
    return KtlsRecordChecker(sock, tx, rx, timeout)
