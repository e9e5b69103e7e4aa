"""[debug] tls: one handshake as TLS messages, in order and by direction, and what it settled on.

Why here, once: both backends hand this tracer the same thing - the plaintext
content of each record their library sends or receives (OpenSSL's message
callback, tlslite's record layer), as (direction, content type, bytes) - and
it parses and logs it, so the trace reads the same whichever backend ran.
From the handshake messages themselves it learns the negotiated parameters
(version, cipher suite, group, signature schemes, PSK use, SNI, ALPN, hello
retry), and logs them in one line when the second Finished has passed.

Never secrets: it logs message types, lengths, extension names and the named
parameters above, never a byte of a message (no randoms, key shares,
binders, signatures, Finished MACs, tickets); it never sees keys or traffic
secrets at all.  Peer-chosen strings (SNI, ALPN) go through hsd.peerlog.
The parsing never raises: a message it cannot read is logged as such.

Levels, after GnuTLS's (which tlshd passes [debug] tls to): >= 1 the
negotiated parameters and every alert sent or received; >= 4 every handshake
message with its direction; >= 5 also each message's length and extensions,
and ChangeCipherSpec records.
"""

from __future__ import annotations

import hashlib
import logging

from .peerlog import truncate, truncate_list
from .tls13 import Reader

log = logging.getLogger("hsd.trace.tls")

LEVEL_MESSAGES = 4  # GnuTLS logs handshake messages from level 4
LEVEL_DETAILS = 5  # and records from level 5
MAX_BUFFERED = 1 << 18  # handshake bytes kept per direction while a message is incomplete

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE = 20, 21, 22
CLIENT_HELLO, SERVER_HELLO, FINISHED = 1, 2, 20
CERTIFICATE_VERIFY, ENCRYPTED_EXTENSIONS, CERTIFICATE = 15, 8, 11
HELLO_RETRY_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()  # RFC 8446 4.1.3

MESSAGES = {
    1: "ClientHello", 2: "ServerHello", 4: "NewSessionTicket", 5: "EndOfEarlyData", 8: "EncryptedExtensions",
    11: "Certificate", 13: "CertificateRequest", 15: "CertificateVerify", 20: "Finished", 24: "KeyUpdate",
    25: "CompressedCertificate", 254: "message_hash",
}
EXTENSIONS = {
    0: "server_name", 1: "max_fragment_length", 5: "status_request", 10: "supported_groups", 11: "ec_point_formats",
    13: "signature_algorithms", 14: "use_srtp", 15: "heartbeat", 16: "alpn", 18: "signed_certificate_timestamp",
    19: "client_certificate_type", 20: "server_certificate_type", 21: "padding", 22: "encrypt_then_mac",
    23: "extended_master_secret", 27: "compress_certificate", 28: "record_size_limit", 35: "session_ticket",
    41: "pre_shared_key", 42: "early_data", 43: "supported_versions", 44: "cookie", 45: "psk_key_exchange_modes",
    47: "certificate_authorities", 48: "oid_filters", 49: "post_handshake_auth", 50: "signature_algorithms_cert",
    51: "key_share", 57: "quic_transport_parameters", 0xFE0D: "encrypted_client_hello", 0xFF01: "renegotiation_info",
}
SUITES = {
    0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384", 0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256", 0x1305: "TLS_AES_128_CCM_8_SHA256",
}
GROUPS = {  # spelled as OpenSSL's SSL_get0_group_name spells them (the openssl backend names groups by it)
    0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1", 0x001D: "x25519", 0x001E: "x448",
    0x001F: "brainpoolP256r1tls13", 0x0020: "brainpoolP384r1tls13", 0x0021: "brainpoolP512r1tls13",
    0x0100: "ffdhe2048", 0x0101: "ffdhe3072", 0x0102: "ffdhe4096", 0x0103: "ffdhe6144", 0x0104: "ffdhe8192",
    0x0200: "MLKEM512", 0x0201: "MLKEM768", 0x0202: "MLKEM1024",
    0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768", 0x11ED: "SecP384r1MLKEM1024",
}
SIGNATURE_SCHEMES = {
    0x0401: "rsa_pkcs1_sha256", 0x0501: "rsa_pkcs1_sha384", 0x0601: "rsa_pkcs1_sha512",
    0x0403: "ecdsa_secp256r1_sha256", 0x0503: "ecdsa_secp384r1_sha384", 0x0603: "ecdsa_secp521r1_sha512",
    0x0804: "rsa_pss_rsae_sha256", 0x0805: "rsa_pss_rsae_sha384", 0x0806: "rsa_pss_rsae_sha512",
    0x0807: "ed25519", 0x0808: "ed448", 0x0809: "rsa_pss_pss_sha256", 0x080A: "rsa_pss_pss_sha384",
    0x080B: "rsa_pss_pss_sha512", 0x081A: "ecdsa_brainpoolP256r1tls13_sha256",
    0x081B: "ecdsa_brainpoolP384r1tls13_sha384", 0x081C: "ecdsa_brainpoolP512r1tls13_sha512",
    0x0904: "mldsa44", 0x0905: "mldsa65", 0x0906: "mldsa87",
}
ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow", 40: "handshake_failure",
    42: "bad_certificate", 43: "unsupported_certificate", 44: "certificate_revoked", 45: "certificate_expired",
    46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
    86: "inappropriate_fallback", 90: "user_canceled", 109: "missing_extension", 110: "unsupported_extension",
    112: "unrecognized_name", 113: "bad_certificate_status_response", 115: "unknown_psk_identity",
    116: "certificate_required", 120: "no_application_protocol",
}
VERSIONS = {0x0304: "TLS 1.3", 0x0303: "TLS 1.2", 0x0302: "TLS 1.1", 0x0301: "TLS 1.0"}


def named(table: dict[int, str], code: int) -> str:
    """The IANA name of a code point, an unlisted one as 0xNNNN (never a guess)."""
    return table.get(code, f"0x{code:04x}")


class _Unreadable(ValueError):
    """A message shorter than its own length fields say."""


def _reader(data: bytes) -> Reader:
    return Reader(data, _Unreadable, "message")


def _extensions(reader: Reader) -> list[tuple[int, bytes]]:
    if reader.done():
        return []
    block = _reader(reader.vector(2))
    found = []
    while not block.done():
        found.append((block.number(2), block.vector(2)))
    return found


def _names(data: bytes, width: int, table: dict[int, str]) -> list[str]:
    return [named(table, int.from_bytes(data[i:i + width], "big")) for i in range(0, len(data) - width + 1, width)]


class TlsTrace:
    """One handshake's trace: fed every plaintext record the library sends or receives (record())."""

    def __init__(self, level: int, label: str, logger: logging.Logger = log) -> None:
        self.level = level
        self.label = label  # "fd 9 client": which request the lines belong to
        self.log = logger
        self._pending = {True: bytearray(), False: bytearray()}  # handshake bytes per direction (sent?)
        self.params: dict[str, str] = {}
        self._finished = {True: False, False: False}
        self.summarised = False

    # -------------------------------------------------------- input

    def record(self, sent: bool, content_type: int, data: bytes) -> None:
        """The plaintext content of one record (or one whole message): never raises."""
        try:
            self._record(sent, content_type, bytes(data))
        except Exception as exc:  # noqa: BLE001  tracing must never fail a handshake
            self.log.debug("tls %s: trace stopped: %s", self.label, type(exc).__name__)
            self.level = 0

    def _record(self, sent: bool, content_type: int, data: bytes) -> None:
        if self.level <= 0:
            return
        arrow = "->" if sent else "<-"
        if content_type == ALERT:
            if len(data) >= 2:
                level = {1: "warning", 2: "fatal"}.get(data[0], f"level {data[0]}")
                self._emit(1, f"{arrow} alert {named(ALERTS, data[1])} ({level}) {'sent' if sent else 'received'}")
            return
        if content_type == CHANGE_CIPHER_SPEC:
            self._emit(LEVEL_DETAILS, f"{arrow} ChangeCipherSpec (compatibility record)")
            return
        if content_type != HANDSHAKE:
            return
        pending = self._pending[sent]
        pending += data
        if len(pending) > MAX_BUFFERED:
            self._emit(1, f"{arrow} a handshake message over {MAX_BUFFERED} bytes: not traced")
            pending.clear()
            return
        while len(pending) >= 4:
            length = int.from_bytes(pending[1:4], "big")
            if len(pending) < 4 + length:
                return
            kind, body = pending[0], bytes(pending[4:4 + length])
            del pending[:4 + length]
            self._message(sent, kind, body)

    # -------------------------------------------------------- messages

    def _message(self, sent: bool, kind: int, body: bytes) -> None:
        arrow = "->" if sent else "<-"
        name = named(MESSAGES, kind)
        detail = ""
        try:
            if kind == CLIENT_HELLO:
                detail = self._client_hello(body)
            elif kind == SERVER_HELLO:
                name, detail = self._server_hello(body)
            elif kind == ENCRYPTED_EXTENSIONS:
                detail = self._encrypted_extensions(body)
            elif kind == CERTIFICATE:
                detail = self._certificate(body)
            elif kind == CERTIFICATE_VERIFY and len(body) >= 2:
                scheme = named(SIGNATURE_SCHEMES, int.from_bytes(body[:2], "big"))
                self.params["signature (ours)" if sent else "signature (peer's)"] = scheme
                detail = f"scheme {scheme}"
        except _Unreadable:
            detail = "unreadable"
        text = f"{arrow} {name}"
        if self.level >= LEVEL_DETAILS:
            text += f" ({len(body) + 4} bytes)" + (f": {detail}" if detail else "")
        if sent and all(self._finished.values()):  # the library wrote it after the handshake (a ticket)
            text += " - dropped, never sent: the socket is kTLS's from here"
        self._emit(LEVEL_MESSAGES, text)
        if kind == FINISHED:
            self._finished[sent] = True
            if all(self._finished.values()):
                self.summary()

    def _client_hello(self, body: bytes) -> str:
        reader = _reader(body)
        reader.take(2 + 32)  # legacy_version, random
        reader.vector(1)  # legacy_session_id
        suites = reader.vector(2)
        reader.vector(1)  # compression methods
        extensions = _extensions(reader)
        for ext, data in extensions:
            if ext == 0:  # server_name: one host_name entry
                names = _reader(_reader(data).vector(2))
                if not names.done() and names.number(1) == 0:
                    self.params["sni"] = truncate(names.vector(2))
            elif ext == 16:
                offered = _reader(_reader(data).vector(2))
                protocols = []
                while not offered.done():
                    protocols.append(offered.vector(1))
                self.params["alpn offered"] = truncate_list(protocols)
            elif ext == 41:
                identities = _reader(_reader(data).vector(2))
                count = 0
                while not identities.done():
                    identities.vector(2)
                    identities.take(4)
                    count += 1
                self.params["psk offered"] = f"{count} identit{'y' if count == 1 else 'ies'}"
        return (f"suites {', '.join(_names(suites, 2, SUITES))}; "
                f"extensions {', '.join(named(EXTENSIONS, ext) for ext, _ in extensions) or 'none'}")

    def _server_hello(self, body: bytes) -> tuple[str, str]:
        reader = _reader(body)
        reader.take(2)
        retry = reader.take(32) == HELLO_RETRY_RANDOM
        reader.vector(1)
        suite = named(SUITES, reader.number(2))
        reader.take(1)
        extensions = _extensions(reader)
        if retry:
            self.params["hello retry"] = "yes"
        else:
            self.params["cipher"] = suite
        for ext, data in extensions:
            if ext == 43 and len(data) >= 2:
                self.params["version"] = named(VERSIONS, int.from_bytes(data[:2], "big"))
            elif ext == 51 and len(data) >= 2:
                group = named(GROUPS, int.from_bytes(data[:2], "big"))
                self.params["hello retry group" if retry else "group"] = group
            elif ext == 41 and len(data) >= 2 and not retry:
                self.params["psk"] = f"selected identity #{int.from_bytes(data[:2], 'big')}"
        return ("HelloRetryRequest" if retry else "ServerHello",
                f"suite {suite}; extensions {', '.join(named(EXTENSIONS, ext) for ext, _ in extensions) or 'none'}")

    def _encrypted_extensions(self, body: bytes) -> str:
        extensions = _extensions(_reader(body))
        for ext, data in extensions:
            if ext == 16:
                chosen = _reader(_reader(data).vector(2))
                if not chosen.done():
                    self.params["alpn"] = truncate(chosen.vector(1))
            elif ext == 28 and len(data) >= 2:
                self.params["record_size_limit (EncryptedExtensions)"] = str(int.from_bytes(data[:2], "big"))
        return f"extensions {', '.join(named(EXTENSIONS, ext) for ext, _ in extensions) or 'none'}"

    def _certificate(self, body: bytes) -> str:
        reader = _reader(body)
        reader.vector(1)  # certificate_request_context
        entries = _reader(reader.vector(3))
        count = 0
        while not entries.done():
            entries.vector(3)
            entries.vector(2)
            count += 1
        return f"{count} certificate{'' if count == 1 else 's'}"

    # -------------------------------------------------------- output

    def summary(self) -> None:
        """The negotiated parameters, once: when both Finished messages have passed."""
        if self.summarised or self.level <= 0:
            return
        self.summarised = True
        params = dict(self.params)
        params.setdefault("version", "TLS 1.3" if "cipher" in params else "-")
        params.setdefault("psk", "no")
        params.setdefault("hello retry", "no")
        params.setdefault("group", "none" if params["psk"] != "no" else "-")
        order = ("version", "cipher", "group", "signature (peer's)", "signature (ours)", "psk", "psk offered",
                 "hello retry", "hello retry group", "sni", "alpn offered", "alpn",
                 "record_size_limit (EncryptedExtensions)")
        parts = [f"{key} {params[key]}" for key in order if key in params]
        self._emit(1, "negotiated " + ", ".join(parts))

    def _emit(self, level: int, text: str) -> None:
        if self.level >= level:
            self.log.debug("tls %s: %s", self.label, text)


def trace_for(level: int, label: str) -> TlsTrace | None:
    """A tracer when [debug] tls asks for one, else None (nothing is parsed)."""
    return TlsTrace(level, label) if level > 0 else None
