"""[hsd] isolation = process: a crashing backend costs only its own request.

Through the simulator and a real Dispatcher: a plugin that segfaults in native
code while real TLS handshakes (openssl backend against openssl s_server) are
held mid-flight; statuses of typed failures crossing the process boundary; a
hanging child killed at its deadline; PSK from a real request keyring in the
child; no zombie children, no leaked fds.  test_isolation_cost prints the
price (run with -s).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from hsd import keyring
from hsd.config import Config
from hsd.errors import HandshakeError, HandshakeTimeout, PeerRejected, UnknownPskIdentity
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.isolation import _fork_with_request_keyrings
from hsd.session import Session
from hsd_kit import peers
from hsd_kit.harness import DaemonHarness, assert_ktls_pair, assert_ktls_roundtrip
from hsd_kit.matrix import MATRIX, run_case

CRASHER = "crasher"


class MisbehavingBackend:
    """Serves server/x509 and client/unauth as each test scripts it (runs in the isolated child)."""

    def __init__(self, behaviour: str, name: str = CRASHER) -> None:
        self.behaviour = behaviour
        self.name = name

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "1.0", frozenset({Mode("server", "x509"), Mode("client", "unauth")}))

    @hookimpl
    def hsd_handshake(self, ctx):
        what = self.behaviour
        if what == "segfault":
            ctypes.string_at(0)  # SIGSEGV in native code
        if what == "abort":
            os.abort()
        if what == "exit":
            os._exit(3)
        if what == "raise":
            raise RuntimeError("plugin bug")
        if what == "reject":
            raise PeerRejected("scripted rejection")
        if what == "timeout":
            raise HandshakeTimeout("scripted timeout")
        if what == "unknown-psk":
            raise UnknownPskIdentity("scripted unknown identity")
        if what == "enokey":
            raise HandshakeError("scripted custom status", errno.ENOKEY)
        if what == "none":
            return None
        if what == "hang":
            time.sleep(3600)
        if what == "hang-ignoring-alarm":
            signal.signal(signal.SIGALRM, signal.SIG_IGN)
            time.sleep(3600)
        return Session(cipher="TLS_AES_256_GCM_SHA384", tx_secret=bytearray(b"\x11" * 48),
                       rx_secret=bytearray(b"\x22" * 48), tx_seq=2, rx_seq=1, group="x25519",
                       peer_certificates=(b"\x30\x03der",), details={"child": str(os.getpid())})


def isolated(**kw) -> Config:
    return Config(isolation="process", **kw)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    client.setblocking(False)
    return client, server


def children() -> list[tuple[int, str, str]]:
    """(pid, state, executable) of every child of this process, zombies included."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) != me:
                continue
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
            except OSError:
                exe = "?"
            found.append((int(entry), fields[0], exe))
        except (OSError, ValueError):
            continue
    return found


def python_children() -> list[tuple[int, str, str]]:
    """Children that are forks of this interpreter (isolation children), or zombies of anything."""
    me = os.path.realpath(sys.executable)
    return [c for c in children() if c[1] == "Z" or os.path.realpath(c[2]) == me]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- statuses across the process boundary


@pytest.mark.parametrize("behaviour,status,reason", [
    ("segfault", errno.EIO, "SIGSEGV"),
    ("abort", errno.EIO, "SIGABRT"),
    ("exit", errno.EIO, "exited with status 3"),
    ("raise", errno.EIO, "RuntimeError('plugin bug')"),
    ("reject", errno.EACCES, "scripted rejection"),
    ("timeout", errno.ETIMEDOUT, "scripted timeout"),
    ("unknown-psk", errno.EKEYREJECTED, "scripted unknown identity"),
    ("enokey", errno.ENOKEY, "scripted custom status"),
    ("none", errno.EOPNOTSUPP, "did not handle"),
])
def test_child_failure_keeps_its_status(behaviour, status, reason):
    with DaemonHarness(CRASHER, isolated(handshake_timeout_ms=5000), discover=False,
                       extra_plugins={CRASHER: MisbehavingBackend(behaviour)}) as harness:
        mine, peer = tcp_pair()
        try:
            finished = harness.finish(harness.client_hello_anon(mine, peername="localhost", timeout_ms=5000)).expect(status)
        finally:
            mine.close(); peer.close()
    print(finished.describe())
    assert reason in finished.outcome.reason
    assert finished.request.ktls_tx is None
    assert not python_children()


def test_session_crosses_the_pipe_intact():
    """Everything but the secrets travels in the header; the secrets arrive and are installed."""
    with DaemonHarness(CRASHER, isolated(), discover=False,
                       extra_plugins={CRASHER: MisbehavingBackend("ok")}) as harness:
        mine, peer = tcp_pair()
        try:
            finished = harness.finish(harness.client_hello_anon(mine, peername="localhost", timeout_ms=5000)).expect(0)
        finally:
            mine.close(); peer.close()
    out, req = finished.outcome, finished.request
    assert (out.cipher, out.group) == ("TLS_AES_256_GCM_SHA384", "x25519")
    assert req.ktls_tx is not None and req.ktls_rx is not None
    assert (req.ktls_tx.spec.name, req.ktls_tx.rec_seq, req.ktls_rx.rec_seq) == ("AES_GCM_256", 2, 1)
    (serial,) = finished.remote_auth  # the peer certificate crossed too: the parent stored it as a key
    try:
        assert keyring.read_key(serial) == b"\x30\x03der"
    finally:
        keyring.invalidate(serial)


@pytest.mark.parametrize("behaviour", ["hang", "hang-ignoring-alarm"])
def test_hanging_child_is_killed_at_its_deadline(behaviour):
    """The child's own alarm ends a hang; a child that ignores it is SIGKILLed by the parent."""
    with DaemonHarness(CRASHER, isolated(), discover=False,
                       extra_plugins={CRASHER: MisbehavingBackend(behaviour)}) as harness:
        mine, peer = tcp_pair()
        try:
            finished = harness.finish(harness.client_hello_anon(mine, peername="localhost", timeout_ms=800)).expect(errno.ETIMEDOUT)
        finally:
            mine.close(); peer.close()
    print(finished.describe())
    expected = "SIGALRM" if behaviour == "hang" else "child was killed"
    assert expected in finished.outcome.reason
    assert not python_children()


# ---------------------------------------------------------------- a segfault among real handshakes


class GatedProxy:
    """A loopback relay that holds everything the server sends until open() is called.

    Handshakes through it are provably in flight (ClientHello sent, no ServerHello
    yet) for as long as the gate is shut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.gate = threading.Event()
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client_bytes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.listener.getsockname())
        sock.setblocking(False)
        return sock

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()

    def _run(self) -> None:
        inbound, _ = self.listener.accept()
        outbound = socket.create_connection(self.upstream)
        held = bytearray()
        with inbound, outbound:
            while not self.stop.is_set():
                ready = select.select([inbound, outbound], [], [], 0.05)[0]
                if inbound in ready:
                    data = inbound.recv(65536)
                    if not data:
                        return
                    self.client_bytes += len(data)
                    outbound.sendall(data)
                if outbound in ready:
                    data = outbound.recv(65536)
                    if not data and not held:
                        return
                    held += data
                if self.gate.is_set() and held:
                    inbound.sendall(held)
                    held.clear()


def test_segfault_costs_only_its_own_request(hsd_pki):
    config = isolated(backends={"server.x509": CRASHER}, handshake_timeout_ms=20000)
    config.client = replace(config.client, truststore=hsd_pki.ca)
    config.server = replace(config.server, certificate=hsd_pki.server.chain, private_key=hsd_pki.server.key)
    servers = [peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.chain, key=hsd_pki.server.key))
               for _ in range(4)]
    proxies: list[GatedProxy] = []
    with DaemonHarness("openssl", config, extra_plugins={CRASHER: MisbehavingBackend("segfault")},
                       max_inflight=8) as harness:
        try:
            for server in servers:
                server.start()
            proxies = [GatedProxy(server.address) for server in servers[:3]]
            socks = [proxy.connect() for proxy in proxies]
            inflight = [harness.client_hello_anon(sock, peername="localhost", timeout_ms=20000) for sock in socks]
            while not all(proxy.client_bytes for proxy in proxies):  # each ClientHello reached its proxy
                time.sleep(0.01)

            victim, other_end = tcp_pair()
            crash = harness.finish(harness.server_hello_x509(victim, timeout_ms=20000)).expect(errno.EIO)
            print(crash.describe())
            assert "SIGSEGV" in crash.outcome.reason
            assert not any(req.completed for req in inflight), "the gated handshakes finished before the crash"

            for proxy in proxies:
                proxy.open()
            for req, server in zip(inflight, servers):
                finished = harness.finish(req).expect(0)
                print(finished.describe(), "|", assert_ktls_roundtrip(req, server).summary())

            after = servers[3].connect()
            req = harness.client_hello_anon(after, peername="localhost", timeout_ms=20000)
            print(harness.finish(req).expect(0).describe(), "|", assert_ktls_roundtrip(req, servers[3]).summary())
            assert harness.dispatcher is not None and harness.dispatcher.stats["watchdog"] == 0
            victim.close(); other_end.close()
            for sock in socks + [after]:
                sock.close()
        finally:
            for proxy in proxies:
                proxy.close()
            for server in servers:
                server.stop()
    assert not python_children()


# ---------------------------------------------------------------- PSK from real kernel keyrings


def test_plain_fork_loses_the_request_keyring_and_the_fresh_session_keeps_it(hsd_keyring):
    """Why the runner forks from a thread with a fresh session keyring (verified, not assumed)."""
    serial = hsd_keyring.add("hsd-isolation-probe", b"secret-for-the-child")

    def child_reads() -> None:
        try:
            keyring.read_key(serial)
            os._exit(0)
        except OSError as exc:
            os._exit(100 + (exc.errno or 0) % 100)

    pid = os.fork()
    if pid == 0:
        child_reads()
    plain = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    class Ctx:  # only what the fork helper reads
        request = type("R", (), {"keyring": hsd_keyring.serial})()
        keyrings = ()

    pid = _fork_with_request_keyrings(Ctx(), child_reads)  # type: ignore[arg-type]
    fresh = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(f"plain fork: exit {plain} (100+errno), fork from a fresh session keyring: exit {fresh}")
    assert plain != 0, "a plain fork child could read the request's key: the keyring premise changed"
    assert fresh == 0
    keyring.read_key(serial)  # the daemon's own thread still possesses it


PSK_CASES = [case for case in MATRIX if case.auth == "psk" and case.peer == "openssl"]


@pytest.mark.parametrize("case", PSK_CASES, ids=[case.name for case in PSK_CASES])
def test_psk_from_the_request_keyring(case, hsd_pki):
    with DaemonHarness("openssl", isolated()) as harness:
        result = run_case(harness, case, hsd_pki, "openssl", base_config=isolated())
    print(result.line())
    assert result.finished.status == 0 and result.roundtrip is not None
    assert not python_children()


# ---------------------------------------------------------------- hygiene


def test_no_zombies_and_no_fd_leaks():
    backends = {name: MisbehavingBackend(name, name) for name in ("ok", "segfault", "reject", "exit", "hang")}
    with DaemonHarness("ok", isolated(), discover=False, extra_plugins=backends) as harness:

        def one(backend: str, timeout_ms: int = 5000) -> int:
            harness.reconfigure(replace(harness.config, backends={"client.unauth": backend}))
            mine, peer = tcp_pair()
            try:
                return harness.finish(harness.client_hello_anon(mine, peername="localhost", timeout_ms=timeout_ms)).status
            finally:
                mine.close(); peer.close()

        assert one("ok") == 0  # warm-up: pool threads and lazy state exist from here on
        before = open_fds()
        statuses = [one(name, 600 if name == "hang" else 5000) for name in ("ok", "segfault", "reject", "exit", "hang")] * 2
        assert statuses == [0, errno.EIO, errno.EACCES, errno.EIO, errno.ETIMEDOUT] * 2
        after = open_fds()
        assert after == before, f"{after - before} fds leaked"
        assert not python_children()


# ---------------------------------------------------------------- the price


def _cross_pairs(harness: DaemonHarness, pairs: int, concurrency: int) -> float:
    """hsd client (openssl) vs hsd server (openssl) on loopback pairs; returns the wall time."""

    def one_pair(_: int) -> None:
        client_sock, server_sock = tcp_pair()
        try:
            server_req = harness.server_hello_x509(server_sock, timeout_ms=20000)
            client_req = harness.client_hello_anon(client_sock, peername="localhost", timeout_ms=20000)
            harness.finish(client_req).expect(0)
            harness.finish(server_req).expect(0)
            assert_ktls_pair(client_req, server_req, rounds=1)
        finally:
            client_sock.close(); server_sock.close()

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one_pair, range(pairs)))
    return time.monotonic() - start


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_isolation_cost(hsd_pki):
    """Same workload, isolation none vs process: handshakes/s and latency (printed, not asserted).

    Each pair is an hsd client (openssl backend) against an hsd server (openssl
    backend, P-256) through the simulator, kTLS keys checked with one record each way."""
    pairs = 40
    figures = []
    for concurrency in (1, 4):
        for mode in ("none", "process"):
            config = Config(isolation=mode, handshake_timeout_ms=20000)
            config.client = replace(config.client, truststore=hsd_pki.ca)
            config.server = replace(config.server, certificate=hsd_pki.server.chain, private_key=hsd_pki.server.key)
            with DaemonHarness("openssl", config, max_inflight=8) as harness:
                _cross_pairs(harness, 4, concurrency)  # warm-up: pool threads, cached contexts
                harness.outcomes.clear()
                wall = _cross_pairs(harness, pairs, concurrency)
                durations = [o.duration * 1000 for o in harness.outcomes]
            assert len(durations) == 2 * pairs
            figures.append((concurrency, mode, 2 * pairs / wall, statistics.median(durations),
                            statistics.quantiles(durations, n=10)[-1]))
    print(f"\n{2 * pairs} handshakes per row; test process RSS {_rss_mb():.0f} MB (what each fork copies on write)")
    for concurrency, mode, rate, p50, p90 in figures:
        print(f"pairs in flight {concurrency}  isolation={mode:7}  {rate:6.1f} handshakes/s  "
              f"p50 {p50:6.1f} ms  p90 {p90:6.1f} ms")
    assert not python_children()


@pytest.mark.parametrize("header", [
    {"kind": "session"},  # no fields at all
    {"kind": "session", "cipher": "TLS_AES_128_GCM_SHA256", "tx_seq": 0, "rx_seq": 0, "version": 0x0304,
     "group": None, "remote_auth": {"tuple": []}, "peer_certificates": {"tuple": [{"b64": "not base64!"}]},
     "psk_identity": None, "details": {"dict": {}}},
    {"kind": "session", "cipher": "TLS_AES_128_GCM_SHA256", "tx_seq": 0, "rx_seq": 0, "version": 0x0304,
     "group": None, "remote_auth": {"tuple": []}, "peer_certificates": {"list?": []},
     "psk_identity": None, "details": {"dict": {}}},
    {"kind": "error", "status": "EACCES", "reason": "x", "type": "PeerRejected"},
    {"kind": "error", "status": 0, "reason": "x", "type": "PeerRejected"},  # "failed" with success
])
def test_a_garbled_result_from_the_child_is_eio_not_a_crash(header):
    """The parent trusts nothing the child wrote: a header with missing or mistyped fields is one clean
    failure (EIO or a real errno), never a KeyError/TypeError or a success."""
    from hsd.isolation import IsolatedHandshakeFailed, _encode, _result

    frame = _encode(header, bytearray(b"\x11" * 32), bytearray(b"\x22" * 32))
    with pytest.raises(HandshakeError) as raised:
        _result(frame, 0, False)
    assert raised.value.status != 0
    if header["kind"] == "session":
        assert isinstance(raised.value, IsolatedHandshakeFailed) and raised.value.status == errno.EIO
    else:
        assert raised.value.status == errno.EIO  # not an errno the child may invent: EIO


def test_the_child_refuses_a_malformed_session_with_the_plugins_name():
    """Checked in the child too, so isolation=process fails a bytes secret the same way as in-process
    (the pipe would otherwise have turned it into a fresh bytearray and hidden the bug)."""

    class BytesSecret(MisbehavingBackend):
        @hookimpl
        def hsd_handshake(self, ctx):
            return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=b"\x11" * 32, rx_secret=bytearray(32))

    with DaemonHarness(CRASHER, isolated(), discover=False, extra_plugins={CRASHER: BytesSecret("ok")}) as harness:
        mine, peer = tcp_pair()
        try:
            finished = harness.finish(harness.client_hello_anon(mine, peername="localhost", timeout_ms=5000))
            finished.expect(errno.EIO)
        finally:
            mine.close(); peer.close()
    assert finished.outcome.reason == (f"backend '{CRASHER}' returned a malformed session: "
                                       "tx_secret is bytes, not bytearray (the core could not wipe it)")
    assert not python_children()
