"""Faults at every stage: each request still gets exactly one DONE, with the right status.

Real parts: the dispatcher serves the kernel simulator; TLS faults use the
OpenSSL backend against real `openssl s_server`/`s_client` peers, cut at a
chosen flight by a record-level proxy (tests/flightproxy.py).  After every
fault the daemon must serve a following real handshake, and when the test is
over no fd and no thread may be left behind.
"""

from __future__ import annotations

import datetime
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import hsd_openssl
from hsd.config import Config
from hsd.dispatcher import SHUTDOWN_GRACE, WATCHDOG_GRACE
from hsd.errors import HandshakeTimeout, PeerClosed
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.ktls import tls13_crypto_info
from hsd.session import Session
from hsd_kit.simulator import Simulator
from hsd_kit.harness import DaemonHarness
from hsd_kit.processes import DaemonProcesses
from hsd_kit.soak import (FAST, FastBackend, open_fds, soak_config_text, soak_daemon,
                      submit_retrying, tcp_pair)
from hsd_kit.peers import PeerOptions, openssl_client, openssl_server, silent_peer
from hsd_kit.pki import TestPki, make_pki

from flightproxy import FlightProxy

WAIT = 20.0
CUT_STATUS = PeerClosed.status  # a peer that closes or resets mid-handshake: the consumer may retry
STALL_STATUS = HandshakeTimeout.status


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def tls_config(pki: TestPki, **kw) -> Config:
    config = Config(backend="openssl", handshake_timeout_ms=5000, **kw)
    config.client.truststore = pki.ca
    config.server.truststore = pki.ca
    config.server.certificate = pki.server.chain
    config.server.private_key = pki.server.key
    return config


def handshake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hsd-handshake")]


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """No fd and no thread that the test started outlives it (daemon, simulator, peers torn down).

    Compared as "nothing new" rather than "exactly equal", so that a thread or fd an earlier
    test left behind and that goes away meanwhile does not count against this one."""
    fds, threads = open_fds(), set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5  # peer reader threads and the pool wind down asynchronously
    while time.monotonic() < deadline and (open_fds() > fds or set(threading.enumerate()) - threads):
        time.sleep(0.05)
    assert open_fds() <= fds, sorted(os.listdir("/proc/self/fd"))
    assert not set(threading.enumerate()) - threads, set(threading.enumerate()) - threads
    assert not handshake_threads()


@contextmanager
def daemon(config: Config, plugins: dict[str, object] | None = None, **kw) -> Iterator[tuple[Simulator, DaemonHarness]]:
    with Simulator() as sim:
        running = DaemonHarness(None, config, sim=sim, extra_plugins=plugins or {"openssl": hsd_openssl},
                                discover=False, **kw).start()
        try:
            yield sim, running
        finally:
            running.stop()
        assert running.error is None, running.error


def outcomes(running: DaemonHarness, count: int) -> list:
    """The first `count` outcomes (on_outcome runs just after DONE, so wait for it)."""
    end = time.monotonic() + WAIT
    while len(running.outcomes) < count and time.monotonic() < end:
        time.sleep(0.01)
    return running.outcomes[:count]


def real_client_handshake(sim: Simulator, pki: TestPki) -> None:
    """The daemon still serves: a full handshake against a fresh s_server, keys installed."""
    with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
        mine = socket.create_connection(server.address)
        try:
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
            assert req.wait(WAIT)[0] == 0
            assert req.done_calls == 1 and req.ktls_tx is not None and req.ktls_rx is not None
        finally:
            mine.close()


# ---------------------------------------------------------------- 1. no lost requests


def test_dropped_ready_notifications_are_drained(pki, no_leaks):
    with daemon(Config(backend=FAST), {FAST: FastBackend()}) as (sim, running):
        pairs = [tcp_pair() for _ in range(5)]
        sim.drop_ready(5)  # every READY for these is lost: the dispatcher only sees ENOBUFS
        reqs = [sim.client_hello_anon(a, peername="ok.test", timeout_ms=5000) for a, _ in pairs]
        assert [r.wait(WAIT)[0] for r in reqs] == [0] * 5
        assert all(r.done_calls == 1 for r in reqs)
        assert sim.stats.ready_lost >= 5
        for a, b in pairs:
            a.close(); b.close()


class GateBackend(FastBackend):
    """The fast backend, but each handshake first waits for the gate: a busy daemon."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    @hookimpl
    def hsd_handshake(self, ctx):
        self.gate.wait(WAIT)
        return super().hsd_handshake(ctx)


def test_ready_overrun_from_a_full_socket_buffer_is_drained(no_leaks):
    """A daemon too busy to read READYs overflows its socket; ENOBUFS -> ACCEPT until EAGAIN."""
    backend = GateBackend()
    with Simulator(pending_max=2000) as sim:
        running = DaemonHarness(None, Config(backend=FAST), sim=sim, extra_plugins={FAST: backend}, discover=False,
                                max_inflight=1).start()
        pairs = []
        try:
            first = tcp_pair()
            pairs.append(first)
            reqs = [sim.client_hello_anon(first[0], peername="ok.test", timeout_ms=20000)]
            while sim.pending_count:  # the only slot is taken: from now on READYs pile up unread
                time.sleep(0.01)
            while not sim.stats.ready_lost and len(reqs) < 1500:
                pair = tcp_pair()
                pairs.append(pair)
                reqs.append(sim.client_hello_anon(pair[0], peername="ok.test", timeout_ms=20000))
            assert sim.stats.ready_lost > 0, "the READY socket never overflowed"
            backend.gate.set()
            assert [r.wait(60)[0] for r in reqs] == [0] * len(reqs)
            assert all(r.done_calls == 1 for r in reqs)
            print(f"\noverrun: {len(reqs)} requests, {sim.stats.ready_lost} READYs lost, all served")
        finally:
            backend.gate.set()
            running.stop()
            for a, b in pairs:
                a.close(); b.close()


def test_restarted_daemon_serves_requests_left_pending(tmp_path, no_leaks):
    """kill -9 with requests queued: a new daemon drains them at start-up.

    The one the dead daemon had accepted stays outstanding in the kernel until
    the consumer's own timeout cancels it (as with tlshd): cancel() finds it."""
    config_path = tmp_path / "hsd.conf"
    config_path.write_text(soak_config_text(None).replace("max_inflight=64", "max_inflight=1"))
    with Simulator() as sim:
        first = soak_daemon(sim, str(config_path), str(tmp_path / "first.log"))
        try:
            _wait_listening(sim, first)
            pairs = [tcp_pair() for _ in range(4)]
            stuck = sim.client_hello_anon(pairs[0][0], peername="late.test", timeout_ms=60000)
            while sim.pending_count:
                time.sleep(0.01)
            queued = [sim.client_hello_anon(a, peername="ok.test", timeout_ms=5000) for a, _ in pairs[1:]]
            time.sleep(0.2)
            assert sim.pending_count == 3  # the single slot is busy: nothing else was accepted
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
        finally:
            first.stop()
        second = soak_daemon(sim, str(config_path), str(tmp_path / "second.log"))
        try:
            _wait_listening(sim, second)
            assert [r.wait(WAIT)[0] for r in queued] == [0, 0, 0]
            assert all(r.done_calls == 1 for r in queued)
            assert stuck.status is None and stuck.done_calls == 0
            assert sim.cancel(pairs[0][0]) is True  # still outstanding: the consumer's timeout path
        finally:
            assert second.stop() == 0
            for a, b in pairs:
                a.close(); b.close()


def _wait_listening(sim: Simulator, proc: DaemonProcesses) -> None:
    end = time.monotonic() + WAIT
    while not sim.listeners():
        assert proc.proc.poll() is None, open(proc.log_path).read()
        assert time.monotonic() < end
        time.sleep(0.02)


# ---------------------------------------------------------------- 2. TLS faults at each flight


# hsd as client: flight 1 = our ClientHello, flight 2 = the server's SH..Finished
CLIENT_CUTS = [(1, False), (2, False), (2, True)]
# hsd as server: flight 1 = the ClientHello, 2 = our SH..Finished, 3 = the client's Finished
SERVER_CUTS = [(1, False), (1, True), (2, False), (3, False)]


@pytest.mark.parametrize("action", ["close", "reset", "stall"])
@pytest.mark.parametrize("flight,partial", CLIENT_CUTS)
def test_client_handshake_cut_at_each_flight(pki, no_leaks, flight, partial, action):
    with daemon(tls_config(pki)) as (sim, running):
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server, \
                FlightProxy(server.address, hsd_is_client=True, cut_flight=flight, action=action,
                            partial=partial) as proxy:
            mine = socket.create_connection(proxy.address)
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=1500)
            status, _ = req.wait(WAIT)
            assert proxy.cut.is_set()
            assert status == (STALL_STATUS if action == "stall" else CUT_STATUS)
            assert req.done_calls == 1 and req.ktls_tx is None
            mine.close()
        real_client_handshake(sim, pki)
    assert [o.status for o in running.outcomes] == [status, 0]


@pytest.mark.parametrize("action", ["close", "reset", "stall"])
@pytest.mark.parametrize("flight,partial", SERVER_CUTS)
def test_server_handshake_cut_at_each_flight(pki, no_leaks, flight, partial, action):
    with daemon(tls_config(pki)) as (sim, running):
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                FlightProxy(listener.getsockname(), hsd_is_client=False, cut_flight=flight, action=action,
                            partial=partial) as proxy, \
                openssl_client(PeerOptions(ca=pki.ca), proxy.port).start():
            listener.settimeout(WAIT)
            conn, _ = listener.accept()
            req = sim.server_hello_x509(conn, timeout_ms=1500)
            status, _ = req.wait(WAIT)
            assert proxy.cut.is_set()
            assert status == (STALL_STATUS if action == "stall" else CUT_STATUS)
            assert req.done_calls == 1 and req.ktls_tx is None
            conn.close()
        real_client_handshake(sim, pki)
    assert [o.status for o in running.outcomes] == [status, 0]


# ---------------------------------------------------------------- consumer-side faults


def test_accept_that_fails_costs_one_request_and_the_daemon_serves_on(pki, no_leaks, caplog):
    """The kernel fails an ACCEPT it cannot complete (ta_keyring not linkable) and DONEs that request
    with EIO itself; hsd logs it, does not spin on ACCEPT, serves the next request and still stops."""
    bogus_keyring = 0x7FFFFFF0  # no such key: linking it into the process keyring fails (ENOKEY)
    with daemon(tls_config(pki)) as (sim, running), silent_peer() as peer:
        mine = socket.create_connection(peer.address)
        try:
            accepts_before = sim.stats.accepted + sim.stats.accept_eagain
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000, keyring=bogus_keyring)
            assert req.wait(WAIT)[0] == errno.EIO
            assert req.done_calls == 1
            time.sleep(0.5)  # an idle daemon after a failed ACCEPT: a few ACCEPTs, not a busy loop
            assert sim.stats.accepted + sim.stats.accept_eagain - accepts_before < 20
        finally:
            mine.close()
        assert "ACCEPT failed" in caplog.text and "cannot link keyring" in caplog.text
        real_client_handshake(sim, pki)
    assert [o.status for o in running.outcomes] == [0]  # the failed ACCEPT never reached a backend


def test_consumer_cancels_in_flight(pki, no_leaks):
    """cancel() after ACCEPT: hsd's DONE arrives later, the kernel ignores it, no callback fires."""
    with daemon(tls_config(pki)) as (sim, running), silent_peer() as peer:
        mine = socket.create_connection(peer.address)
        called = []
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=1000,
                                    done=lambda *a: called.append(a))
        while not req.accepted:
            time.sleep(0.01)
        assert sim.cancel(mine) is True
        assert [o.status for o in outcomes(running, 1)] == [errno.ETIMEDOUT]
        assert req.done_calls == 1 and req.status is None and not called
        assert running.outcomes[0].done_error == 0  # net/handshake accepts a DONE for a cancelled request
        mine.close()
        real_client_handshake(sim, pki)


def test_consumer_closes_its_socket_in_flight(pki, no_leaks):
    """The consumer drops its fd: hsd's reference keeps the socket alive; one DONE at the deadline."""
    with daemon(tls_config(pki)) as (sim, running), silent_peer() as peer:
        mine = socket.create_connection(peer.address)
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=800)
        while not req.accepted:
            time.sleep(0.01)
        mine.close()
        assert req.wait(WAIT)[0] == errno.ETIMEDOUT
        assert req.done_calls == 1
        real_client_handshake(sim, pki)


class RudeBackend:
    """A plugin that breaks the contract on the socket: closes it, or swaps another socket in."""

    def __init__(self) -> None:
        self.spare: socket.socket | None = None

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo("rude", "1.0", frozenset({Mode("client", "unauth")}))

    @hookimpl
    def hsd_handshake(self, ctx):
        if ctx.peername == "close.test":
            ctx.sock.close()  # "never close ctx.sock" - this one does
        elif ctx.peername == "swap.test":
            assert self.spare is not None
            os.dup2(self.spare.fileno(), ctx.sock.fileno())  # the fd now names a socket with no request
        return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32), rx_secret=bytearray(32))


@pytest.mark.parametrize("how,done_error", [("close", errno.EBADF), ("swap", errno.EBUSY)])
def test_done_rejected_by_the_kernel(pki, no_leaks, caplog, how, done_error):
    """The kernel refuses DONE (EBADF: fd not open; EBUSY: no request on that socket): logged,
    the request stays outstanding for the consumer's timeout, the daemon carries on."""
    rude = RudeBackend()
    spare_a, spare_b = tcp_pair()
    rude.spare = spare_a
    config = Config(backend="rude")
    with daemon(config, {"rude": rude, FAST: FastBackend()}) as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.client_hello_anon(mine, peername=f"{how}.test", timeout_ms=2000)
        [outcome] = outcomes(running, 1)
        assert outcome.done_error == done_error
        assert "kernel rejected DONE" in caplog.text
        assert req.status is None
        assert sim.cancel(mine) is True  # the consumer's timeout path finds it outstanding
        mine.close(); theirs.close()
        running.dispatcher.config = Config(backend=FAST)  # then a normal request succeeds
        running.dispatcher.default_backend = FAST
        a, b = tcp_pair()
        assert sim.client_hello_anon(a, peername="ok.test", timeout_ms=5000).wait(WAIT)[0] == 0
        a.close(); b.close()
    spare_a.close(); spare_b.close()


def test_ktls_refused_after_a_real_handshake_is_eio(pki, no_leaks):
    """The socket already carries TLS_TX (someone else configured it): setsockopt EBUSY -> DONE EIO."""
    with daemon(tls_config(pki)) as (sim, running):
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
            mine = socket.create_connection(server.address)
            other = sim.channel()
            dummy = tls13_crypto_info("TLS_AES_128_GCM_SHA256", bytes(32), 0)
            other.ktls.install(mine, dummy, dummy)
            other.close()
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
            assert req.wait(WAIT)[0] == errno.EIO
            assert req.done_calls == 1
            mine.close()
        assert "kernel refused TLS_TX" in outcomes(running, 1)[0].reason
        real_client_handshake(sim, pki)


@pytest.mark.parametrize("behaviour,status", [("raise", errno.EIO), ("late", errno.ETIMEDOUT)])
def test_plugin_raises_or_hangs(pki, no_leaks, behaviour, status):
    fast = FastBackend()
    with daemon(tls_config(pki, backends={"client.unauth": FAST}), {FAST: fast, "openssl": hsd_openssl}) \
            as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.client_hello_anon(mine, peername=f"{behaviour}.test", timeout_ms=300)
        assert req.wait(WAIT)[0] == status
        fast.release.set()  # the hung plugin returns now: no second DONE may follow
        time.sleep(0.3)
        assert req.done_calls == 1
        mine.close(); theirs.close()
        listener = socket.create_server(("127.0.0.1", 0))
        with openssl_client(PeerOptions(ca=pki.ca), listener.getsockname()[1]).start():
            listener.settimeout(WAIT)
            conn, _ = listener.accept()
            assert sim.server_hello_x509(conn, timeout_ms=10000).wait(WAIT)[0] == 0  # openssl still serves
            conn.close()
        listener.close()
    assert running.dispatcher.stats["watchdog"] == (1 if behaviour == "late" else 0)


# ---------------------------------------------------------------- netlink channel lost


def test_simulator_stopped_under_the_daemon_in_process(pki, no_leaks, caplog):
    """The channel breaks: run() raises ConnectionError after in-flight handshakes finished
    (their DONEs fail and are logged); no thread (watchdog, pool) stays behind."""
    sim = Simulator().start()
    with silent_peer() as peer:
        running = DaemonHarness(None, Config(backend="openssl", handshake_timeout_ms=800), sim=sim,
                                extra_plugins={"openssl": hsd_openssl}, discover=False).start()
        mine = socket.create_connection(peer.address)
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=800)
        while not req.accepted:
            time.sleep(0.01)
        sim.stop()
        running.thread.join(WAIT)
        assert not running.thread.is_alive()
        assert isinstance(running.error, ConnectionError)
        assert [o.status for o in running.outcomes] == [errno.ETIMEDOUT]
        assert running.outcomes[0].done_error != 0  # nobody took that DONE
        running.channel.close()
        mine.close()


def test_simulator_stopped_under_the_daemon_process_exits_with_failure(tmp_path, no_leaks):
    """Decision: hsd exits (status 1, logged) and lets the service manager restart it; the
    restarted daemon drains the queue (see test_restarted_daemon_serves_requests_left_pending)."""
    config_path = tmp_path / "hsd.conf"
    config_path.write_text(soak_config_text(None))
    sim = Simulator().start()
    proc = soak_daemon(sim, str(config_path), str(tmp_path / "daemon.log"), verbose=True)
    try:
        _wait_listening(sim, proc)
        sim.stop()
        try:
            code = proc.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            os.kill(proc.proc.pid, signal.SIGUSR2)  # faulthandler: where is it stuck?
            time.sleep(1)
            code = None
        assert code == 1, (tmp_path / "daemon.log").read_text()
    finally:
        proc.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert "lost the handshake channel" in log, log


# ---------------------------------------------------------------- very large certificate chains


def make_chain(directory: str, length: int) -> tuple[str, str, str]:
    """A chain file of `length` certificates (leaf + length-1 intermediates), its key, and the root."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject, issuer, key, issuer_key, ca: bool, sans=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build(name("chain root"), name("chain root"), root_key, root_key, True)
    issuer, issuer_key, chain = root, root_key, []
    for depth in range(length - 1):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(name(f"intermediate {depth}"), issuer.subject, key, issuer_key, True)
        chain.insert(0, cert)
        issuer, issuer_key = cert, key
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = build(name("localhost"), issuer.subject, leaf_key, issuer_key, False, [x509.DNSName("localhost")])
    chain.insert(0, leaf)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    paths = [os.path.join(directory, f"chain{length}.pem"), os.path.join(directory, f"chain{length}.key"),
             os.path.join(directory, f"root{length}.pem")]
    with open(paths[0], "wb") as handle:
        handle.write(b"".join(pem(c) for c in chain))
    fd = os.open(paths[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    with open(paths[2], "wb") as handle:
        handle.write(pem(root))
    return paths[0], paths[1], paths[2]


def test_ten_certificate_chain_is_served_and_verified(pki, tmp_path, no_leaks):
    chain, key, root = make_chain(str(tmp_path), 10)
    config = tls_config(pki)
    config.server.certificate, config.server.private_key = chain, key
    with daemon(config) as (sim, running):
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                openssl_client(PeerOptions(ca=root), listener.getsockname()[1]).start() as client:
            listener.settimeout(WAIT)
            conn, _ = listener.accept()
            assert sim.server_hello_x509(conn, timeout_ms=10000).wait(WAIT)[0] == 0
            client.wait_for("Verification: OK|Verify return code: 0")
            conn.close()


def test_client_verifies_a_ten_certificate_chain_from_a_real_server(pki, tmp_path, no_leaks):
    chain, key, root = make_chain(str(tmp_path), 10)
    config = tls_config(pki)
    config.client.truststore = root
    with daemon(config) as (sim, running):
        opts = PeerOptions(cert=chain, key=key, extra=["-cert_chain", chain])
        with openssl_server(opts).start() as server:
            mine = socket.create_connection(server.address)
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
            assert req.wait(WAIT)[0] == 0
            mine.close()
        assert [o.status for o in outcomes(running, 1)] == [0]


def test_chain_over_the_limit_fails_with_eio_and_the_daemon_serves_on(pki, tmp_path, no_leaks):
    chain, key, _ = make_chain(str(tmp_path), 11)
    config = tls_config(pki)
    config.server.certificate, config.server.private_key = chain, key
    with daemon(config) as (sim, running):
        a, b = tcp_pair()
        req = sim.server_hello_x509(a, timeout_ms=5000)
        assert req.wait(WAIT)[0] == errno.EIO and req.done_calls == 1
        assert "at most 10" in outcomes(running, 1)[0].reason
        a.close(); b.close()
        real_client_handshake(sim, pki)


def test_garbled_done_reply_costs_one_request_not_a_slot(no_leaks, caplog):
    """The DONE exchange fails with something other than an errno (a garbled reply): the request's
    fd is still closed and its worker slot freed - with one slot, the next request proves it."""
    from hsd.protocol import ProtocolError

    with daemon(Config(backend=FAST), {FAST: FastBackend()}, max_inflight=1) as (sim, running):
        real_done = running.channel.done
        calls = []

        def garbled_once(done):
            calls.append(done.sockfd)
            if len(calls) == 1:
                raise ProtocolError("expected an ACK")
            return real_done(done)

        running.channel.done = garbled_once  # type: ignore[method-assign]
        first, first_peer = tcp_pair()
        lost = sim.client_hello_anon(first, peername="ok.test", timeout_ms=5000)
        second, second_peer = tcp_pair()
        req = submit_retrying(lambda: sim.client_hello_anon(second, peername="ok.test", timeout_ms=5000))
        assert req.wait(WAIT)[0] == 0
        assert lost.status is None and sim.cancel(first) is True  # left to the consumer's timeout
        assert [o.done_error for o in outcomes(running, 2)] == [errno.EIO, 0]
        assert "DONE for fd" in caplog.text
        for sock in (first, first_peer, second, second_peer):
            sock.close()


# ---------------------------------------------------------------- plugins that break the Session contract


MALFORMED = {  # peer name -> (what the plugin gets wrong, the field the error must name)
    "bytes-secret.test": ({"tx_secret": b"\xab" * 32}, "tx_secret is bytes, not bytearray"),
    "short-secret.test": ({"rx_secret": bytearray(b"\xab" * 16)}, "rx_secret is 16 bytes"),
    "str-serial.test": ({"remote_auth": ("1",)}, "remote_auth is not a tuple of key serials"),
    "list-certs.test": ({"peer_certificates": [b"\x30\x03der"]}, "peer_certificates is not a tuple"),
    "not-a-session.test": (None, "a dict, not a Session"),
}


class UnwipeableSession(Session):
    """A plugin's own Session subclass whose wipe() is broken: clean-up must go on without it."""

    def wipe(self) -> None:
        raise RuntimeError("plugin bug in Session.wipe")


class ContractBreakingBackend:
    """A third-party backend with bugs chosen by the request's peer name (see MALFORMED), a
    hsd_handshake_done hook that raises, and one that never returns from hsd_handshake."""

    name = "breaks-contract"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.done_calls: list[tuple[str, int]] = []

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", frozenset({Mode("client", "unauth")}))

    @hookimpl
    def hsd_handshake(self, ctx):
        if ctx.peername == "never-returns.test":
            self.release.wait()  # only the test's teardown lets it go
            return None
        if ctx.peername == "raises.test":
            raise RuntimeError("plugin bug in hsd_handshake")
        if ctx.peername == "wipe-raises.test":
            return UnwipeableSession(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32),
                                     rx_secret=bytearray(32))
        if ctx.peername in MALFORMED:
            fields, _ = MALFORMED[ctx.peername]
            if fields is None:
                return {"cipher": "TLS_AES_128_GCM_SHA256", "tx_secret": bytearray(32)}
            return Session(**{"cipher": "TLS_AES_128_GCM_SHA256", "tx_secret": bytearray(b"\xab" * 32),
                              "rx_secret": bytearray(b"\xab" * 32), **fields})
        return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32), rx_secret=bytearray(32))

    @hookimpl
    def hsd_handshake_done(self, ctx, status, session):
        self.done_calls.append((ctx.peername, status))
        if ctx.peername == "done-raises.test":
            raise RuntimeError("plugin bug in hsd_handshake_done")


def broken_daemon(**kw):
    backend = ContractBreakingBackend()
    return backend, daemon(Config(backend=backend.name, **kw), {backend.name: backend})


def serves_on(sim: Simulator) -> None:
    """After the fault: a well-behaved request through the same backend succeeds."""
    a, b = tcp_pair()
    try:
        req = sim.client_hello_anon(a, peername="ok.test", timeout_ms=5000)
        assert req.wait(WAIT)[0] == 0 and req.done_calls == 1 and req.ktls_tx is not None
    finally:
        a.close(); b.close()


@pytest.mark.parametrize("isolation", ["none", "process"])
@pytest.mark.parametrize("peername", sorted(MALFORMED))
def test_malformed_session_is_one_eio_done_naming_the_plugin(no_leaks, caplog, peername, isolation):
    """A Session with wrong field types (a bytes secret once hung the request until the consumer's
    timeout and leaked its in-flight entry: Session.wipe() raised in the worker's finally)."""
    backend, running_daemon = broken_daemon(isolation=isolation)
    with running_daemon as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.client_hello_anon(mine, peername=peername, timeout_ms=5000)
        assert req.wait(WAIT)[0] == errno.EIO
        [outcome] = outcomes(running, 1)
        assert req.done_calls == 1 and req.ktls_tx is None and req.remote_auth == ()
        assert outcome.reason.startswith(f"backend '{backend.name}' returned a malformed session")
        assert MALFORMED[peername][1] in outcome.reason
        assert running.dispatcher.inflight() == 0  # nothing left behind for the watchdog
        mine.close(); theirs.close()
        serves_on(sim)
    assert f"backend '{backend.name}' returned a malformed session" in caplog.text
    assert "abababab" not in caplog.text and "\\xab\\xab" not in caplog.text  # no secret bytes logged
    assert running.dispatcher.stats["watchdog"] == 0  # answered at once, not at the deadline


@pytest.mark.parametrize("peername,status", [("raises.test", errno.EIO), ("done-raises.test", 0),
                                             ("wipe-raises.test", 0)])
def test_exceptions_from_the_plugin_hooks_cost_nothing_but_their_request(no_leaks, peername, status):
    """hsd_handshake raising: one EIO DONE.  hsd_handshake_done raising (after DONE): the request keeps
    its success.  The Session's own wipe() raising in the worker's clean-up: DONE was sent first, and
    the fd close and in-flight removal still happen (no_leaks checks the fd).  None leaves state behind."""
    backend, running_daemon = broken_daemon()
    with running_daemon as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.client_hello_anon(mine, peername=peername, timeout_ms=5000)
        assert req.wait(WAIT)[0] == status and req.done_calls == 1
        outcomes(running, 1)
        assert running.dispatcher.inflight() == 0
        mine.close(); theirs.close()
        serves_on(sim)
    assert backend.done_calls == [(peername, status), ("ok.test", 0)]


def test_stopping_is_bounded_when_a_plugin_thread_never_returns(no_leaks, caplog):
    """stop while a plugin call hangs for good: run() returns after the request's deadline plus the
    watchdog's grace (its DONE sent by then), without waiting for the plugin thread."""
    backend, running_daemon = broken_daemon()
    try:
        with running_daemon as (sim, running):
            mine, theirs = tcp_pair()
            req = sim.client_hello_anon(mine, peername="never-returns.test", timeout_ms=300)
            while not req.accepted:
                time.sleep(0.01)
            running.stopping.set()  # the same as SIGTERM in serve()
            running.thread.join(WAIT)
            assert not running.thread.is_alive(), "run() waited for a plugin thread that never returns"
            assert req.wait(0)[0] == errno.ETIMEDOUT and req.done_calls == 1
            assert running.dispatcher.inflight() == 0
            mine.close(); theirs.close()
    finally:
        backend.release.set()  # let the abandoned thread end, so this test leaves nothing behind
    assert req.done_calls == 1  # its late return sent no second DONE
    assert "stuck in a plugin" in caplog.text


NEVER_RETURNS_PLUGIN = '''"""A third-party backend whose hsd_handshake never returns (installed as a dist on sys.path)."""

import threading

from hsd.hookspecs import BackendInfo, Mode, hookimpl


@hookimpl
def hsd_backend_info():
    return BackendInfo("never-returns", "0.1", frozenset({Mode("client", "unauth")}))


@hookimpl
def hsd_handshake(ctx):
    print(f"never-returns: handshake on fd {ctx.sock.fileno()} entered", flush=True)
    threading.Event().wait()  # forever
'''


def install_never_returning_plugin(where) -> str:
    """The plugin as pip would leave it: the module and a dist-info with its hsd.backends entry point."""
    (where / "hsd_never_returns.py").write_text(NEVER_RETURNS_PLUGIN)
    dist = where / "hsd_never_returns-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hsd-never-returns\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hsd.backends]\nnever-returns = hsd_never_returns\n")
    return str(where)


def test_sigterm_exits_a_real_daemon_whose_plugin_never_returns(tmp_path, no_leaks):
    """The real hsd process, a third-party plugin that hangs forever, three requests in it, SIGTERM:
    hsd exits 0 once their deadlines (+ grace) have passed, and every request got exactly one DONE.
    (Before: the watchdog spun at 100% CPU on the entries and the main thread joined the pool forever.)"""
    plugin_dir = install_never_returning_plugin(tmp_path)
    config = tmp_path / "hsd.conf"
    config.write_text("[hsd]\nbackend=never-returns\nhandshake_timeout=1000\n")
    log_path = tmp_path / "hsd.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [plugin_dir, os.environ.get("PYTHONPATH")])),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with Simulator() as sim:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator", sim.address,
                                     "-s"], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env)
        pairs = [tcp_pair() for _ in range(3)]
        try:
            _wait_listening_proc(sim, proc, log_path)
            reqs = [sim.client_hello_anon(a, peername="hang.test", timeout_ms=1000) for a, _ in pairs]
            end = time.monotonic() + WAIT
            while log_path.read_text().count("never-returns: handshake on fd") < 3:
                assert proc.poll() is None and time.monotonic() < end, log_path.read_text()
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            bound = 1.0 + WATCHDOG_GRACE + SHUTDOWN_GRACE  # the longest deadline, the watchdog, the drain
            stopping = cpu_while_running(proc, bound + WAIT)  # WAIT: slack of a loaded machine, not a timing claim
            code = proc.poll()
            assert code == 0, log_path.read_text()
            # every watchdog iteration sleeps: waiting out the deadlines is idle time, not a spinning core
            assert stopping.wall > 1.0 and stopping.cpu < 0.25 * stopping.wall, (stopping, log_path.read_text())
            print(f"stopping: {stopping}")
            assert [r.wait(0)[0] for r in reqs] == [errno.ETIMEDOUT] * 3
            assert [r.done_calls for r in reqs] == [1, 1, 1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for a, b in pairs:
                a.close(); b.close()
    text = log_path.read_text()
    assert "Traceback" not in text, text
    assert text.count("overran its deadline in the plugin") == 3, text


@dataclass
class CpuUse:
    cpu: float = 0.0  # seconds of CPU (user + system, all threads) the process used ...
    wall: float = 0.0  # ... in this many seconds of wall time


def cpu_while_running(proc: subprocess.Popen, timeout: float) -> CpuUse:
    """Sample the process's CPU time (/proc/PID/stat utime + stime) until it exits or timeout passes."""
    tick = os.sysconf("SC_CLK_TCK")
    first: tuple[float, float] | None = None
    use = CpuUse()
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        try:
            with open(f"/proc/{proc.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            break  # gone between poll() and open()
        now, cpu = time.monotonic(), (int(fields[11]) + int(fields[12])) / tick  # stat fields 14 and 15
        if first is None:
            first = (now, cpu)
        use = CpuUse(cpu - first[1], now - first[0])
        time.sleep(0.05)
    return use


def _wait_listening_proc(sim: Simulator, proc: subprocess.Popen, log_path) -> None:
    end = time.monotonic() + WAIT
    while not sim.listeners():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < end, log_path.read_text()
        time.sleep(0.02)
