"""RFC 8449 record_size_limit: the peer's limit reaches the kernel as TLS_TX_MAX_PAYLOAD_LEN.

What can go wrong, and is checked here: an off-by-one (TLS 1.3's limit counts
the content type byte, the kernel's value does not), the option set before
TLS_TX (the kernel would judge 63 against an unknown version), a kernel
without the option (Linux 6.12) failing the handshake or flooding the log,
tlslite reporting a value the peer never sent, and records above the limit
reaching a peer that enforces it.  The peers are real GnuTLS processes
(`--recordsize`), which answer a larger record with record_overflow.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import replace

import pluggy
import pytest

import hsd_openssl
import hsd_psk
import hsd_tlslite
from hsd import ktls
from hsd.errors import KtlsError
from hsd.ktls import (
    SOL_TLS,
    TCP_ULP,
    TLS_RX,
    TLS_TX,
    TLS_TX_MAX_PAYLOAD_LEN,
    install_session,
    install_via,
    session_crypto_info,
    tx_max_payload,
)
from hsd.config import Config
from hsd.session import Session
from hsd.validate import MalformedSession, check_session
from hsd_kit.handshakes import handshake_context, plugin_manager, run_handshake
from hsd_kit.harness import DaemonHarness, checker_for
from hsd_kit.peers import Listener, PeerOptions, gnutls_client, gnutls_server
from hsd_kit.pki import TestPki, x509_credentials
from hsd_kit.records import APPLICATION_DATA, KtlsRecordChecker, TlsAlert, session_records
from hsd_kit.simulator import Simulator

RECORDSIZE = 512  # gnutls --recordsize: the plaintext the peer accepts per record
ANNOUNCED = RECORDSIZE + 1  # GnuTLS's record_size_limit under TLS 1.3 (content type included)
TIMEOUT = 20.0


def _session(**kw: object) -> Session:
    args: dict = dict(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32), rx_secret=bytearray(32))
    args.update(kw)
    return Session(**args)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fresh_once_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees a process that has not yet logged the kernel's lack of the option."""
    monkeypatch.setattr(ktls, "_no_tx_limit_logged", False)


# ---- the value and the order of setsockopt calls -------------------------------------------------

@pytest.mark.parametrize("limit,version,payload", [
    (None, 0x0304, None),  # not negotiated: nothing to set
    (513, 0x0304, 512),  # TLS 1.3: minus the content type byte
    (64, 0x0304, 63),  # the smallest legal limit
    (16385, 0x0304, None),  # the TLS 1.3 ceiling asks for full-size records: no call at all
    (65535, 0x0304, None),  # a client may announce more than the protocol allows (RFC 8449 section 4)
    (512, 0x0303, 512),  # TLS 1.2: the limit is the plaintext
    (16384, 0x0303, None),
])
def test_payload_from_the_peers_limit(limit: int | None, version: int, payload: int | None) -> None:
    assert tx_max_payload(_session(peer_record_size_limit=limit, version=version)) == payload


class Recorder:
    """A setsockopt that notes every call and can refuse one option with an errno."""

    def __init__(self, refuse: tuple[int, int] | None = None) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.refuse = refuse

    def __call__(self, level: int, optname: int, value: object) -> None:
        self.calls.append((level, optname, bytes(value)))  # type: ignore[arg-type]
        if self.refuse and self.refuse[0] == optname:
            raise OSError(self.refuse[1], "refused")


def test_limit_is_set_after_both_keys_as_a_native_u16() -> None:
    tx, rx = session_crypto_info(_session())
    calls = Recorder()
    install_via(calls, tx, rx, tx_max_payload=512)
    assert [(level, opt) for level, opt, _ in calls.calls] == [
        (socket.IPPROTO_TCP, TCP_ULP), (SOL_TLS, TLS_TX), (SOL_TLS, TLS_RX), (SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN)]
    assert calls.calls[-1][2] == struct.pack("=H", 512) and len(calls.calls[-1][2]) == 2  # optlen 2, as the kernel wants


def test_no_limit_no_call() -> None:
    tx, rx = session_crypto_info(_session())
    calls = Recorder()
    install_via(calls, tx, rx)
    assert TLS_TX_MAX_PAYLOAD_LEN not in [opt for _, opt, _ in calls.calls]


def test_kernel_without_the_option_logs_once_per_process_and_keeps_the_keys(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hsd")
    for _ in range(3):
        tx, rx = session_crypto_info(_session())
        install_via(Recorder(refuse=(TLS_TX_MAX_PAYLOAD_LEN, errno.ENOPROTOOPT)), tx, rx, tx_max_payload=512)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    for what in ("TLS_TX_MAX_PAYLOAD_LEN", "record_size_limit", "16 KiB", "record_overflow"):
        assert what in text
    assert sum("not enforced" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 2


def test_any_other_refusal_fails_the_install() -> None:
    tx, rx = session_crypto_info(_session())
    with pytest.raises(KtlsError, match="kernel refused TLS_TX_MAX_PAYLOAD_LEN 63"):
        install_via(Recorder(refuse=(TLS_TX_MAX_PAYLOAD_LEN, errno.EINVAL)), tx, rx, tx_max_payload=63)


def test_install_session_passes_the_payload_only_when_there_is_one(tcp_pair_sock: socket.socket) -> None:
    seen: list[dict] = []

    class OldInstaller:  # written before the option: its install takes no keyword
        def install(self, sock: socket.socket, tx: object, rx: object) -> None:
            seen.append({})

    class NewInstaller:
        def install(self, sock: socket.socket, tx: object, rx: object, tx_max_payload: int | None = None) -> None:
            seen.append({"tx_max_payload": tx_max_payload})

    install_session(OldInstaller(), tcp_pair_sock, _session(peer_record_size_limit=16385))
    install_session(NewInstaller(), tcp_pair_sock, _session(peer_record_size_limit=513))
    assert seen == [{}, {"tx_max_payload": 512}]


@pytest.fixture(name="tcp_pair_sock")
def _tcp_pair_sock() -> socket.socket:
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


@pytest.mark.parametrize("limit", [63, 0, 65536, True, "513"])
def test_a_backend_reporting_an_illegal_limit_is_refused(limit: object) -> None:
    with pytest.raises(MalformedSession, match="peer_record_size_limit"):
        check_session(_session(peer_record_size_limit=limit), "test")


# ---- tlslite against real GnuTLS peers ----------------------------------------------------------

@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_tlslite, hsd_openssl, hsd_psk)


def _tlslite_client(plugins: pluggy.PluginManager, pki: TestPki, sock: socket.socket) -> Session:
    ctx = handshake_context(sock, "client", "unauth", backend="tlslite", x509=x509_credentials(pki),
                            timeout=TIMEOUT, peername="localhost")
    return run_handshake(plugins, ctx)


def _send_limited(records, data: bytes, payload: int) -> list[int]:
    """What the kernel does with TLS_TX_MAX_PAYLOAD_LEN = payload: records of at most that plaintext."""
    sizes = []
    for start in range(0, len(data), payload):
        chunk = data[start : start + payload]
        records._send_all(records.tx.seal(APPLICATION_DATA, chunk))
        sizes.append(len(chunk) + 1)  # TLSInnerPlaintext: the data and its content type byte
    return sizes


def _lines(total: int) -> bytes:
    """Short printable lines: gnutls-serv --echo answers each one."""
    return b"".join(b"%07d" % n + b"x" * 248 + b"\n" for n in range(total // 256))


def test_tlslite_client_reports_the_gnutls_servers_limit_and_the_peer_takes_records_at_it(
        plugins: pluggy.PluginManager, hsd_pki: TestPki) -> None:
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with gnutls_server(opts) as server, server.connect() as sock:
        session = _tlslite_client(plugins, hsd_pki, sock)
        assert session.peer_record_size_limit == ANNOUNCED
        payload = tx_max_payload(session)
        assert payload == RECORDSIZE
        records = session_records(sock, session, TIMEOUT)
        data = _lines(16 * 1024)
        sizes = _send_limited(records, data, payload)
        assert max(sizes) == ANNOUNCED and len(sizes) == len(data) // RECORDSIZE
        echoed = b""
        while len(echoed) < len(data):
            echoed += records.recv_data()
        assert echoed == data  # GnuTLS opened every record: none above its limit


def test_gnutls_server_refuses_one_byte_more_so_the_limit_test_can_fail(
        plugins: pluggy.PluginManager, hsd_pki: TestPki) -> None:
    """The adversary's control: a record of limit+1 bytes (what 6.12's kTLS would send) is record_overflow."""
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with gnutls_server(opts) as server, server.connect() as sock:
        session = _tlslite_client(plugins, hsd_pki, sock)
        records = session_records(sock, session, TIMEOUT)
        _send_limited(records, b"y" * RECORDSIZE + b"\n", RECORDSIZE + 1)
        with pytest.raises(TlsAlert) as alert:
            records.recv_data()
        assert alert.value.description == 22  # record_overflow


def test_tlslite_client_without_a_peer_limit_reports_none_or_the_ceiling(
        plugins: pluggy.PluginManager, hsd_pki: TestPki) -> None:
    """gnutls-serv by default announces 16385 (full size): nothing for the kernel to do."""
    with gnutls_server(PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key)) as server, \
            server.connect() as sock:
        session = _tlslite_client(plugins, hsd_pki, sock)
        assert session.peer_record_size_limit in (None, 16385)
        assert tx_max_payload(session) is None


def test_tlslite_server_reports_the_gnutls_clients_limit(plugins: pluggy.PluginManager, hsd_pki: TestPki) -> None:
    listener = Listener()
    opts = PeerOptions(ca=hsd_pki.ca, extra=["--recordsize", str(RECORDSIZE)])
    with listener, gnutls_client(opts, listener.port) as client:
        sock = listener.accept(TIMEOUT)
        with sock:
            ctx = handshake_context(sock, "server", "x509", backend="tlslite",
                                    x509=x509_credentials(hsd_pki, hsd_pki.server), timeout=TIMEOUT)
            session = run_handshake(plugins, ctx)
            assert session.peer_record_size_limit == ANNOUNCED
            records = session_records(sock, session, TIMEOUT)
            line = b"z" * (3 * RECORDSIZE) + b"\n"
            _send_limited(records, line, tx_max_payload(session))
            client.wait_for("z" * 64, timeout=TIMEOUT)


def test_openssl_backend_never_agrees_a_limit(plugins: pluggy.PluginManager, hsd_pki: TestPki) -> None:
    """OpenSSL 3.x has no RFC 8449: the GnuTLS server's limit is never announced to it (docs say so)."""
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with gnutls_server(opts) as server, server.connect() as sock:
        ctx = handshake_context(sock, "client", "unauth", backend="openssl", x509=x509_credentials(hsd_pki),
                                timeout=TIMEOUT, peername="localhost")
        session = run_handshake(plugins, ctx)
        assert session.peer_record_size_limit is None


# ---- the simulated kernel: Linux 7.2 takes the option, 6.12 refuses it --------------------------

def _established() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        consumer = socket.create_connection(srv.getsockname())
        remote, _ = srv.accept()
    return consumer, remote


def _errno(channel, sock: socket.socket, opt: int, value: bytes) -> int:
    try:
        channel.ktls.setsockopt(sock, SOL_TLS, opt, value)
    except OSError as exc:
        return exc.errno
    return 0


def test_simulated_7_2_checks_the_range_against_the_installed_version() -> None:
    u16 = lambda n: struct.pack("=H", n)  # noqa: E731
    with Simulator() as sim:
        channel = sim.channel()
        consumer, remote = _established()
        try:
            channel.ktls.setsockopt(consumer, socket.IPPROTO_TCP, TCP_ULP, b"tls")
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(63)) == errno.EINVAL  # version not known yet
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(64)) == 0
            tx, _ = session_crypto_info(_session())
            channel.ktls.setsockopt(consumer, SOL_TLS, TLS_TX, tx.pack())
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(63)) == 0  # TLS 1.3: limit 64 minus 1
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(62)) == errno.EINVAL
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(16385)) == errno.EINVAL
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=I", 512)) == errno.EINVAL  # optlen 4
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, u16(16384)) == 0
        finally:
            channel.close()
            consumer.close()
            remote.close()


def test_simulated_6_12_has_no_such_option() -> None:
    with Simulator(tx_max_payload_len=False) as sim:
        channel = sim.channel()
        consumer, remote = _established()
        try:
            channel.ktls.setsockopt(consumer, socket.IPPROTO_TCP, TCP_ULP, b"tls")
            tx, _ = session_crypto_info(_session())
            channel.ktls.setsockopt(consumer, SOL_TLS, TLS_TX, tx.pack())
            assert _errno(channel, consumer, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", 512)) == errno.ENOPROTOOPT
        finally:
            channel.close()
            consumer.close()
            remote.close()


def _daemon_config(pki: TestPki) -> Config:
    config = Config()
    config.client = replace(config.client, truststore=pki.ca)
    return config


def _lines_through_the_kernel(request, total: int) -> tuple[KtlsRecordChecker, bytes, bytes]:
    """A write of `total` bytes through the simulated kernel's TX, and what gnutls-serv --echo returned."""
    records = checker_for(request, timeout=TIMEOUT)
    data = _lines(total)
    records.send(data)
    echoed = b""
    while len(echoed) < len(data):
        echoed += records.recv_data()
    return records, data, echoed


def test_daemon_on_simulated_7_2_caps_records_at_the_gnutls_servers_limit(hsd_pki: TestPki,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with DaemonHarness("tlslite", _daemon_config(hsd_pki)) as daemon, gnutls_server(opts) as server, \
            server.connect() as sock:
        request = daemon.client_hello_anon(sock, peername="localhost")
        daemon.finish(request, TIMEOUT).expect(0)
        assert request.ktls_tx_max_payload == RECORDSIZE  # hsd set it, from the peer's 513
        records, data, echoed = _lines_through_the_kernel(request, 16 * 1024)
        assert echoed == data
        assert max(records.sent_sizes) == RECORDSIZE and len(records.sent_sizes) == len(data) // RECORDSIZE
    assert not [r for r in caplog.records if "TLS_TX_MAX_PAYLOAD_LEN" in r.getMessage() and r.levelno >= logging.WARNING]


def test_daemon_on_simulated_6_12_serves_logs_once_and_the_peer_sees_16k_records(
        hsd_pki: TestPki, caplog: pytest.LogCaptureFixture) -> None:
    """What the warning says happens: DONE 0, full-size records, and GnuTLS's record_overflow."""
    caplog.set_level(logging.WARNING, logger="hsd")
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with Simulator(tx_max_payload_len=False) as sim, \
            DaemonHarness("tlslite", _daemon_config(hsd_pki), sim=sim) as daemon:
        for attempt in range(2):
            with gnutls_server(opts) as server, server.connect() as sock:
                request = daemon.client_hello_anon(sock, peername="localhost")
                daemon.finish(request, TIMEOUT).expect(0)
                assert request.ktls_tx_max_payload is None
                if attempt == 0:
                    with pytest.raises(TlsAlert) as alert:
                        _lines_through_the_kernel(request, 16 * 1024)
                    assert alert.value.description == 22  # record_overflow
    lines = [r.getMessage() for r in caplog.records if "TLS_TX_MAX_PAYLOAD_LEN" in r.getMessage()
             and r.levelno == logging.WARNING]
    assert len(lines) == 1, lines


def test_the_limit_crosses_the_isolation_pipe(hsd_pki: TestPki) -> None:
    """isolation=process: the Session comes back from the child field by field; the limit must be among them."""
    config = replace(_daemon_config(hsd_pki), isolation="process")
    opts = PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, extra=["--recordsize", str(RECORDSIZE)])
    with DaemonHarness("tlslite", config) as daemon, gnutls_server(opts) as server, server.connect() as sock:
        request = daemon.client_hello_anon(sock, peername="localhost")
        daemon.finish(request, TIMEOUT).expect(0)
        assert request.ktls_tx_max_payload == RECORDSIZE
        _, data, echoed = _lines_through_the_kernel(request, 4096)
        assert echoed == data
