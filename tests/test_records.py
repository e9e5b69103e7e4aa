"""The user-space record checker against RFC 8448 and itself.

Backend tests trust this checker to prove kTLS keys, so it is pinned to the
RFC 8448 section 3 trace first (byte-exact records), then round-tripped for
every kTLS suite, including the cases it must refuse (bad tag, alert, KeyUpdate).
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

import pytest

from hsd.ktls import CIPHERS, tls13_crypto_info
from hsd_kit.records import (
    APPLICATION_DATA,
    HANDSHAKE,
    NEW_SESSION_TICKET,
    KtlsRecordChecker,
    RecordError,
    RecordProtection,
    TlsAlert,
)

# RFC 8448 section 3 ("Simple 1-RTT Handshake", TLS_AES_128_GCM_SHA256), from the RFC text
C_AP_TRAFFIC = bytes.fromhex(
    "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7 c1 75 04 a5")
S_AP_TRAFFIC = bytes.fromhex(
    "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43")
APP_PLAINTEXT = bytes(range(0x32))
CLIENT_APP_RECORD = bytes.fromhex(  # client's first record under its application key (seq 0)
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa"
    "66 bc ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2"
    "97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4")
SERVER_APP_RECORD = bytes.fromhex(  # server's record after its NewSessionTicket (seq 1)
    "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f"
    "82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2"
    "1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d")

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
          "TLS_AES_128_CCM_SHA256"]
RFC_SUITE = "TLS_AES_128_GCM_SHA256"


def test_seal_reproduces_rfc8448_client_record() -> None:
    client_tx = RecordProtection(tls13_crypto_info(RFC_SUITE, C_AP_TRAFFIC, 0))
    assert client_tx.seal(APPLICATION_DATA, APP_PLAINTEXT) == CLIENT_APP_RECORD
    assert client_tx.seq == 1


def test_open_decrypts_rfc8448_server_record_at_seq_1() -> None:
    client_rx = RecordProtection(tls13_crypto_info(RFC_SUITE, S_AP_TRAFFIC, 1))
    assert client_rx.open(SERVER_APP_RECORD) == (APPLICATION_DATA, APP_PLAINTEXT)


def test_open_rejects_rfc8448_record_at_wrong_sequence_number() -> None:
    client_rx = RecordProtection(tls13_crypto_info(RFC_SUITE, S_AP_TRAFFIC, 0))
    with pytest.raises(RecordError, match="bad authentication tag"):
        client_rx.open(SERVER_APP_RECORD)


def test_open_rejects_rfc8448_record_under_the_other_directions_key() -> None:
    server_rx = RecordProtection(tls13_crypto_info(RFC_SUITE, S_AP_TRAFFIC, 0))
    with pytest.raises(RecordError):
        server_rx.open(CLIENT_APP_RECORD)


@contextmanager
def paired(suite: str, seq_a: int = 0, seq_b: int = 0) -> Iterator[tuple[KtlsRecordChecker, KtlsRecordChecker]]:
    """Two checkers on a socketpair, keyed like a client (a) and a server (b); the sockets close after."""
    a_sock, b_sock = socket.socketpair()
    size = 48 if "384" in suite else 32
    a_secret, b_secret = bytes(range(48))[:size], bytes(range(100, 148))[:size]
    with a_sock, b_sock:
        yield (KtlsRecordChecker(a_sock, tls13_crypto_info(suite, a_secret, seq_a),
                                 tls13_crypto_info(suite, b_secret, seq_b), timeout=5),
               KtlsRecordChecker(b_sock, tls13_crypto_info(suite, b_secret, seq_b),
                                 tls13_crypto_info(suite, a_secret, seq_a), timeout=5))


@pytest.mark.parametrize("suite", SUITES)
def test_round_trip_both_directions(suite: str) -> None:
    with paired(suite, seq_a=7, seq_b=123456) as (a, b):
        big = bytes(range(256)) * 200  # 51200 bytes: four records
        a.send(b"ping\n")
        assert b.recv_until(b"\n") == b"ping\n"
        b.send(big)
        received = bytearray()
        while len(received) < len(big):
            received += a.recv_data()
        assert bytes(received) == big
        assert (a.tx.seq, a.rx.seq) == (8, 123456 + 4)


def test_wire_format_matches_suite_overhead() -> None:
    for suite in SUITES:
        sealed = RecordProtection(tls13_crypto_info(suite, bytes(48 if "384" in suite else 32), 0)).seal(APPLICATION_DATA, b"x" * 10)
        assert sealed[:3] == b"\x17\x03\x03"
        assert int.from_bytes(sealed[3:5], "big") == 10 + 1 + 16 == len(sealed) - 5
    assert set(SUITES) <= set(CIPHERS)


def test_post_handshake_messages_are_skipped_and_recorded() -> None:
    with paired(RFC_SUITE) as (a, b):
        two_tickets = (bytes([NEW_SESSION_TICKET]) + (5).to_bytes(3, "big") + b"tick1"
                       + bytes([NEW_SESSION_TICKET]) + (5).to_bytes(3, "big") + b"tick2")
        b._send_all(b.tx.seal(HANDSHAKE, two_tickets))
        b.send(b"after tickets\n")
        assert a.recv_until(b"\n") == b"after tickets\n"
        assert a.handshake_messages == [NEW_SESSION_TICKET, NEW_SESSION_TICKET]


def test_key_update_is_refused() -> None:
    with paired(RFC_SUITE) as (a, b):
        b._send_all(b.tx.seal(HANDSHAKE, bytes([24, 0, 0, 1, 0])))
        with pytest.raises(RecordError, match="KeyUpdate"):
            a.recv_data()


def test_alert_raises_with_its_description() -> None:
    with paired("TLS_CHACHA20_POLY1305_SHA256") as (a, b):
        b.send_close_notify()
        with pytest.raises(TlsAlert) as info:
            a.recv_data()
        assert (info.value.level, info.value.description) == (1, 0)


def test_tampered_record_fails_its_tag() -> None:
    with paired("TLS_AES_128_CCM_SHA256") as (a, b):
        record = bytearray(b.tx.seal(APPLICATION_DATA, b"integrity"))
        record[8] ^= 0x01
        b._send_all(bytes(record))
        with pytest.raises(RecordError, match="bad authentication tag"):
            a.recv_data()

