"""[debug] tls and nl (issue 15 point 3): handshake and netlink traces in the daemon's log, never secrets.

The real daemon (`hsd --simulator ... -s`, its stderr to a file) against the kernel simulator, with real
peers: openssl s_server / s_client and an external-PSK s_server.  For both backends the log must show
the handshake messages in order with their direction, alerts sent and received, and the negotiated
parameters - and the peer's own choice (a forced suite) must be what the trace names; with the levels
at 0 none of it appears; with [debug] nl the ACCEPT fields and DONE status.  The kTLS keys the simulator
received and the PSK bytes must not appear in the log, in any common encoding, at the maximal levels.
"""

from __future__ import annotations

import base64
import errno
import logging
import re
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from hsd import keyring
from hsd.tlstrace import HELLO_RETRY_RANDOM, TlsTrace
from hsd_kit import peers
from hsd_kit.keyrings import ThrowawayKeyring
from hsd_kit.pki import TestPki
from hsd_kit.processes import DaemonProcesses
from hsd_kit.simulator import Simulator

BACKENDS = ["openssl", "tlslite"]
USER_ALL = 0x3F3F0000  # possessor and user: every key permission
WAIT = 20.0
SUITE = "TLS_CHACHA20_POLY1305_SHA256"  # not any backend's first choice: the peer's forcing shows
CLIENT_FLIGHT = ["-> ClientHello", "<- ServerHello", "<- EncryptedExtensions", "<- Certificate (",
                 "<- CertificateVerify", "<- Finished", "-> Finished"]
SERVER_FLIGHT = ["<- ClientHello", "-> ServerHello", "-> EncryptedExtensions", "-> CertificateRequest",
                 "-> Certificate (", "-> CertificateVerify", "-> Finished",
                 ("<- Certificate (", "<- CompressedCertificate ("),  # RFC 8879, as Debian's OpenSSL sends it
                 "<- CertificateVerify", "<- Finished"]


@contextmanager
def daemon(tmp_path: Path, pki: TestPki, backend: str, debug: str, hsd: str = "") -> Iterator[tuple[Simulator, Path]]:
    """hsd serving the simulator with `debug` as its [debug] section (`hsd`: more [hsd] lines); yields (simulator, log)."""
    config = tmp_path / "hsd.conf"
    config.write_text(f"[debug]\n{debug}\n"
                      f"[authenticate.client]\nx509.truststore={pki.ca}\n"
                      f"x509.certificate={pki.client.cert}\nx509.private_key={pki.client.key}\n"
                      f"[authenticate.server]\nx509.truststore={pki.ca}\n"
                      f"x509.certificate={pki.server.chain}\nx509.private_key={pki.server.key}\n"
                      f"[hsd]\nbackend={backend}\ncontrol_socket={tmp_path / 'control'}\n{hsd}\n")
    log = tmp_path / "hsd.log"
    with Simulator() as sim:
        daemon = DaemonProcesses(sim, ["hsd.cli", "-c", str(config), "-s"], log_path=str(log),
                                 notify_socket=str(tmp_path / "notify"))  # returns at READY=1
        try:
            yield sim, log
        finally:
            assert daemon.stop() == 0, log.read_text()


def handshake_lines(log: Path, count: int) -> str:
    """The log once `count` handshakes have their one line (it comes after DONE)."""
    deadline = time.monotonic() + WAIT
    while (text := log.read_text()).count(" handshake peer=") < count:
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def in_order(text: str, wanted: list, label: str) -> None:
    """Each wanted fragment (or one of a tuple of them) on a trace line of `label`, in this order;
    and any message the library wrote after the handshake is traced as dropped, never sent."""
    lines = [line for line in text.splitlines() if f"tls {label}:" in line]
    assert all("dropped, never sent" in line for line in lines if "-> NewSessionTicket" in line), lines
    at = 0
    for fragment in wanted:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        found = next((i for i in range(at, len(lines)) if any(o in lines[i] for o in options)), None)
        assert found is not None, f"{fragment!r} not after line {at} of the {label} trace:\n" + "\n".join(lines)
        at = found + 1


def label_of(text: str, role: str) -> str:
    match = re.search(rf"tls (fd \d+ {role}):", text)
    assert match, text
    return match.group(1)


def client_against_s_server(sim: Simulator, pki: TestPki, **options) -> tuple[int, object]:
    opts = peers.PeerOptions(cert=pki.server.cert, key=pki.server.key, ca=pki.ca, **options)
    with peers.openssl_server(opts).start() as server:
        mine = server.connect()
        request = sim.client_hello_x509(mine, peername="localhost", timeout_ms=10000)
        status = request.wait(WAIT)[0]
        mine.close()
    return status, request


def server_against_s_client(sim: Simulator, pki: TestPki) -> tuple[int, object]:
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            peers.openssl_client(peers.PeerOptions(ca=pki.ca, cert=pki.client.cert, key=pki.client.key),
                                 listener.getsockname()[1]).start():
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        request = sim.server_hello_x509(conn, timeout_ms=10000)
        status = request.wait(WAIT)[0]
        conn.close()
    return status, request


@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_trace_shows_both_flights_in_order_and_what_was_negotiated(tmp_path, hsd_pki, backend) -> None:
    with daemon(tmp_path, hsd_pki, backend, "tls=5") as (sim, log):
        assert client_against_s_server(sim, hsd_pki, suites=[SUITE])[0] == 0
        assert server_against_s_client(sim, hsd_pki)[0] == 0
        text = handshake_lines(log, 2)
    client, server = label_of(text, "client"), label_of(text, "server")
    in_order(text, CLIENT_FLIGHT + ["negotiated version TLS 1.3, cipher " + SUITE], client)
    in_order(text, SERVER_FLIGHT + ["negotiated version TLS 1.3, cipher "], server)
    negotiated = [line for line in text.splitlines() if "negotiated version" in line]
    assert len(negotiated) == 2, negotiated
    assert "group " in negotiated[0] and "signature (peer's) " in negotiated[0] and "sni localhost" in negotiated[0]
    assert "signature (ours) " in negotiated[1] and "signature (peer's) " in negotiated[1]  # mutual TLS
    assert f"suite={SUITE}" in text  # the daemon's own handshake line agrees with the trace
    assert "nl:" not in text  # [debug] nl stays 0


def test_tls_trace_from_an_isolated_handshake(tmp_path, hsd_pki) -> None:
    """isolation = process: the handshake (and its tracer) runs in a forked child, whose lines still arrive."""
    with daemon(tmp_path, hsd_pki, "openssl", "tls=5", hsd="isolation=process") as (sim, log):
        assert client_against_s_server(sim, hsd_pki, suites=[SUITE])[0] == 0
        text = handshake_lines(log, 1)
    in_order(text, CLIENT_FLIGHT + ["negotiated version TLS 1.3, cipher " + SUITE], label_of(text, "client"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_levels_gate_the_messages_and_alerts_are_traced(tmp_path, hsd_pki, backend) -> None:
    with daemon(tmp_path, hsd_pki, backend, "tls=1") as (sim, log):
        assert client_against_s_server(sim, hsd_pki)[0] == 0
        # a server that presents a certificate not issued for "localhost": we refuse it with a fatal alert
        opts = peers.PeerOptions(cert=hsd_pki.client.cert, key=hsd_pki.client.key, ca=hsd_pki.ca)
        with peers.openssl_server(opts).start() as server:
            mine = server.connect()
            status = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000).wait(WAIT)[0]
            mine.close()
        assert status != 0
        text = handshake_lines(log, 2)
    assert "negotiated version TLS 1.3" in text
    assert "ClientHello" not in text and "Finished" not in text, "messages are level 4"
    alert = [line for line in text.splitlines() if "-> alert " in line]
    assert alert and "(fatal) sent" in alert[0], text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_received_alert_is_traced(tmp_path, hsd_pki, backend) -> None:
    """hsd as the server, an s_client that trusts another issuer: its fatal alert comes before its Finished."""
    with daemon(tmp_path, hsd_pki, backend, "tls=4") as (sim, log):
        opts = peers.PeerOptions(ca=hsd_pki.client.cert, cert=hsd_pki.client.cert, key=hsd_pki.client.key)
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                peers.openssl_client(opts, listener.getsockname()[1]).start():
            listener.settimeout(WAIT)
            conn, _ = listener.accept()
            status = sim.server_hello_x509(conn, timeout_ms=10000).wait(WAIT)[0]
            conn.close()
        assert status != 0
        text = handshake_lines(log, 1)
    server = label_of(text, "server")
    in_order(text, ["<- ClientHello", "-> ServerHello", "-> Certificate", "-> CertificateVerify", "-> Finished",
                    "<- alert unknown_ca (fatal) received"], server)
    assert "negotiated" not in text  # the handshake never completed
    assert "<- Finished" not in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_at_zero_trace_nothing(tmp_path, hsd_pki, backend) -> None:
    with daemon(tmp_path, hsd_pki, backend, "loglevel=1\ntls=0\nnl=0") as (sim, log):
        assert client_against_s_server(sim, hsd_pki)[0] == 0
        text = handshake_lines(log, 1)
    assert "ACCEPT fd=" in text  # loglevel's own debug lines are there
    for fragment in ("ClientHello", "ServerHello", "negotiated", "tls fd", "nl:", "alert"):
        assert fragment not in text, fragment


@pytest.mark.parametrize("backend", BACKENDS)
def test_nl_trace_shows_accept_fields_and_done_status(tmp_path, hsd_pki, backend) -> None:
    with daemon(tmp_path, hsd_pki, backend, "nl=5") as (sim, log):
        assert client_against_s_server(sim, hsd_pki)[0] == 0
        with peers.closing_peer() as closing:
            sock = closing.connect()
            failed = sim.client_hello_anon(sock, peername="peer.example", timeout_ms=7000).wait(WAIT)[0]
            sock.close()
        assert failed != 0
        text = handshake_lines(log, 2)
    nl = [line.split("nl: ", 1)[1] for line in text.splitlines() if "nl: " in line]
    assert any(line.startswith("READY x") for line in nl), nl
    accepts = [line for line in nl if line.startswith("ACCEPT reply: ")]
    assert len(accepts) == 2, nl
    assert re.search(r"sockfd=\d+ message_type=CLIENTHELLO auth_mode=X509 timeout=10000ms peername='localhost'",
                     accepts[0]), accepts
    assert "auth_mode=UNAUTH timeout=7000ms peername='peer.example'" in accepts[1], accepts
    for attribute in ("SOCKFD(1)=", "MESSAGE_TYPE(3)=1 (CLIENTHELLO)", "AUTH_MODE(5)=3 (X509)",
                      "PEERNAME(8)='localhost'", "TIMEOUT(4)=10000", "STATUS(1)=0", "SOCKFD(2)=", "REMOTE_AUTH(3)="):
        assert any(line.strip().startswith(attribute) for line in nl), (attribute, nl)
    dones = [line for line in nl if line.startswith("DONE: ")]
    assert len(dones) == 2, nl
    assert "status=0 (ok)" in dones[0] and "kernel answered 0 (accepted)" in dones[0], dones
    name = errno.errorcode[failed]
    assert f"status={failed} ({name})" in dones[1], dones
    assert f"STATUS(1)={failed}" in "\n".join(nl)
    assert "tls fd" not in text  # [debug] tls stays 0


def encodings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
            base64.urlsafe_b64encode(secret).decode().rstrip("="), repr(secret)[2:-1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_maximal_levels_log_no_psk_and_no_traffic_keys(tmp_path, hsd_pki, backend) -> None:
    """PSK client and x509 client at tls=10 nl=10 loglevel=10: the PSK and the kTLS keys are nowhere in the log."""
    psk = peers.PskSecret("NVMe0R01 nqn.2024-01.org.example.host nqn.2014-08.org.nvmexpress.discovery",
                          secrets.token_bytes(32))
    with ThrowawayKeyring() as ring, daemon(tmp_path, hsd_pki, backend, "loglevel=10\ntls=10\nnl=10") as (sim, log):
        serial = ring.add(psk.identity, psk.secret)
        for item in (ring.serial, serial):  # the daemon is another process: it links and reads as the same user
            keyring.set_perm(item, USER_ALL)
        with peers.openssl_psk_server(psk) as server, peers.connect(server.port, timeout=WAIT) as mine:
            psk_request = sim.client_hello_psk(mine, [serial], keyring=ring.serial, timeout_ms=10000)
            assert psk_request.wait(WAIT)[0] == 0
        status, x509_request = client_against_s_server(sim, hsd_pki)
        assert status == 0
        text = handshake_lines(log, 2)
    assert "psk selected identity #0" in text and "psk offered 1 identity" in text, text
    assert f"PEER_IDENTITY(6)={serial}" in text
    keys = [psk.secret]
    for request in (psk_request, x509_request):
        for info in (request.ktls_tx, request.ktls_rx):
            assert info is not None
            keys += [info.key, info.iv, info.salt + info.iv]
    for key in keys:
        for form in encodings(key):
            assert form not in text, "key material in the log"


# ---------------------------------------------------------------- the parser on its own


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def traced(level: int = 5) -> tuple[TlsTrace, Lines]:
    logger = logging.getLogger(f"test.tlstrace.{secrets.token_hex(4)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    lines = Lines()
    logger.addHandler(lines)
    return TlsTrace(level, "fd 1 client", logger), lines


def message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def server_hello(random: bytes, suite: int, extensions: bytes) -> bytes:
    return message(2, b"\x03\x03" + random + b"\x00" + suite.to_bytes(2, "big") + b"\x00"
                   + len(extensions).to_bytes(2, "big") + extensions)


def test_hello_retry_fragments_and_garbage_never_break_the_trace() -> None:
    trace, lines = traced()
    versions = b"\x00\x2b\x00\x02\x03\x04"
    retry = server_hello(HELLO_RETRY_RANDOM, 0x1302, versions + b"\x00\x33\x00\x02\x00\x17")
    real = server_hello(bytes(32), 0x1302, versions + b"\x00\x33\x00\x06\x00\x17\x00\x02\xab\xcd")
    trace.record(False, 22, retry[:7])  # a message split across records
    trace.record(False, 22, retry[7:] + real)
    trace.record(False, 22, message(2, b"\x03"))  # a ServerHello far shorter than its fields
    trace.record(False, 23, secrets.token_bytes(50))  # application data: not traced
    trace.record(True, 21, b"\x02\x28")
    trace.record(False, 22, message(20, bytes(48)))
    trace.record(True, 22, message(20, bytes(48)))
    text = "\n".join(lines.lines)
    assert "<- HelloRetryRequest (" in text and "<- ServerHello (" in text, text
    assert "unreadable" in text and "-> alert handshake_failure (fatal) sent" in text, text
    assert ("negotiated version TLS 1.3, cipher TLS_AES_256_GCM_SHA384, group secp256r1, psk no, "
            "hello retry yes, hello retry group secp256r1") in text, text
    assert "abcd" not in text.lower()  # the key share itself is never shown
    for _ in range(200):  # random bytes as any content type: never an exception out of record()
        trace.record(bool(secrets.randbits(1)), secrets.choice([20, 21, 22]), secrets.token_bytes(secrets.randbelow(64)))
