"""The key-exchange group, read from the ServerHello that passes through hsd.

Why: cryptography before 44 (Debian trixie's 43) binds no OpenSSL call that
names the negotiated group, yet hsd reports it (the handshake's log line,
psk_dhe_ke versus psk_ke).  Every handshake byte goes through hsd's memory
BIOs, and the ServerHello is plaintext: its key_share extension names the
group the keys were made with (RFC 8446 4.2.8).  Only a handshake OpenSSL
completed is reported, so what is read here is a ServerHello it accepted.
The reader never raises: bytes it cannot parse leave the group unknown.
"""

from __future__ import annotations

import hashlib

from hsd.tls13 import Reader
from hsd.tlstrace import GROUPS

HANDSHAKE = 22
CHANGE_CIPHER_SPEC = 20
SERVER_HELLO = 2
KEY_SHARE = 51
HELLO_RETRY_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()  # RFC 8446 4.1.3
MAX_HELLO = 1 << 16  # a ServerHello far larger than this is no ServerHello OpenSSL accepts


def group_name(code: int) -> str:
    """OpenSSL's name for a group code; an unlisted code as 0xNNNN (never a guess)."""
    return GROUPS.get(code, f"0x{code:04x}")  # hsd.tlstrace's table: IANA codes, OpenSSL's spelling


class ServerHelloReader:
    """Fed the server's side of the stream as it passes; knows the group once the ServerHello went by."""

    def __init__(self) -> None:
        self._records = bytearray()
        self._messages = bytearray()
        self.done = False
        self.code: int | None = None  # the key_share group; None: none seen (psk_ke, or not parsed)

    @property
    def group(self) -> str | None:
        return None if self.code is None else group_name(self.code)

    def feed(self, data: bytes) -> None:
        if self.done or not data:
            return
        self._records += data
        try:
            self._parse_records()
        except (IndexError, ValueError):
            self._finish(None)

    def _finish(self, code: int | None) -> None:
        self.done, self.code = True, code
        self._records.clear()
        self._messages.clear()

    def _parse_records(self) -> None:
        while not self.done and len(self._records) >= 5:
            length = int.from_bytes(self._records[3:5], "big")
            if len(self._records) < 5 + length:
                return
            kind, body = self._records[0], bytes(self._records[5:5 + length])
            del self._records[:5 + length]
            if kind == CHANGE_CIPHER_SPEC:
                continue
            if kind != HANDSHAKE:  # an alert, or protected records: no plaintext ServerHello follows
                self._finish(None)
                return
            self._messages += body
            if len(self._messages) > MAX_HELLO:
                self._finish(None)
                return
            self._parse_messages()

    def _parse_messages(self) -> None:
        while not self.done and len(self._messages) >= 4:
            length = int.from_bytes(self._messages[1:4], "big")
            if len(self._messages) < 4 + length:
                return
            kind, body = self._messages[0], bytes(self._messages[4:4 + length])
            del self._messages[:4 + length]
            if kind != SERVER_HELLO:
                self._finish(None)
                return
            if body[2:34] == HELLO_RETRY_RANDOM:  # a HelloRetryRequest: the real ServerHello follows
                continue
            self._finish(_key_share_group(body))


def _key_share_group(hello: bytes) -> int | None:
    """The group of a ServerHello's key_share entry; None without one (a psk_ke handshake)."""
    reader = Reader(hello, ValueError, "ServerHello")
    reader.take(2 + 32)  # legacy_version, random
    reader.vector(1)  # legacy_session_id_echo
    reader.take(2 + 1)  # cipher_suite, legacy_compression_method
    extensions = Reader(reader.vector(2), ValueError, "ServerHello")
    while not extensions.done():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind == KEY_SHARE:
            if len(data) < 2:
                raise ValueError("short key_share")
            return int.from_bytes(data[:2], "big")
    return None
