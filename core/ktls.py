"""Kernel TLS: turn a Session into crypto_info structs and hand them to the socket.

Layouts from include/uapi/linux/tls.h.  TCP_ULP "tls" first, then TLS_TX, then
TLS_RX, like the reference daemon; then, when the peer announced a smaller RFC 8449
record_size_limit, TLS_TX_MAX_PAYLOAD_LEN (Linux 7.2; a kernel without it is
named once in the log, see limit_tx_records).  Keys are derived here from the traffic
secrets (RFC 8446 7.3) so every backend gets identical, tested kTLS code.

Every key, IV and packed struct is a bytearray (hsd.secret): HKDF writes into
it, setsockopt reads from it, and it is zeroed right after the call, so the
daemon keeps no copy of what the kernel now holds.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .errors import KtlsError
from .secret import wipe, wipe_all
from .session import Session

log = logging.getLogger("hsd")

SOL_TLS = 282
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_TX_MAX_PAYLOAD_LEN = 5  # SOL_TLS, Linux 7.2 (not 6.12): the largest plaintext the kernel puts in a TX record
TLS_MAX_PAYLOAD_SIZE = 16384  # 2^14: the protocol's ceiling and the kernel's default for that option
RECORD_SIZE_LIMIT_MIN = 64  # RFC 8449 section 4: a smaller record_size_limit is illegal


@dataclass(frozen=True)
class CipherSpec:
    name: str  # kernel name
    cipher_type: int
    iv_size: int
    key_size: int
    salt_size: int
    hash: type[hashes.HashAlgorithm]

    @property
    def struct_size(self) -> int:
        return 4 + self.iv_size + self.key_size + self.salt_size + 8


CIPHERS: dict[str, CipherSpec] = {
    "TLS_AES_128_GCM_SHA256": CipherSpec("AES_GCM_128", 51, 8, 16, 4, hashes.SHA256),
    "TLS_AES_256_GCM_SHA384": CipherSpec("AES_GCM_256", 52, 8, 32, 4, hashes.SHA384),
    "TLS_AES_128_CCM_SHA256": CipherSpec("AES_CCM_128", 53, 8, 16, 4, hashes.SHA256),
    "TLS_CHACHA20_POLY1305_SHA256": CipherSpec("CHACHA20_POLY1305", 54, 12, 32, 0, hashes.SHA256),
    "TLS_SM4_GCM_SM3": CipherSpec("SM4_GCM", 55, 8, 16, 4, hashes.SHA256),
    "TLS_SM4_CCM_SM3": CipherSpec("SM4_CCM", 56, 8, 16, 4, hashes.SHA256),
}
BY_TYPE = {spec.cipher_type: spec for spec in CIPHERS.values()}

# OpenSSL's and GnuTLS's spellings, so backends can pass what their library reports.
ALIASES = {
    "TLS_AES_128_GCM_SHA256": "TLS_AES_128_GCM_SHA256",
    "AES128-GCM-SHA256": "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384": "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_CCM_SHA256": "TLS_AES_128_CCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256": "TLS_CHACHA20_POLY1305_SHA256",
}


def cipher_spec(suite: str) -> CipherSpec:
    try:
        return CIPHERS[ALIASES.get(suite, suite)]
    except KeyError:
        raise KtlsError(f"cipher suite {suite} has no kernel TLS equivalent", errno.EOPNOTSUPP) from None


@dataclass(frozen=True)
class CryptoInfo:
    """One direction's tls12_crypto_info_* struct; key, iv and salt are bytearrays wipe() zeroes."""

    version: int
    cipher_type: int
    key: bytearray
    iv: bytearray
    salt: bytearray
    rec_seq: int

    def __post_init__(self) -> None:
        for name in ("key", "iv", "salt"):  # bytes given (tests, TLS 1.2 callers): our own mutable copy
            if not isinstance(getattr(self, name), bytearray):
                object.__setattr__(self, name, bytearray(getattr(self, name)))

    def pack(self) -> bytearray:
        """The uapi struct in a new bytearray: the caller wipes it once setsockopt has it."""
        spec = BY_TYPE[self.cipher_type]
        if (len(self.iv), len(self.key), len(self.salt)) != (spec.iv_size, spec.key_size, spec.salt_size):
            raise ValueError(f"wrong field sizes for {spec.name}")
        # field order in the uapi struct: info, iv, key, salt, rec_seq
        out = bytearray(struct.pack("=HH", self.version, self.cipher_type))
        out += self.iv
        out += self.key
        out += self.salt
        out += self.rec_seq.to_bytes(8, "big")
        return out

    def wipe(self) -> None:
        """Zero key, iv and salt in place (never raises)."""
        wipe_all(self.key, self.iv, self.salt)

    @classmethod
    def unpack(cls, raw: Any) -> "CryptoInfo":
        if len(raw) < 4:
            raise ValueError("crypto_info shorter than its header")
        version, cipher_type = struct.unpack_from("=HH", raw)
        spec = BY_TYPE.get(cipher_type)
        if spec is None:
            raise ValueError(f"unknown cipher type {cipher_type}")
        if version not in (TLS_1_2_VERSION, TLS_1_3_VERSION):
            raise ValueError(f"unknown TLS version {version:#x}")
        if len(raw) != spec.struct_size:
            raise ValueError(f"{spec.name} crypto_info is {spec.struct_size} bytes, got {len(raw)}")
        raw = memoryview(raw)  # slices of a view, so the only copies are the bytearrays below
        pos = 4
        iv = raw[pos : pos + spec.iv_size]; pos += spec.iv_size
        key = raw[pos : pos + spec.key_size]; pos += spec.key_size
        salt = raw[pos : pos + spec.salt_size]; pos += spec.salt_size
        return cls(version, cipher_type, bytearray(key), bytearray(iv), bytearray(salt),
                   int.from_bytes(raw[pos : pos + 8], "big"))

    @property
    def spec(self) -> CipherSpec:
        return BY_TYPE[self.cipher_type]

    def nonce_base(self) -> bytearray:
        """The 12-byte write IV (salt || iv) the record nonce is XORed into."""
        return self.salt + self.iv

    def __repr__(self) -> str:  # never print keys
        return f"CryptoInfo({self.spec.name}, version={self.version:#x}, rec_seq={self.rec_seq})"


def hkdf_expand_label(secret: Any, label: str, context: bytes, length: int,
                      algorithm: hashes.HashAlgorithm) -> bytearray:
    """HKDF-Expand-Label (RFC 8446 7.1) of a bytes-like secret, written into a new bytearray.

    With HKDFExpand.derive_into, cryptography writes straight into our buffer;
    releases without it return an immutable bytes we copy from and cannot wipe
    (docs/secrets.md)."""
    full = b"tls13 " + label.encode()
    info = struct.pack("!H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    hkdf = HKDFExpand(algorithm=algorithm, length=length, info=info)
    out = bytearray(length)
    if hasattr(hkdf, "derive_into"):
        hkdf.derive_into(secret, out)
    else:
        out[:] = hkdf.derive(secret)
    return out


def tls13_crypto_info(suite: str, secret: Any, rec_seq: int) -> CryptoInfo:
    """Key and IV for one direction from its application traffic secret (RFC 8446 7.3)."""
    spec = cipher_spec(suite)
    key = hkdf_expand_label(secret, "key", b"", spec.key_size, spec.hash())
    write_iv = hkdf_expand_label(secret, "iv", b"", 12, spec.hash())
    try:
        return CryptoInfo(TLS_1_3_VERSION, spec.cipher_type, key, write_iv[spec.salt_size :],
                          write_iv[: spec.salt_size], rec_seq)
    finally:
        wipe(write_iv)


def tls12_crypto_info(suite: str, key: Any, write_iv: Any, rec_seq: int) -> CryptoInfo:
    """TLS 1.2 layout: salt is the implicit IV, iv the explicit nonce (= sequence number)."""
    spec = cipher_spec(suite)
    if spec.salt_size == 0:  # ChaCha20: the whole 12-byte IV
        return CryptoInfo(TLS_1_2_VERSION, spec.cipher_type, bytearray(key), bytearray(write_iv), bytearray(),
                          rec_seq)
    return CryptoInfo(TLS_1_2_VERSION, spec.cipher_type, bytearray(key), bytearray(rec_seq.to_bytes(8, "big")),
                      bytearray(memoryview(write_iv)[: spec.salt_size]), rec_seq)


def session_crypto_info(session: Session) -> tuple[CryptoInfo, CryptoInfo]:
    """(TX, RX) crypto_info for a TLS 1.3 session."""
    if session.version != TLS_1_3_VERSION:
        raise KtlsError(f"TLS version {session.version:#x} is not supported for kTLS here", errno.EOPNOTSUPP)
    return (tls13_crypto_info(session.cipher, session.tx_secret, session.tx_seq),
            tls13_crypto_info(session.cipher, session.rx_secret, session.rx_seq))


def tx_max_payload(session: Session) -> int | None:
    """The TLS_TX_MAX_PAYLOAD_LEN the peer's record_size_limit asks for; None when full-size records are fine.

    Why the minus one: in TLS 1.3 the limit counts the inner content type byte
    (RFC 8449 section 4) and the kernel's value does not (its tls.rst; tlshd
    1.4.0 subtracts 1 too).  A limit at or above the protocol's ceiling asks
    for nothing, so no setsockopt is made (and no kernel is blamed for lacking it)."""
    limit = session.peer_record_size_limit
    if limit is None:
        return None
    payload = limit - 1 if session.version == TLS_1_3_VERSION else limit
    return payload if payload < TLS_MAX_PAYLOAD_SIZE else None


_no_tx_limit_lock = threading.Lock()
_no_tx_limit_logged = False  # once per process: every later session would say the same


def _kernel_cannot_limit(payload: int) -> None:
    global _no_tx_limit_logged
    with _no_tx_limit_lock:
        first, _no_tx_limit_logged = not _no_tx_limit_logged, True
    if first:
        log.warning("this kernel cannot limit kTLS record sizes (no SOL_TLS TLS_TX_MAX_PAYLOAD_LEN; Linux 7.2 "
                    "has it): a peer that announces an RFC 8449 record_size_limit still gets records of up to "
                    "16 KiB and may fail with record_overflow (first seen: %d-byte payload limit)", payload)
    else:
        log.debug("peer's record size limit (%d-byte payload) not enforced: no TLS_TX_MAX_PAYLOAD_LEN", payload)


def limit_tx_records(setsockopt: Callable[[int, int, Any], None], payload: int) -> bool:
    """TLS_TX_MAX_PAYLOAD_LEN = payload (a u16, as the kernel reads it); False if the kernel has no such option.

    Why not fail the handshake there: the keys are installed, and the consumer
    may never write more than the peer's limit at once (tlshd 1.0.0 on the same
    kernel sends full-size records too); the kernel's lack is logged once
    (ENOPROTOOPT, Linux 6.12).  Any other refusal is a KtlsError."""
    try:
        setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", payload))
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            _kernel_cannot_limit(payload)
            return False
        raise KtlsError(f"kernel refused TLS_TX_MAX_PAYLOAD_LEN {payload}: {exc.strerror}") from None
    return True


class KtlsInstaller(Protocol):
    """Where session keys go: the kernel, or the simulator standing in for it."""

    def install(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo,
                tx_max_payload: int | None = None) -> None: ...


def install_via(setsockopt: Callable[[int, int, Any], None], tx: CryptoInfo, rx: CryptoInfo,
                no_ulp: str = "kernel TLS is not available (tls module missing: CONFIG_TLS)",
                tx_max_payload: int | None = None) -> None:
    """TCP_ULP "tls", then TLS_TX, then TLS_RX through setsockopt(level, optname, value),
    then TLS_TX_MAX_PAYLOAD_LEN when tx_max_payload is given.

    The limit comes after TLS_TX because the kernel checks its range against
    the installed version (63 is legal only once it knows it is TLS 1.3), and
    before any data is sent (with an open record it answers EBUSY).

    One sequence and one error translation for the kernel and for the simulator
    standing in for it; `no_ulp` says what ENOENT on the ULP means there.
    Each struct is packed into a bytearray (setsockopt takes any buffer) and
    zeroed as soon as the call returns, whatever it returned.
    """
    try:
        setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise KtlsError(no_ulp) from None
        if exc.errno != errno.EEXIST:
            raise KtlsError(f"cannot attach the tls ULP: {exc.strerror}") from None
    for name, opt, info in (("TLS_TX", TLS_TX, tx), ("TLS_RX", TLS_RX, rx)):
        packed = info.pack()
        try:
            setsockopt(SOL_TLS, opt, packed)
        except OSError as exc:
            raise KtlsError(f"kernel refused {name} ({info.spec.name}): {exc.strerror}") from None
        finally:
            wipe(packed)
    if tx_max_payload is not None:
        limit_tx_records(setsockopt, tx_max_payload)


class KernelKtls:
    """The real thing: setsockopt on the handed-over TCP socket."""

    def install(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo,
                tx_max_payload: int | None = None) -> None:
        install_via(sock.setsockopt, tx, rx, tx_max_payload=tx_max_payload)


def install_session(installer: KtlsInstaller, sock: socket.socket, session: Session) -> None:
    """Derive both directions, install them, and zero the derived keys.

    The session's traffic secrets are left for the caller to wipe (it owns them)."""
    tx, rx = session_crypto_info(session)
    payload = tx_max_payload(session)
    try:
        if payload is None:  # the installers written before the option keep working
            installer.install(sock, tx, rx)
        else:
            installer.install(sock, tx, rx, tx_max_payload=payload)
        log.debug("kTLS installed on fd %d: TX %r, RX %r (%s)%s", sock.fileno(), tx, rx, session.cipher,
                  f", TX payload limit {payload} asked (peer's record_size_limit "
                  f"{session.peer_record_size_limit})" if payload is not None else "")
    finally:
        tx.wipe()
        rx.wipe()
