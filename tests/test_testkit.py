"""The test kit itself: its checks must be able to fail, its fixtures must work from a plugin's tests.

hsd_kit is what plugin authors trust; a checker that never fails proves
nothing, so each check is shown catching the fault it exists for.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hsd.hookspecs import ALL_MODES
from hsd_kit import matrix, peers
from hsd_kit.harness import DaemonHarness, HarnessError, assert_ktls_roundtrip
from hsd_kit.pki import TestPki
from hsd_kit.records import RecordError

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-serv")),
                                reason="needs the openssl and gnutls-bin command-line tools")
CASES = {case.name: case for case in matrix.MATRIX}


@pytest.fixture(scope="module")
def pki(hsd_pki: TestPki) -> TestPki:
    return hsd_pki  # the kit's session-wide test PKI, generated once for all test files


@pytest.fixture(scope="module")
def daemon():
    with DaemonHarness() as harness:
        yield harness


def test_harness_discovers_plugins_through_entry_points(daemon: DaemonHarness) -> None:
    assert daemon.host is not None
    assert {"openssl", "tlslite", "psk"} <= set(daemon.host.infos)


def _client_request(daemon: DaemonHarness, pki: TestPki, server: peers.ServerPeer):
    daemon.reconfigure(matrix.case_config(CASES["client-unauth-gnutls-aes-128-gcm-sha256"], pki), "openssl")
    sock = server.connect()
    request = daemon.client_hello_anon(sock, peername="localhost", timeout_ms=5000)
    return sock, request, daemon.finish(request).expect(0)


def test_roundtrip_catches_a_wrong_key(daemon: DaemonHarness, pki: TestPki) -> None:
    server = peers.gnutls_server(peers.PeerOptions(cert=pki.server.chain, key=pki.server.key)).start()
    try:
        sock, request, _ = _client_request(daemon, pki, server)
        wrong = bytes(b ^ 1 for b in request.ktls_rx.key)
        request.ktls_rx = dataclasses.replace(request.ktls_rx, key=wrong)
        with pytest.raises(RecordError, match="bad authentication tag"):
            assert_ktls_roundtrip(request, server, echo=True)
        sock.close()
    finally:
        server.stop()


def test_roundtrip_catches_a_wrong_sequence_number(daemon: DaemonHarness, pki: TestPki) -> None:
    server = peers.openssl_server(peers.PeerOptions(cert=pki.server.chain, key=pki.server.key)).start()
    try:
        sock, request, _ = _client_request(daemon, pki, server)
        request.ktls_tx = dataclasses.replace(request.ktls_tx, rec_seq=1)  # as if a record had been sent
        with pytest.raises((HarnessError, RecordError, EOFError, peers.PeerError)):
            assert_ktls_roundtrip(request, server)
        sock.close()
    finally:
        server.stop()


def test_expect_catches_a_wrong_status(daemon: DaemonHarness, pki: TestPki) -> None:
    case = CASES["fail-client-untrusted-ca"]
    wrong = dataclasses.replace(case, status=errno.ETIMEDOUT)
    with pytest.raises(HarnessError, match=r"expected status 110 \(ETIMEDOUT\), got status 13"):
        matrix.run_case(daemon, wrong, pki, "openssl")


def test_expect_catches_an_unexpected_success(daemon: DaemonHarness, pki: TestPki) -> None:
    case = dataclasses.replace(CASES["client-unauth-openssl-aes-128-gcm-sha256"], status=errno.EACCES)
    with pytest.raises(HarnessError, match="got status 0"):
        matrix.run_case(daemon, case, pki, "openssl")


def test_finish_pairs_each_request_with_its_own_outcome(daemon: DaemonHarness, pki: TestPki) -> None:
    """Outcomes are matched by connection, not by peer: one peer address serves many requests.

    A server on a reused port negotiated another suite a moment ago, and two
    requests run at once against one server; each finish() must get the outcome
    of its own connection (a stale match once made the cross-backend case fail)."""
    daemon.reconfigure(matrix.case_config(CASES["client-unauth-gnutls-aes-128-gcm-sha256"], pki), "openssl")
    port = peers.free_port()
    for suite in ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"):
        server = peers.gnutls_server(peers.PeerOptions(cert=pki.server.chain, key=pki.server.key, suites=[suite]),
                                     port=port).start()
        try:
            socks = [server.connect(), server.connect()]
            requests = [daemon.client_hello_anon(sock, peername="localhost", timeout_ms=5000) for sock in socks]
            finished = [daemon.finish(request).expect(0) for request in requests]
            assert finished[0].outcome is not finished[1].outcome
            for sock, done in zip(socks, finished):
                local, peer = sock.getsockname(), sock.getpeername()
                assert (done.outcome.local, done.outcome.peer) == (f"{local[0]}:{local[1]}", f"{peer[0]}:{peer[1]}")
                assert done.outcome.cipher == suite
                sock.close()
        finally:
            server.stop()


def test_ticket_detector_sees_tickets_when_a_server_sends_them(pki: TestPki) -> None:
    """The no-tickets proof reads s_client's -msg trace: against openssl s_server, tickets do show."""
    server = peers.openssl_server(peers.PeerOptions(cert=pki.server.chain, key=pki.server.key)).start()
    client = peers.openssl_client(peers.PeerOptions(ca=pki.ca, extra=["-msg"]), server.port).start()
    try:
        client.wait_for("NewSessionTicket", timeout=10)
        assert "<<< TLS 1.3, Handshake" in client.output
    finally:
        client.stop()
        server.stop()


def test_cases_for_follows_modes_and_suites() -> None:
    only_client = matrix.cases_for("x", [m for m in ALL_MODES if str(m) == "client/unauth"],
                                   suites="TLS_AES_128_GCM_SHA256")
    assert {case.mode for case in only_client} == {ALL_MODES[0]}
    assert {case.suite for case in only_client} == {None, "TLS_AES_128_GCM_SHA256"}
    assert any(case.peer == "hsd" and case.other_backend == "openssl" for case in only_client)
    everything = matrix.cases_for("openssl", ALL_MODES, cross_with=("openssl", "tlslite"))
    assert len(everything) == len(matrix.MATRIX) + 3


PLUGIN_AUTHOR_TESTS = '''
import pytest

def test_interop(hsd_case, hsd_run_case):
    hsd_run_case(hsd_case)

@pytest.mark.parametrize("hsd_daemon", ["tlslite"], indirect=True)
def test_fixtures(hsd_daemon, hsd_pki, hsd_keyring, hsd_simulator):
    assert hsd_daemon.config.backend == "tlslite"
    assert hsd_keyring.add("id", b"secret") > 0
    assert hsd_simulator.listeners() == 0
'''


def test_pytest_plugin_gives_a_plugin_author_the_matrix_in_a_few_lines(tmp_path: Path) -> None:
    (tmp_path / "test_author.py").write_text(PLUGIN_AUTHOR_TESTS, encoding="utf-8")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hsd-backend", "tlslite"]
    listed = subprocess.run(args + ["--collect-only", str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    ids = re.findall(r"test_interop\[([^\]]+)\]", listed.stdout)
    assert len(ids) == len(matrix.cases_for("tlslite", ALL_MODES)), listed.stdout[-2000:]
    assert "fail-client-peer-never-answers" in ids and "server-psk-gnutls" in ids
    chosen = subprocess.run(args + ["-k", "fixtures or client-x509-openssl or server-psk-gnutls", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stdout[-3000:]
    assert re.search(r"^3 passed", chosen.stdout.strip().splitlines()[-1]), chosen.stdout[-1000:]


def test_hsd_demo_runs_every_scenario(tmp_path: Path) -> None:
    """`hsd demo` as an operator runs it: one line per handshake, exit 0."""
    result = subprocess.run([sys.executable, "-m", "hsd.cli", "demo"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    handshakes = [line for line in lines if re.match(r"^(client|server) ", line)]
    assert len(handshakes) == 6, result.stdout
    ok = [line for line in handshakes if "status=0 (ok)" in line]
    assert len(ok) == 5 and all("kTLS verified: 2 records each way" in line for line in ok)
    assert all("backend=openssl" in line and re.search(r"suite=TLS_\w+ group=\w+ [\d.]+ ms", line) for line in ok)
    failed = [line for line in handshakes if "status=13 (EACCES) as expected" in line]
    assert len(failed) == 1 and "fail-client-untrusted-ca" in failed[0]
    assert lines[-1].endswith("6 handshakes in " + lines[-1].split(" in ")[1].split(":")[0] +
                              ": all scenarios behaved as expected")


def test_hsd_demo_honours_the_backend(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "hsd.cli", "--backend", "tlslite", "demo"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    handshakes = [line for line in result.stdout.splitlines() if re.match(r"^(client|server) ", line)]
    assert handshakes and all("backend=tlslite" in line for line in handshakes)
