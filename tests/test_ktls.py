"""kTLS key derivation and crypto_info layouts, checked against RFC 8448 and the uapi.

A wrong byte here means the kernel encrypts with a key the peer does not have,
and the failure only shows on the first data record.  So the derivation is
pinned to the RFC 8448 section 3 trace (including two full encrypted records),
and the struct layout to include/uapi/linux/tls.h, field by field.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import socket
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from hsd.errors import KtlsError
from hsd.ktls import (
    CIPHERS,
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_RX,
    CryptoInfo,
    KernelKtls,
    cipher_spec,
    hkdf_expand_label,
    install_session,
    install_via,
    session_crypto_info,
    tls12_crypto_info,
    tls13_crypto_info,
)
from hsd.session import Session

# ---- RFC 8448 section 3, "Simple 1-RTT Handshake" (TLS_AES_128_GCM_SHA256), copied from the RFC text
RFC8448_EARLY_SECRET = bytes.fromhex(
    "33 ad 0a 1c 60 7e c0 3b 09 e6 cd 98 93 68 0c e2 10 ad f3 00 aa 1f 26 60 e1 b2 2e 10 f1 70 f9 2a")
RFC8448_DERIVED_FROM_EARLY = bytes.fromhex(
    "6f 26 15 a1 08 c7 02 c5 67 8f 54 fc 9d ba b6 97 16 c0 76 18 9c 48 25 0c eb ea c3 57 6c 36 11 ba")
RFC8448_S_HS_TRAFFIC = bytes.fromhex(
    "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38")
RFC8448_S_HS_KEY = bytes.fromhex("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
RFC8448_S_HS_IV = bytes.fromhex("5d 31 3e b2 67 12 76 ee 13 00 0b 30")
RFC8448_C_HS_TRAFFIC = bytes.fromhex(
    "b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f 3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21")
RFC8448_C_HS_KEY = bytes.fromhex("db fa a6 93 d1 76 2c 5b 66 6a f5 d9 50 25 8d 01")
RFC8448_C_HS_IV = bytes.fromhex("5b d3 c7 1b 83 6e 0b 76 bb 73 26 5f")
RFC8448_C_AP_TRAFFIC = bytes.fromhex(
    "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5")
RFC8448_S_AP_TRAFFIC = bytes.fromhex(
    "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43")
RFC8448_C_AP_KEY = bytes.fromhex("17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51")
RFC8448_C_AP_IV = bytes.fromhex("5b 78 92 3d ee 08 57 90 33 e5 23 d9")
RFC8448_S_AP_KEY = bytes.fromhex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")
RFC8448_S_AP_IV = bytes.fromhex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84")
# the application data both sides send (50 octets 00..31), and the records on the wire
RFC8448_APP_PLAINTEXT = bytes(range(0x32))
RFC8448_CLIENT_APP_RECORD = bytes.fromhex(  # client, first record under the client ap key (seq 0)
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa"
    "66 bc ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2"
    "97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4")
RFC8448_SERVER_APP_RECORD = bytes.fromhex(  # server, after its NewSessionTicket (seq 1)
    "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f"
    "82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2"
    "1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d")

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_AES_128_CCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"]


# ---------------------------------------------------------------- HKDF-Expand-Label


@pytest.mark.parametrize("secret,label,key,iv", [
    (RFC8448_S_HS_TRAFFIC, "server handshake", RFC8448_S_HS_KEY, RFC8448_S_HS_IV),
    (RFC8448_C_HS_TRAFFIC, "client handshake", RFC8448_C_HS_KEY, RFC8448_C_HS_IV),
    (RFC8448_C_AP_TRAFFIC, "client application", RFC8448_C_AP_KEY, RFC8448_C_AP_IV),
    (RFC8448_S_AP_TRAFFIC, "server application", RFC8448_S_AP_KEY, RFC8448_S_AP_IV),
])
def test_hkdf_expand_label_reproduces_rfc8448_keys_and_ivs(secret: bytes, label: str, key: bytes, iv: bytes) -> None:
    assert hkdf_expand_label(secret, "key", b"", 16, hashes.SHA256()) == key, label
    assert hkdf_expand_label(secret, "iv", b"", 12, hashes.SHA256()) == iv, label


def test_hkdf_expand_label_with_a_context() -> None:
    # Derive-Secret(early, "derived", "") = HKDF-Expand-Label(early, "derived", SHA256(""), 32)
    out = hkdf_expand_label(RFC8448_EARLY_SECRET, "derived", hashlib.sha256(b"").digest(), 32, hashes.SHA256())
    assert out == RFC8448_DERIVED_FROM_EARLY


def _independent_expand_label(secret: bytes, label: bytes, length: int, digest: str) -> bytes:
    """RFC 5869 HKDF-Expand with RFC 8446 HkdfLabel, written out with hmac (no cryptography)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\0"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), digest).digest()
        out += block
        counter += 1
    return out[:length]


@pytest.mark.parametrize("suite,digest", [
    ("TLS_AES_128_GCM_SHA256", "sha256"), ("TLS_AES_256_GCM_SHA384", "sha384"),
    ("TLS_AES_128_CCM_SHA256", "sha256"), ("TLS_CHACHA20_POLY1305_SHA256", "sha256"),
])
def test_each_suite_derives_with_its_own_hash(suite: str, digest: str) -> None:
    secret = bytes(range(48 if digest == "sha384" else 32))
    spec = cipher_spec(suite)
    info = tls13_crypto_info(suite, secret, 0)
    assert info.key == _independent_expand_label(secret, b"key", spec.key_size, digest)
    assert info.nonce_base() == _independent_expand_label(secret, b"iv", 12, digest)


# ---------------------------------------------------------------- the RFC 8448 records, end to end


def _seal_tls13_record(info: CryptoInfo, seq: int, plaintext: bytes, content_type: int = 23) -> bytes:
    """Encrypt one TLS 1.3 record the way the kernel does with this crypto_info."""
    nonce = bytes(a ^ b for a, b in zip(info.nonce_base(), seq.to_bytes(12, "big")))
    inner = plaintext + bytes([content_type])
    header = bytes([23, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
    aead = {51: AESGCM, 52: AESGCM, 53: AESCCM, 54: ChaCha20Poly1305}[info.cipher_type](info.key)
    return header + aead.encrypt(nonce, inner, header)


def test_crypto_info_from_the_client_secret_encrypts_the_rfc8448_client_record() -> None:
    info = tls13_crypto_info("TLS_AES_128_GCM_SHA256", RFC8448_C_AP_TRAFFIC, 0)
    assert _seal_tls13_record(info, 0, RFC8448_APP_PLAINTEXT) == RFC8448_CLIENT_APP_RECORD


def test_crypto_info_from_the_server_secret_encrypts_the_rfc8448_server_record() -> None:
    info = tls13_crypto_info("TLS_AES_128_GCM_SHA256", RFC8448_S_AP_TRAFFIC, 1)
    assert info.rec_seq == 1
    assert _seal_tls13_record(info, 1, RFC8448_APP_PLAINTEXT) == RFC8448_SERVER_APP_RECORD


def test_rfc8448_crypto_info_bytes() -> None:
    info = tls13_crypto_info("TLS_AES_128_GCM_SHA256", RFC8448_S_AP_TRAFFIC, 1)
    assert (info.version, info.cipher_type) == (TLS_1_3_VERSION, 51)
    assert info.salt == RFC8448_S_AP_IV[:4] and info.iv == RFC8448_S_AP_IV[4:] and info.key == RFC8448_S_AP_KEY
    expected = (struct.pack("=HH", 0x0304, 51) + RFC8448_S_AP_IV[4:] + RFC8448_S_AP_KEY + RFC8448_S_AP_IV[:4]
                + bytes.fromhex("0000000000000001"))
    assert info.pack() == expected
    assert len(expected) == 40


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("suite,size,cipher_type,iv,key,salt", [
    ("TLS_AES_128_GCM_SHA256", 40, 51, 8, 16, 4),
    ("TLS_AES_256_GCM_SHA384", 56, 52, 8, 32, 4),
    ("TLS_AES_128_CCM_SHA256", 40, 53, 8, 16, 4),
    ("TLS_CHACHA20_POLY1305_SHA256", 56, 54, 12, 32, 0),
    ("TLS_SM4_GCM_SM3", 40, 55, 8, 16, 4),
    ("TLS_SM4_CCM_SM3", 40, 56, 8, 16, 4),
])
def test_struct_sizes_and_field_order(suite: str, size: int, cipher_type: int, iv: int, key: int, salt: int) -> None:
    spec = CIPHERS[suite]
    assert (spec.cipher_type, spec.iv_size, spec.key_size, spec.salt_size, spec.struct_size) == (cipher_type, iv, key, salt, size)
    info = CryptoInfo(TLS_1_3_VERSION, cipher_type, key=b"K" * key, iv=b"I" * iv, salt=b"S" * salt,
                      rec_seq=0x0102030405060708)
    raw = info.pack()
    assert len(raw) == size
    # struct tls12_crypto_info_*: { u16 version; u16 cipher_type; iv; key; salt; rec_seq[8] }, no padding
    assert struct.unpack_from("=HH", raw) == (0x0304, cipher_type)
    assert raw[4:4 + iv] == b"I" * iv
    assert raw[4 + iv:4 + iv + key] == b"K" * key
    assert raw[4 + iv + key:4 + iv + key + salt] == b"S" * salt
    assert raw[-8:] == bytes.fromhex("0102030405060708")  # big-endian, as the kernel increments it
    assert CryptoInfo.unpack(raw) == info


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_AES_128_CCM_SHA256"])
def test_gcm_and_ccm_split_the_write_iv_into_salt_and_iv(suite: str) -> None:
    secret = bytes(48)
    write_iv = hkdf_expand_label(secret, "iv", b"", 12, cipher_spec(suite).hash())
    info = tls13_crypto_info(suite, secret, 5)
    assert (info.salt, info.iv) == (write_iv[:4], write_iv[4:])
    assert info.nonce_base() == write_iv and info.rec_seq == 5


def test_chacha20_keeps_the_whole_iv_and_has_no_salt() -> None:
    secret = bytes(range(32))
    write_iv = hkdf_expand_label(secret, "iv", b"", 12, hashes.SHA256())
    info = tls13_crypto_info("TLS_CHACHA20_POLY1305_SHA256", secret, 0)
    assert info.salt == b"" and info.iv == write_iv and len(info.key) == 32
    assert info.nonce_base() == write_iv


@pytest.mark.parametrize("suite", SUITES)
def test_derived_crypto_info_round_trips_and_seals_a_record(suite: str) -> None:
    secret = bytes(range(48 if "384" in suite else 32))
    info = tls13_crypto_info(suite, secret, 7)
    assert CryptoInfo.unpack(info.pack()) == info
    record = _seal_tls13_record(info, 7, b"hello")
    assert record[:3] == b"\x17\x03\x03" and len(record) == 5 + 5 + 1 + 16


def test_tls12_gcm_layout() -> None:
    key, write_iv = bytes(range(16)), bytes(range(100, 112))
    info = tls12_crypto_info("TLS_AES_128_GCM_SHA256", key, write_iv, 0x0A0B)
    assert info.version == TLS_1_2_VERSION and info.cipher_type == 51
    assert info.salt == write_iv[:4]  # the implicit part
    assert info.iv == (0x0A0B).to_bytes(8, "big")  # explicit nonce = sequence number
    raw = info.pack()
    assert struct.unpack_from("=HH", raw) == (0x0303, 51) and len(raw) == 40
    assert CryptoInfo.unpack(raw) == info


def test_tls12_chacha20_layout() -> None:
    key, write_iv = bytes(range(32)), bytes(range(12))
    info = tls12_crypto_info("TLS_CHACHA20_POLY1305_SHA256", key, write_iv, 3)
    assert (info.version, info.salt, info.iv, info.key, info.rec_seq) == (TLS_1_2_VERSION, b"", write_iv, key, 3)
    assert len(info.pack()) == 56


def test_cipher_names_and_aliases() -> None:
    assert cipher_spec("AES128-GCM-SHA256") is CIPHERS["TLS_AES_128_GCM_SHA256"]
    assert cipher_spec("TLS_AES_256_GCM_SHA384").hash is hashes.SHA384
    with pytest.raises(KtlsError) as info:
        cipher_spec("TLS_RSA_WITH_RC4_128_MD5")
    assert info.value.status == errno.EOPNOTSUPP and "no kernel TLS equivalent" in str(info.value)


# ---------------------------------------------------------------- validation


def test_pack_rejects_wrong_field_sizes() -> None:
    with pytest.raises(ValueError, match="wrong field sizes for AES_GCM_128"):
        CryptoInfo(TLS_1_3_VERSION, 51, key=b"k" * 32, iv=b"i" * 8, salt=b"s" * 4, rec_seq=0).pack()
    with pytest.raises(ValueError, match="wrong field sizes for CHACHA20_POLY1305"):
        CryptoInfo(TLS_1_3_VERSION, 54, key=b"k" * 32, iv=b"i" * 8, salt=b"s" * 4, rec_seq=0).pack()


def test_unpack_validation() -> None:
    good = tls13_crypto_info("TLS_AES_128_GCM_SHA256", bytes(32), 0).pack()
    with pytest.raises(ValueError, match="shorter than its header"):
        CryptoInfo.unpack(b"\x04\x03\x33")
    with pytest.raises(ValueError, match="unknown cipher type 50"):
        CryptoInfo.unpack(struct.pack("=HH", TLS_1_3_VERSION, 50) + good[4:])
    with pytest.raises(ValueError, match="unknown TLS version 0x302"):
        CryptoInfo.unpack(struct.pack("=HH", 0x0302, 51) + good[4:])
    with pytest.raises(ValueError, match="is 40 bytes, got 39"):
        CryptoInfo.unpack(good[:-1])
    with pytest.raises(ValueError, match="is 40 bytes, got 41"):
        CryptoInfo.unpack(good + b"\0")
    with pytest.raises(ValueError, match="is 56 bytes, got 40"):  # a ChaCha20 header on a GCM-sized struct
        CryptoInfo.unpack(struct.pack("=HH", TLS_1_3_VERSION, 54) + good[4:])


# ---------------------------------------------------------------- sessions and secrets


def _session(**kw: object) -> Session:
    args: dict = dict(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(RFC8448_S_AP_TRAFFIC),
                      rx_secret=bytearray(RFC8448_C_AP_TRAFFIC), tx_seq=1, rx_seq=0)
    args.update(kw)
    return Session(**args)  # type: ignore[arg-type]


def test_session_crypto_info_is_tx_then_rx() -> None:
    tx, rx = session_crypto_info(_session())
    assert (tx.key, tx.nonce_base(), tx.rec_seq) == (RFC8448_S_AP_KEY, RFC8448_S_AP_IV, 1)
    assert (rx.key, rx.nonce_base(), rx.rec_seq) == (RFC8448_C_AP_KEY, RFC8448_C_AP_IV, 0)


def test_tls12_session_is_refused() -> None:
    with pytest.raises(KtlsError, match="0x303") as info:
        session_crypto_info(_session(version=0x0303))
    assert info.value.status == errno.EOPNOTSUPP


def test_unknown_cipher_in_a_session_is_refused() -> None:
    with pytest.raises(KtlsError) as info:
        session_crypto_info(_session(cipher="TLS_AES_128_CCM_8_SHA256"))
    assert info.value.status == errno.EOPNOTSUPP


def test_repr_never_shows_keys_or_secrets() -> None:
    session = _session()
    tx, rx = session_crypto_info(session)
    for obj in (tx, rx, session):
        text = repr(obj) + str(obj)
        for secret in (tx.key, rx.key, tx.iv, tx.salt, RFC8448_S_AP_TRAFFIC, RFC8448_C_AP_TRAFFIC):
            assert secret.hex() not in text and repr(secret) not in text and secret.hex(" ") not in text
    assert repr(tx) == "CryptoInfo(AES_GCM_128, version=0x304, rec_seq=1)"


def test_session_wipe_zeroes_secrets_in_place() -> None:
    session = _session()
    tx_buf = session.tx_secret
    session.wipe()
    assert tx_buf == bytearray(32) and session.rx_secret == bytearray(32)


@pytest.mark.parametrize("secret", [RFC8448_S_AP_TRAFFIC, None, "not bytes", memoryview(RFC8448_S_AP_TRAFFIC), 7])
def test_session_wipe_never_raises_and_still_zeroes_what_it_can(secret: object) -> None:
    """wipe() runs in the dispatcher's finally: a plugin's immutable or odd secret must not cost the DONE."""
    session = _session(tx_secret=secret)
    rx = session.rx_secret
    session.wipe()
    assert rx == bytearray(32)


# ---------------------------------------------------------------- the kernel installer on this machine (no kTLS)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: what the kernel hands the daemon is one end of such a connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _kernel_has_ktls() -> bool:
    probe = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(probe.getsockname())
    s, _ = probe.accept()
    try:
        c.setsockopt(socket.IPPROTO_TCP, 31, b"tls")
        return True
    except OSError as exc:
        return exc.errno != errno.ENOENT
    finally:
        for sock in (c, s, probe):
            sock.close()


@pytest.mark.skipif(_kernel_has_ktls(), reason="this kernel has kTLS; the no-kTLS path cannot be exercised here")
def test_kernel_ktls_without_tls_module_names_config_tls(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = tcp_pair
    tx, rx = session_crypto_info(_session())
    with pytest.raises(KtlsError) as info:
        KernelKtls().install(client, tx, rx)
    assert "CONFIG_TLS" in str(info.value)
    assert info.value.status == errno.EIO
    assert info.value.__cause__ is None and info.value.__suppress_context__  # raised "from None"
    for secret in (tx.key, rx.key):
        assert secret.hex() not in str(info.value)
    # the socket is untouched and still usable as plain TCP
    client.sendall(b"ping")
    assert tcp_pair[1].recv(4) == b"ping"


@pytest.mark.skipif(_kernel_has_ktls(), reason="this kernel has kTLS; the no-kTLS path cannot be exercised here")
def test_install_session_surfaces_the_same_ktls_error(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(KtlsError, match="CONFIG_TLS"):
        install_session(KernelKtls(), tcp_pair[0], _session())


def test_install_session_hands_derived_keys_to_the_installer(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    class Recording:
        """A KtlsInstaller that copies what it was given at the call, as the kernel does."""

        def __init__(self) -> None:
            self.calls: list[tuple[socket.socket, CryptoInfo, CryptoInfo, bytes, bytes]] = []

        def install(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo) -> None:
            self.calls.append((sock, tx, rx, bytes(tx.pack()), bytes(rx.pack())))

    installer = Recording()
    install_session(installer, tcp_pair[0], _session())
    ((sock, tx, rx, tx_packed, rx_packed),) = installer.calls
    assert sock is tcp_pair[0]
    assert tx_packed == tls13_crypto_info("TLS_AES_128_GCM_SHA256", RFC8448_S_AP_TRAFFIC, 1).pack()
    assert rx_packed == tls13_crypto_info("TLS_AES_128_GCM_SHA256", RFC8448_C_AP_TRAFFIC, 0).pack()
    # once the installer returned, the daemon's own derived keys are zeroed in place
    for info in (tx, rx):
        assert not any(info.key) and not any(info.iv) and not any(info.salt)


def test_install_session_zeroes_derived_keys_when_the_kernel_refuses(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    seen: list[CryptoInfo] = []

    class Refusing:
        def install(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo) -> None:
            seen.extend((tx, rx))
            raise KtlsError("kernel refused TLS_TX (AES_GCM_128): Invalid argument")

    with pytest.raises(KtlsError):
        install_session(Refusing(), tcp_pair[0], _session())
    assert len(seen) == 2 and not any(any(info.key) for info in seen)


def test_each_packed_struct_is_a_buffer_zeroed_right_after_its_setsockopt() -> None:
    """setsockopt gets a bytearray (no immutable copy of the key) and finds it zeroed afterwards."""
    handed: list[tuple[int, int, object, bytes]] = []

    def setsockopt(level: int, optname: int, value: object) -> None:
        handed.append((level, optname, value, bytes(value) if not isinstance(value, bytes) else value))
        if optname == TLS_RX:
            raise OSError(errno.EINVAL, "Invalid argument")

    tx, rx = session_crypto_info(_session())
    with pytest.raises(KtlsError, match="kernel refused TLS_RX"):
        install_via(setsockopt, tx, rx)
    (_, _, ulp, _), (_, _, tx_buf, tx_seen), (_, _, rx_buf, rx_seen) = handed
    assert ulp == b"tls"
    assert tx_seen == tx.pack() and rx_seen == rx.pack()  # the kernel saw the real structs...
    for buf in (tx_buf, rx_buf):  # ...in mutable buffers that were zeroed after the call, refused or not
        assert isinstance(buf, bytearray) and not any(buf)


def test_crypto_info_wipe_and_buffers() -> None:
    info = tls13_crypto_info("TLS_AES_256_GCM_SHA384", bytes(range(48)), 0)
    assert all(isinstance(b, bytearray) for b in (info.key, info.iv, info.salt))
    packed = info.pack()
    assert isinstance(packed, bytearray) and CryptoInfo.unpack(packed) == info
    info.wipe()
    assert (info.key, info.iv, info.salt) == (bytearray(32), bytearray(8), bytearray(4))


def test_hkdf_without_derive_into_gives_the_same_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older cryptography releases have no derive_into: the derive() fallback must yield the same bytearrays."""
    import hsd.ktls as ktls
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    class DeriveOnly:
        def __init__(self, **kw: object) -> None:
            self._hkdf = HKDFExpand(**kw)  # type: ignore[arg-type]

        def derive(self, key_material: bytes) -> bytes:
            return self._hkdf.derive(key_material)

    monkeypatch.setattr(ktls, "HKDFExpand", DeriveOnly)
    out = hkdf_expand_label(bytearray(RFC8448_S_AP_TRAFFIC), "key", b"", 16, hashes.SHA256())
    assert isinstance(out, bytearray) and out == RFC8448_S_AP_KEY
