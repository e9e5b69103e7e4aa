"""`hsd bench`: how fast hsd is, next to the C limit and the bare TLS library, in one run.

Why: a handshake daemon in Python must show what it costs over OpenSSL itself.
Every figure comes from real handshakes on loopback:

* C limit: `openssl s_time -new` against `openssl s_server` (same cert, suite
  and group); the CLI is OpenSSL 3.0, so it has no ML-KEM.
* bare library: the same handshakes in one process of pyOpenSSL (or tlslite)
  threads, no hsd, one SSL.Context shared by all of them (the ordinary way).
* hsd: the real daemon (`hsd --simulator`) in its own process, serving the
  kernel simulator that runs in this process; the consumer side (submit, wait
  for DONE) is here too, so latency is counted from submit (READY) to DONE.

Peers are separate processes so they never share a GIL with what is measured:
for hsd-as-client a pool of pyOpenSSL server threads (bundled OpenSSL, so it
speaks X25519MLKEM768), or `openssl s_server -psk` processes for PSK; for
hsd-as-server a pool of pyOpenSSL client threads.  The same module is the
entry point of those helper processes (`python -m hsd_kit.bench _peer|_bare`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import secrets as secrets_mod
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hsd.hookspecs import BackendInfo, Mode, hookimpl

from .processes import DaemonProcesses

WORKLOADS = ("client-unauth", "client-x509", "server-x509", "client-psk")
KEY_TYPES = ("p256", "rsa")
GROUPS = {"x25519": "X25519", "hybrid": "X25519MLKEM768"}
NEGOTIATED_NAMES = {"x25519": "x25519", "hybrid": "X25519MLKEM768"}  # as SSL_get0_group_name spells them
PINNED_GROUP_ENV = "HSD_BENCH_PINNED_GROUP"
KTLS_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA256"
PSK_IDENTITY = "hsd-bench-psk"
TIMEOUT_MS = 30000
PSK_SERVERS = 4  # openssl s_server serves one connection at a time: several, round robin


# ================================================================ figures


@dataclass
class RunFigures:
    """One measured run: n handshakes at a given concurrency."""

    count: int = 0
    ok: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, per successful handshake
    cpu: float | None = None  # CPU seconds of the measured process during the run
    statuses: dict[int, int] = field(default_factory=dict)
    rss_growth_mb: float | None = None
    sim_cpu: float | None = None  # CPU of the bench process (simulator + consumers) during an hsd run

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(round(q * (len(data) - 1))))]

    @property
    def cpu_per_handshake_ms(self) -> float | None:
        return None if self.cpu is None or not self.ok else self.cpu / self.ok * 1000

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ok": self.ok, "elapsed": self.elapsed, "latencies": self.latencies,
                "cpu": self.cpu, "statuses": {str(k): v for k, v in self.statuses.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunFigures":
        return cls(count=data["count"], ok=data["ok"], elapsed=data["elapsed"], latencies=data["latencies"],
                   cpu=data.get("cpu"), statuses={int(k): v for k, v in data.get("statuses", {}).items()})


@dataclass
class Row:
    """Everything measured for one (workload, key type, group)."""

    workload: str
    key_type: str
    group: str
    not_possible: str = ""  # why this combination cannot run at all
    c_limit: float | None = None
    c_note: str = ""
    bare: dict[int, RunFigures] = field(default_factory=dict)
    bare_note: str = ""
    tlslite: RunFigures | None = None
    tlslite_note: str = ""
    hsd: dict[int, RunFigures] = field(default_factory=dict)
    burst: RunFigures | None = None
    negotiated: str = ""
    start_to_ready: float | None = None
    peak_rss_mb: float | None = None
    fds_before: int | None = None
    fds_after: int | None = None
    silent: tuple[float, float] | None = None  # (p50 without, p50 with 50 silent peers), seconds

    @property
    def label(self) -> str:
        return f"{self.workload} {self.key_type} {self.group}"


# ================================================================ test PKI and peers' TLS contexts


def _ssl_context(role: str, pki_dir: str, key_type: str, group: str, *, present_cert: bool,
                 require_peer_cert: bool = False) -> Any:
    """A TLS-1.3-only pyOpenSSL context like hsd's (kTLS suites, no cache, no tickets), for one group."""
    from OpenSSL import SSL
    from OpenSSL._util import lib

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    # the binding, not Context.set_tls13_ciphersuites: pyOpenSSL 25.0 (Debian trixie) lacks that method
    if lib.SSL_CTX_set_ciphersuites(context._context, KTLS_SUITES.encode()) != 1:
        raise RuntimeError(f"OpenSSL rejects the TLS 1.3 suites {KTLS_SUITES}")
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    # without the binding (cryptography 43, Debian trixie's) Helper pinned the group through OPENSSL_CONF
    if hasattr(lib, "SSL_CTX_set1_curves_list") and \
            lib.SSL_CTX_set1_curves_list(context._context, GROUPS[group].encode()) != 1:
        raise RuntimeError(f"the bundled OpenSSL rejects group {GROUPS[group]}")
    stem = "server" if role == "server" else "client"
    if present_cert:
        context.use_certificate_chain_file(os.path.join(pki_dir, f"{stem}-chain.pem"))
        context.use_privatekey_file(os.path.join(pki_dir, f"{stem}.key"))
    context.load_verify_locations(os.path.join(pki_dir, "ca.pem"))
    if role == "client":
        context.set_verify(SSL.VERIFY_PEER)
    else:
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_peer_cert else 0)
        context.set_verify(mode)
    return context


def _pin_host(conn: Any, name: bytes) -> None:
    from OpenSSL._util import lib

    param = lib.SSL_get0_param(conn._ssl)
    lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    conn.set_tlsext_host_name(name)


def _group_name(conn: Any) -> str:
    from OpenSSL._util import ffi, lib

    if not hasattr(lib, "SSL_get0_group_name"):  # cryptography 43 (Debian trixie's) lacks the binding:
        # a certificate handshake always makes an (EC)DHE share, and OPENSSL_CONF allowed this one group only
        pinned = os.environ.get(PINNED_GROUP_ENV, "")
        return NEGOTIATED_NAMES.get(pinned, "?")
    name = lib.SSL_get0_group_name(conn._ssl)
    return ffi.string(name).decode() if name != ffi.NULL else "?"


# ================================================================ helper processes (_peer, _bare)


class _Linger:
    """A peer keeps each finished connection open until the other side closes it.

    The tls ULP attaches only to an ESTABLISHED socket, so a peer that hung up
    right after its last handshake message would fail hsd's kTLS install with
    ENOTCONN (as the kernel would).  One selector thread holds them all."""

    def __init__(self) -> None:
        import selectors

        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def hold(self, sock: socket.socket) -> None:
        import selectors

        with self.lock:
            self.selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        while True:
            with self.lock:
                keys = list(self.selector.get_map().values()) if self.selector.get_map() else []
            if not keys:
                time.sleep(0.001)
                continue
            for key, _ in self.selector.select(0.01):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        self.selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]


def _tls_server_loop(listener: socket.socket, context: Any, budget: "_Budget", record: Callable[[float, Any], None],
                     stop: threading.Event, linger: _Linger | None = None) -> None:
    from OpenSSL import SSL

    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        if not budget.take():
            sock.close()
            return
        sock.setblocking(True)  # pyOpenSSL on a socket with a timeout fails with WantReadError
        start = time.perf_counter()
        conn = SSL.Connection(context, sock)
        conn.set_accept_state()
        _finish(conn, sock, start, record, linger)


def _finish(conn: Any, sock: socket.socket, start: float, record: Callable[[float, Any], None],
            linger: _Linger | None) -> None:
    """Complete one handshake; a peer lingers on the connection, the measured side closes it."""
    from OpenSSL import SSL

    try:
        conn.do_handshake()
        record(time.perf_counter() - start, conn)
    except (SSL.Error, OSError):
        record(-1.0, conn)
        sock.close()
        return
    if linger is not None:
        linger.hold(sock)
    else:
        sock.close()


def _tls_client_loop(port: int, context: Any, budget: "_Budget", record: Callable[[float, Any], None],
                     stop: threading.Event, linger: _Linger | None = None) -> None:
    from OpenSSL import SSL

    while not stop.is_set() and budget.take():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_MS / 1000)
        except OSError:
            record(-1.0, None)
            continue
        sock.setblocking(True)
        start = time.perf_counter()
        conn = SSL.Connection(context, sock)
        _pin_host(conn, b"localhost")
        conn.set_connect_state()
        _finish(conn, sock, start, record, linger)


class _Budget:
    """A shared countdown of handshakes still to do (None: unlimited)."""

    def __init__(self, total: int | None) -> None:
        self.left = total
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.failed = 0
        self.group = ""
        self.done = threading.Event()
        self.expected: int | None = None
        self.first_start: float | None = None  # throughput is counted from the first handshake's start
        self.last_end = 0.0

    def __call__(self, latency: float, conn: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            if latency >= 0:
                began = now - latency
                self.first_start = began if self.first_start is None else min(self.first_start, began)
            self.last_end = now
            if latency < 0:
                self.failed += 1
            else:
                self.latencies.append(latency)
                if not self.group and conn is not None:
                    self.group = _group_name(conn)
            if self.expected is not None and len(self.latencies) + self.failed >= self.expected:
                self.done.set()


def _helper_main(argv: list[str]) -> int:
    """`python -m hsd_kit.bench _peer|_bare ...`: a peer pool, or the bare library under test."""
    parser = argparse.ArgumentParser(prog="hsd_kit.bench helper")
    parser.add_argument("kind", choices=("_peer", "_bare"))
    parser.add_argument("--role", choices=("client", "server"), required=True)
    parser.add_argument("--pki", required=True)
    parser.add_argument("--key-type", default="p256")
    parser.add_argument("--group", default="x25519")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--count", type=int, default=0, help="handshakes in all (0: until stdin closes)")
    parser.add_argument("--port", type=int, default=0, help="client: where to connect")
    parser.add_argument("--client-cert", action="store_true", help="client: present a certificate")
    parser.add_argument("--require-client-cert", action="store_true")
    parser.add_argument("--lib", choices=("pyopenssl", "tlslite"), default="pyopenssl")
    parser.add_argument("--psk", action="store_true", help="tlslite client: PSK from stdin's first line")
    args = parser.parse_args(argv)
    import resource

    psk_secret = bytes.fromhex(sys.stdin.readline().strip()) if args.psk else b""
    record = _Recorder()
    record.expected = args.count or None
    budget = _Budget(args.count or None)
    stop = threading.Event()
    linger = _Linger() if args.kind == "_peer" else None
    if args.lib == "tlslite":
        worker = _tlslite_worker(args, psk_secret, budget, record)
    elif args.role == "server":
        context = _ssl_context("server", args.pki, args.key_type, args.group, present_cert=True,
                               require_peer_cert=args.require_client_cert)
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        worker = lambda: _tls_server_loop(listener, context, budget, record, stop, linger)  # noqa: E731
        print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    else:
        context = _ssl_context("client", args.pki, args.key_type, args.group, present_cert=args.client_cert)
        worker = lambda: _tls_client_loop(args.port, context, budget, record, stop, linger)  # noqa: E731
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    if args.count:
        record.done.wait()
    if args.kind == "_peer" or not args.count:
        sys.stdin.read()  # the bench closes our stdin when it is done with us (peers linger till then)
    elapsed = (record.last_end - record.first_start) if record.first_start else time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    figures = RunFigures(count=args.count or len(record.latencies) + record.failed, ok=len(record.latencies),
                         elapsed=elapsed, latencies=record.latencies,
                         cpu=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                         statuses={0: len(record.latencies), errno.EIO: record.failed} if record.failed else
                         {0: len(record.latencies)})
    out = figures.as_dict()
    out["group"] = record.group
    out["maxrss_mb"] = cpu1.ru_maxrss / 1024
    print(json.dumps(out), flush=True)
    os._exit(0)  # threads blocked in accept() must not hold the exit


def _tlslite_worker(args: argparse.Namespace, psk_secret: bytes, budget: _Budget,
                    record: _Recorder) -> Callable[[], None]:
    """tlslite-ng, client only, sequential: the pure-Python reference point."""
    from tlslite import HandshakeSettings, TLSConnection, X509, X509CertChain, parsePEMKey

    if args.role != "client":
        raise SystemExit("tlslite bare: client role only")
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.keyShares = [args.group if args.group == "x25519" else "x25519mlkem768"]
    settings.eccCurves = list(settings.keyShares) + [c for c in settings.eccCurves if c not in settings.keyShares
                                                     and "brainpool" not in c]
    settings.certificate_compression_send = []  # OpenSSL servers fail tlslite's compressed client certificates
    settings.certificate_compression_receive = []
    try:
        settings.validate()
    except ValueError as exc:  # e.g. a tlslite without ML-KEM
        raise SystemExit(f"tlslite cannot: {exc}") from None
    chain = key = None
    if args.psk:
        settings.pskConfigs = [(PSK_IDENTITY.encode(), psk_secret, "sha256")]
        settings.psk_modes = ["psk_dhe_ke"]
    if args.client_cert:
        with open(os.path.join(args.pki, "client.pem")) as handle:
            chain = X509CertChain([X509().parse(handle.read())])
        with open(os.path.join(args.pki, "client.key")) as handle:
            key = parsePEMKey(handle.read(), private=True)

    def run() -> None:
        while budget.take():
            sock = socket.create_connection(("127.0.0.1", args.port), timeout=TIMEOUT_MS / 1000)
            start = time.perf_counter()
            conn = TLSConnection(sock)
            try:
                conn.handshakeClientCert(chain, key, settings=settings, serverName="localhost")
                record(time.perf_counter() - start, None)
            except Exception:  # noqa: BLE001  (any tlslite failure counts as one failed handshake)
                record(-1.0, None)
            finally:
                sock.close()

    return run


class NullBackend:
    """A backend that does no TLS: what is left is the simulator + dispatcher + kTLS-install pipeline."""

    name = "bench-null"

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(self.name, "0", frozenset({Mode("client", "unauth")}))

    @hookimpl
    def hsd_handshake(self, ctx: Any) -> Any:
        return null_session()


def null_session() -> Any:
    """The fixed session the floor installs: a real cipher suite and key schedule, no handshake."""
    from hsd.session import Session

    return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(32 * b"\1"),
                   rx_secret=bytearray(32 * b"\2"), group="none")


def _floor_main(argv: list[str]) -> int:
    """`python -m hsd_kit.bench _floor -c CONF --simulator SOCK --max-inflight N -s`: hsd with NullBackend only."""
    import logging

    from hsd import config as config_mod
    from hsd.daemon import serve, setup_logging
    from hsd.plugins import PluginHost
    from hsd.sim_channel import SimChannel

    parser = argparse.ArgumentParser(prog="hsd_kit.bench _floor")
    parser.add_argument("-c", dest="config")
    parser.add_argument("--simulator", required=True)
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("-s", action="store_true")
    args = parser.parse_args(argv)
    cfg = config_mod.load(args.config)
    cfg.backend = NullBackend.name
    setup_logging(True, logging.INFO, syslog=False)  # same log line per handshake as the real daemon
    host = PluginHost(cfg)
    host.add(NullBackend.name, NullBackend())
    return serve(SimChannel.connect(args.simulator), cfg, backend=cfg.backend, config_path=args.config,
                 max_inflight=args.max_inflight, host=host)


def _bare_floor_main(argv: list[str]) -> int:
    """`python -m hsd_kit.bench _bare_floor --simulator SOCK`: the floor's exchanges with no dispatcher.

    One thread, no handshake threads, no context, no log line, no observers:
    READY -> ACCEPT -> kTLS install -> DONE -> close, through hsd's own channel and
    kTLS code.  What the pipeline floor costs above this is the dispatcher's share;
    this loop's own cost is the Python floor of the simulator's wire exchanges."""
    import signal

    from hsd.ktls import install_session
    from hsd.protocol import Done
    from hsd.sim_channel import SimChannel, SimKtls

    parser = argparse.ArgumentParser(prog="hsd_kit.bench _bare_floor")
    parser.add_argument("--simulator", required=True)
    args, _rest = parser.parse_known_args(argv)  # the daemon's own options (-c, --max-inflight, -s) mean nothing here
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    channel = SimChannel.connect(args.simulator)
    ktls = SimKtls(channel)
    while True:
        if not channel.wait_ready(None):
            continue
        while (request := channel.accept()) is not None:
            sock = socket.socket(fileno=request.sockfd)
            try:
                install_session(ktls, sock, null_session())
                status = 0
            except OSError as exc:
                status = exc.errno or errno.EIO
            channel.done(Done(request.sockfd, status))
            sock.close()


# ================================================================ orchestration in the bench process


def _helper_env(argv: list[str]) -> dict[str, str] | None:
    """Where cryptography binds no call that sets the groups (43, Debian trixie's), the helper's
    OpenSSL gets its one group from an OPENSSL_CONF system_default section instead."""
    from OpenSSL._util import lib

    if hasattr(lib, "SSL_CTX_set1_curves_list"):
        return None
    group = argv[argv.index("--group") + 1] if "--group" in argv else "x25519"
    conf = os.path.join(tempfile.gettempdir(), f"hsd-bench-{os.getpid()}-{group}.cnf")
    with open(conf, "w") as handle:
        handle.write("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = groups\n"
                     f"[groups]\nGroups = {GROUPS[group]}\n")
    return dict(os.environ, OPENSSL_CONF=conf, **{PINNED_GROUP_ENV: group})


def openssl_has_mlkem() -> bool:
    """ML-KEM came with OpenSSL 3.5: cryptography 43's wheel bundles 3.3 (Debian's links the system's)."""
    from cryptography.hazmat.backends.openssl.backend import backend

    return backend.openssl_version_number() >= 0x30500000


class Helper:
    """One helper process (peer pool or bare library); JSON lines on its stdout."""

    def __init__(self, argv: list[str], stdin_line: bytes = b"") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hsd_kit.bench", *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_helper_env(argv))
        assert self.proc.stdin is not None
        if stdin_line:
            self.proc.stdin.write(stdin_line + b"\n")
            self.proc.stdin.flush()

    def line(self, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready = _wait_readable(self.proc.stdout.fileno(), timeout)
        text = self.proc.stdout.readline() if ready else b""
        if not text:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            raise RuntimeError(f"helper {' '.join(self.proc.args[3:6])} gave no answer: {err[-800:]}")
        return json.loads(text)

    def finish(self, timeout: float = 600) -> dict[str, Any]:
        """Close stdin (unlimited pools stop) and read the final figures."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        result = self.line(timeout)
        self.proc.wait(10)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()


def _wait_readable(fd: int, timeout: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def hsd_processes(sim: Any, config_path: str, max_inflight: int, processes: int = 1,
                  module: str = "hsd.cli") -> DaemonProcesses:
    """The real hsd (`hsd -c CONF --simulator SOCK`) in `processes` processes, joined.

    Its log (one line per handshake, as in production) goes to /dev/null or $HSD_BENCH_LOG."""
    return DaemonProcesses(sim, [*module.split(), "-c", config_path, "--max-inflight", str(max_inflight), "-s"],
                           processes=processes, log_path=os.environ.get("HSD_BENCH_LOG") or None)


@dataclass
class Setup:
    """What one bench run shares: the PKIs, the daemon's config, the PSK keyring."""

    workdir: str
    pki: dict[str, str]
    psk_secret: bytes
    keyring: int
    psk_serial: int

    def config_path(self, key_type: str, max_inflight: int, backend: str = "openssl") -> str:
        pki = self.pki[key_type]
        path = os.path.join(self.workdir, f"hsd-{key_type}-{backend}.conf")
        with open(path, "w") as handle:
            handle.write(
                f"[authenticate.client]\nx509.truststore={pki}/ca.pem\n"
                f"x509.certificate={pki}/client-chain.pem\nx509.private_key={pki}/client.key\n"
                f"[authenticate.server]\nx509.truststore={pki}/ca.pem\n"
                f"x509.certificate={pki}/server-chain.pem\nx509.private_key={pki}/server.key\n"
                f"[hsd]\nbackend={backend}\nmax_inflight={max_inflight}\n")
        return path


@contextlib.contextmanager
def setup(key_types: tuple[str, ...]) -> Iterator[Setup]:
    from hsd import keyring
    from .pki import make_pki

    workdir = tempfile.mkdtemp(prefix="hsd-bench-")
    # the process keyring, not the session keyring: adding to a missing session keyring would
    # make this process join a fresh one and lose possession of the user keyring
    ring = keyring.add_key("keyring", f"hsd-bench-{uuid.uuid4().hex}", b"", keyring.KEY_SPEC_PROCESS_KEYRING)
    keyring.set_perm(ring, 0x3F3F0000)  # the daemon (another process) links it, as the kernel would
    try:
        secret = secrets_mod.token_bytes(32)
        serial = keyring.add_key("user", PSK_IDENTITY, secret, ring)
        pki = {kt: make_pki(os.path.join(workdir, kt), kt).directory for kt in key_types}
        yield Setup(workdir, pki, secret, ring, serial)
    finally:
        with contextlib.suppress(OSError):
            keyring.invalidate(ring)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- peers of hsd


class PeerServers:
    """Servers for hsd-as-client: a pyOpenSSL thread pool, or `openssl s_server -psk` processes."""

    def __init__(self, st: Setup, workload: str, key_type: str, group: str, threads: int = 8) -> None:
        self.ports: list[int] = []
        self.helper: Helper | None = None
        self.servers: list[subprocess.Popen] = []
        self._next = 0
        self._lock = threading.Lock()
        if workload == "client-psk":
            for _ in range(PSK_SERVERS):
                port = _free_port()
                self.servers.append(subprocess.Popen(
                    ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-nocert", "-tls1_3", "-quiet",
                     "-groups", GROUPS[group], "-psk", st.psk_secret.hex(), "-psk_identity", PSK_IDENTITY],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                _wait_port(port)
                self.ports.append(port)
        else:
            argv = ["_peer", "--role", "server", "--pki", st.pki[key_type], "--key-type", key_type,
                    "--group", group, "--threads", str(threads)]
            if workload == "client-x509":
                argv.append("--require-client-cert")
            self.helper = Helper(argv)
            self.ports.append(self.helper.line()["port"])

    def port(self) -> int:
        with self._lock:
            self._next += 1
            return self.ports[self._next % len(self.ports)]

    def close(self) -> str:
        """Stop the peers; returns the group the pool negotiated (as the peer saw it)."""
        group = ""
        if self.helper is not None:
            try:
                group = self.helper.finish(30).get("group", "")
            finally:
                self.helper.kill()
        for proc in self.servers:
            proc.kill()
            proc.wait()
            if proc.stdin:
                proc.stdin.close()
        return group


class MuteListener:
    """Accepts TCP connections and never says a word: consumer sockets for the no-TLS pipeline floor."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])  # held open: the ULP wants ESTABLISHED
            except OSError:
                return

    def port(self) -> int:
        return self.listener.getsockname()[1]

    def close(self) -> str:
        self.listener.close()
        for sock in self.held:
            sock.close()
        return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"peer on port {port} did not come up")


# ---------------------------------------------------------------- driving hsd through the simulator


def _submit(sim: Any, st: Setup, workload: str, sock: socket.socket, done: Callable[[int, int], None]) -> Any:
    """One consumer request (retrying the kernel's EAGAIN when its pending queue is full)."""
    while True:
        try:
            if workload == "client-unauth":
                return sim.client_hello_anon(sock, peername="localhost", timeout_ms=TIMEOUT_MS, done=done)
            if workload == "client-x509":
                return sim.client_hello_x509(sock, peername="localhost", timeout_ms=TIMEOUT_MS, done=done)
            if workload == "client-psk":
                return sim.client_hello_psk(sock, [st.psk_serial], keyring=st.keyring, timeout_ms=TIMEOUT_MS,
                                            done=done)
            return sim.server_hello_x509(sock, timeout_ms=TIMEOUT_MS, done=done)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            time.sleep(0.0005)


class _Completion:
    """Collects DONEs: latency from submit to DONE, status counts."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.figures = RunFigures(count=expected)
        self.all_done = threading.Event()
        self.first: float | None = None  # throughput is counted from the first submit
        self.last = 0.0

    def finish(self, submitted: float, sock: socket.socket, status: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.first = submitted if self.first is None else min(self.first, submitted)
            self.figures.statuses[status] = self.figures.statuses.get(status, 0) + 1
            if status == 0:
                self.figures.ok += 1
                self.figures.latencies.append(now - submitted)
            self.last = now
            complete = sum(self.figures.statuses.values()) >= self.expected
        sock.close()
        if complete:
            self.all_done.set()


def run_hsd_client(sim: Any, st: Setup, workload: str, peers: PeerServers, concurrency: int, count: int,
                   daemon: DaemonProcesses) -> RunFigures:
    """concurrency consumer threads, each: connect to a peer, submit, wait for DONE, close."""
    completion = _Completion(count)
    budget = _Budget(count)

    def consumer() -> None:
        while budget.take():
            sock = socket.create_connection(("127.0.0.1", peers.port()))
            finished = threading.Event()
            at = time.perf_counter()  # EAGAIN retries (the kernel's queue was full) count as latency

            def done(status: int, _peerid: int, sock: socket.socket = sock, at: float = at,
                     finished: threading.Event = finished) -> None:
                completion.finish(at, sock, status)
                finished.set()

            _submit(sim, st, workload, sock, done)
            finished.wait(TIMEOUT_MS / 1000 + 10)

    return _timed(daemon, completion, [consumer] * concurrency)


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(daemon: DaemonProcesses, completion: _Completion, workers: list[Callable[[], None]]) -> RunFigures:
    cpu0, own0 = daemon.cpu(), _own_cpu()
    start = time.perf_counter()
    threads = [threading.Thread(target=w, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    completion.all_done.wait(TIMEOUT_MS / 1000 * 4)
    for thread in threads:
        thread.join(5)
    figures = completion.figures
    figures.elapsed = (completion.last or time.perf_counter()) - (completion.first or start)
    figures.cpu = daemon.cpu() - cpu0
    figures.sim_cpu = _own_cpu() - own0
    return figures


def run_hsd_burst(sim: Any, st: Setup, workload: str, key_type: str, group: str, peers: PeerServers | None,
                  count: int, daemon: DaemonProcesses) -> RunFigures:
    """count connections made first, then all requests submitted at once (queued in the simulator)."""
    completion = _Completion(count)
    rss0 = daemon.status_mb("VmRSS")
    clients: Helper | None = None
    if workload == "server-x509":
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        clients = Helper(["_peer", "--role", "client", "--pki", st.pki[key_type], "--threads",
                          str(count), "--count", str(count), "--port", str(listener.getsockname()[1]),
                          "--group", group])
        socks = [listener.accept()[0] for _ in range(count)]
        listener.close()
    else:
        assert peers is not None
        socks = [socket.create_connection(("127.0.0.1", peers.port())) for _ in range(count)]
    cpu0, own0 = daemon.cpu(), _own_cpu()
    start = time.perf_counter()
    for sock in socks:
        at = time.perf_counter()
        _submit(sim, st, workload, sock, lambda status, _pid, s=sock, t=at: completion.finish(t, s, status))
    completion.all_done.wait(TIMEOUT_MS / 1000 * 4)
    figures = completion.figures
    figures.elapsed = (completion.last or time.perf_counter()) - start
    figures.cpu = daemon.cpu() - cpu0
    figures.sim_cpu = _own_cpu() - own0
    figures.rss_growth_mb = daemon.status_mb("VmHWM") - rss0
    if clients is not None:
        with contextlib.suppress(Exception):
            clients.finish(30)
        clients.kill()
    return figures


def run_hsd_server(sim: Any, st: Setup, key_type: str, group: str, concurrency: int, count: int,
                   daemon: DaemonProcesses) -> tuple[RunFigures, str]:
    """hsd as the server: a pool of concurrency pyOpenSSL clients connects; each accepted socket is submitted."""
    completion = _Completion(count)
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    clients = Helper(["_peer", "--role", "client", "--pki", st.pki[key_type], "--threads", str(concurrency),
                      "--count", str(count), "--port", str(listener.getsockname()[1]), "--group", group])

    def acceptor() -> None:
        for _ in range(count):
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            at = time.perf_counter()
            _submit(sim, st, "server-x509", sock, lambda status, _pid, s=sock, t=at: completion.finish(t, s, status))

    try:
        figures = _timed(daemon, completion, [acceptor])
        peer_group = clients.finish(60).get("group", "")
    finally:
        listener.close()
        clients.kill()
    return figures, peer_group


def run_silent(sim: Any, st: Setup, peers: PeerServers, count: int, daemon: DaemonProcesses,
               silent: int = 50) -> tuple[float, float]:
    """p50 at concurrency 1 without and with `silent` requests stuck on peers that never answer.

    Concurrency-1 latency on a busy 2-core machine drifts by tens of percent
    from run to run, so the quiet baseline is measured before and after the
    loaded run and averaged."""
    before = run_hsd_client(sim, st, "client-unauth", peers, 1, count, daemon).pct(0.5)
    mute = socket.create_server(("127.0.0.1", 0), backlog=silent + 8)  # connections complete, no bytes ever
    socks = [socket.create_connection(mute.getsockname()) for _ in range(silent)]
    stuck = [_submit(sim, st, "client-unauth", s, lambda *_: None) for s in socks]
    time.sleep(0.3)  # let the daemon accept them all (they are now waiting for a ServerHello)
    loaded = run_hsd_client(sim, st, "client-unauth", peers, 1, count, daemon).pct(0.5)
    for sock in socks:
        sock.close()
    mute.close()
    for req in stuck:
        with contextlib.suppress(TimeoutError):
            req.wait(10)
    after = run_hsd_client(sim, st, "client-unauth", peers, 1, count, daemon).pct(0.5)
    return (before + after) / 2, loaded


# ---------------------------------------------------------------- bare library and C


def run_bare(st: Setup, workload: str, key_type: str, group: str, concurrency: int, count: int,
             lib: str = "pyopenssl", peers: PeerServers | None = None) -> RunFigures:
    """The same handshakes with the library alone, in a helper process of `concurrency` threads."""
    common = ["--pki", st.pki[key_type], "--key-type", key_type, "--group", group, "--threads", str(concurrency),
              "--count", str(count), "--lib", lib]
    if workload == "server-x509":
        bare = Helper(["_bare", "--role", "server", *common])
        port = bare.line()["port"]
        clients = Helper(["_peer", "--role", "client", "--pki", st.pki[key_type], "--threads", str(concurrency),
                          "--count", str(count), "--port", str(port), "--group", group])
        try:
            result = bare.line(600)
        finally:
            clients.kill()
            bare.kill()
    else:
        assert peers is not None
        argv = ["_bare", "--role", "client", *common, "--port", str(peers.ports[0])]
        if workload == "client-x509":
            argv.append("--client-cert")
        if workload == "client-psk":
            argv.append("--psk")
        bare = Helper(argv, stdin_line=st.psk_secret.hex().encode() if workload == "client-psk" else b"")
        try:
            result = bare.line(600)
        finally:
            bare.kill()
    figures = RunFigures.from_dict(result)
    return figures


def run_c_limit(st: Setup, workload: str, key_type: str, group: str, seconds: int) -> tuple[float | None, str]:
    """`openssl s_time -new` against `openssl s_server`: handshakes per second, C on both sides."""
    if group == "hybrid":
        return None, "n/a (CLI lacks ML-KEM)"
    if workload == "client-psk":
        return None, "n/a (s_time has no PSK)"
    if not shutil.which("openssl"):
        return None, "n/a (no openssl CLI)"
    pki = st.pki[key_type]
    port = _free_port()
    server_argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-quiet", "-naccept", "1000000",
                   "-cert", f"{pki}/server-chain.pem", "-key", f"{pki}/server.key", "-groups", GROUPS[group],
                   "-CAfile", f"{pki}/ca.pem", "-ciphersuites", KTLS_SUITES, "-no_ticket"]
    if workload == "client-x509":
        server_argv += ["-Verify", "1"]
    elif workload == "server-x509":
        server_argv += ["-verify", "1"]
    server = subprocess.Popen(server_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        client_argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_3", "-time", str(seconds),
                       "-ciphersuites", KTLS_SUITES, "-CAfile", f"{pki}/ca.pem", "-verify", "1"]
        if workload == "client-x509":
            client_argv += ["-cert", f"{pki}/client.pem", "-key", f"{pki}/client.key"]
        out = subprocess.run(client_argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        server.kill()
        server.wait()
    match = re.search(r"(\d+) connections in (\d+) real seconds", out)
    if not match:
        return None, "s_time gave no figure"
    return int(match.group(1)) / int(match.group(2)), ""


# ================================================================ the whole run


def installed_backends() -> tuple[str, ...]:
    """The backends to compare: openssl, and tlslite where tlslite-ng is installed (it is not in Debian)."""
    import importlib.util

    return ("openssl", "tlslite") if importlib.util.find_spec("tlslite") else ("openssl",)


@dataclass
class Plan:
    """How much to measure: --quick is a CI smoke run (correctness, not figures)."""

    workloads: tuple[str, ...] = WORKLOADS
    key_types: tuple[str, ...] = KEY_TYPES
    groups: tuple[str, ...] = tuple(GROUPS)
    counts: dict[int, int] = field(default_factory=lambda: {1: 150, 8: 400, 64: 640})
    burst: int = 1000
    c_seconds: int = 3
    tlslite_count: int = 20
    silent: int = 50
    silent_count: int = 200
    max_inflight: int = 64
    models: bool = True  # also measure the alternative concurrency models
    backends: tuple[str, ...] = field(default_factory=lambda: installed_backends())  # hsd with each, same workloads
    backend_counts: dict[int, int] = field(default_factory=lambda: {1: 40, 8: 80})

    @classmethod
    def quick(cls) -> "Plan":
        return cls(workloads=WORKLOADS, key_types=("p256",), groups=("x25519",), counts={1: 8, 8: 16}, burst=40,
                   c_seconds=1, tlslite_count=2, silent=5, silent_count=5, max_inflight=16, models=False,
                   backend_counts={1: 4, 8: 8})


@dataclass
class ModelFigures:
    """One concurrency model on one workload."""

    name: str
    processes: int
    max_inflight: int
    concurrency: int
    figures: RunFigures
    rss_mb: float
    start_to_ready: float


def measure_row(sim: Any, st: Setup, plan: Plan, workload: str, key_type: str, group: str,
                say: Callable[[str], None]) -> Row:
    row = Row(workload, key_type, group)
    if workload == "client-psk" and key_type != plan.key_types[0]:
        row.not_possible = f"n/a: PSK uses no certificate (see the {plan.key_types[0]} row)"
        return row
    if workload == "client-psk" and group == "hybrid":
        row.not_possible = "n/a: the PSK peer is openssl s_server 3.0, which lacks ML-KEM"
        return row
    if group == "hybrid" and not openssl_has_mlkem():
        row.not_possible = "n/a: the OpenSSL cryptography uses lacks ML-KEM (3.5+)"
        return row
    say(f"{row.label}: C limit")
    row.c_limit, row.c_note = run_c_limit(st, workload, key_type, group, plan.c_seconds)
    server_role = workload == "server-x509"
    peers = None if server_role else PeerServers(st, workload, key_type, group)
    try:
        if workload == "client-psk":
            row.bare_note = "n/a (pyOpenSSL has no PSK API)"
        else:
            for conc, count in plan.counts.items():
                say(f"{row.label}: bare pyOpenSSL, concurrency {conc}")
                row.bare[conc] = run_bare(st, workload, key_type, group, conc, count, peers=peers)
        if server_role:
            row.tlslite_note = "not run (tlslite bare is client-side only here)"
        elif plan.tlslite_count and "tlslite" not in installed_backends():
            row.tlslite_note = "n/a (tlslite-ng is not installed)"
        elif plan.tlslite_count:
            say(f"{row.label}: bare tlslite")
            try:
                row.tlslite = run_bare(st, workload, key_type, group, 1, plan.tlslite_count, lib="tlslite",
                                       peers=peers)
                if row.tlslite.ok != row.tlslite.count:
                    row.tlslite_note = f"n/a (tlslite: {row.tlslite.count - row.tlslite.ok} handshakes failed)"
                    row.tlslite = None
            except RuntimeError as exc:
                reason = re.search(r"tlslite cannot: (.*)", str(exc))
                row.tlslite_note = f"n/a ({reason.group(1).strip()[:50] if reason else str(exc)[-50:]})"
        daemon = hsd_processes(sim, st.config_path(key_type, plan.max_inflight), plan.max_inflight)
        row.start_to_ready = daemon.start_to_ready
        try:
            _hsd_runs(sim, st, plan, row, peers, daemon, say)
        finally:
            daemon.stop()
    finally:
        if peers is not None:
            group_seen = peers.close()
            row.negotiated = row.negotiated or group_seen
    return row


def _hsd_runs(sim: Any, st: Setup, plan: Plan, row: Row, peers: PeerServers | None, daemon: DaemonProcesses,
              say: Callable[[str], None]) -> None:
    workload, key_type, group = row.workload, row.key_type, row.group

    def run(conc: int, count: int) -> RunFigures:
        if workload == "server-x509":
            figures, seen = run_hsd_server(sim, st, key_type, group, conc, count, daemon)
            row.negotiated = row.negotiated or seen
            return figures
        assert peers is not None
        return run_hsd_client(sim, st, workload, peers, conc, count, daemon)

    run(1, 3)  # warm-up: first-use imports and caches are start-up cost, not per-handshake cost
    time.sleep(0.1)
    row.fds_before = daemon.fds()
    for conc, count in plan.counts.items():
        say(f"{row.label}: hsd, concurrency {conc}")
        row.hsd[conc] = run(conc, count)
    if plan.burst:
        say(f"{row.label}: hsd, burst of {plan.burst}")
        row.burst = run_hsd_burst(sim, st, workload, key_type, group, peers, plan.burst, daemon)
    if plan.silent and workload == "client-unauth" and key_type == plan.key_types[0] and group == plan.groups[0]:
        say(f"{row.label}: {plan.silent} silent peers")
        assert peers is not None
        row.silent = run_silent(sim, st, peers, plan.silent_count, daemon, plan.silent)
    time.sleep(0.2)
    row.fds_after = daemon.fds()
    row.peak_rss_mb = daemon.status_mb("VmHWM")


def measure_floor(sim: Any, st: Setup, plan: Plan, say: Callable[[str], None],
                  bare: bool = False) -> dict[int, RunFigures]:
    """READY -> DONE with a backend that does no TLS: the simulator + dispatcher + kTLS-install cost.

    bare: the same exchanges from one loop with no dispatcher (`_bare_floor`)."""
    out: dict[int, RunFigures] = {}
    mute = MuteListener()
    daemon = hsd_processes(sim, st.config_path(plan.key_types[0], plan.max_inflight), plan.max_inflight,
                           module="hsd_kit.bench _bare_floor" if bare else "hsd_kit.bench _floor")
    what = "no dispatcher" if bare else "pipeline floor (no TLS)"
    try:
        run_hsd_client(sim, st, "client-unauth", mute, 1, 3, daemon)  # type: ignore[arg-type]
        for conc, count in plan.counts.items():
            say(f"{what}, concurrency {conc}")
            out[conc] = run_hsd_client(sim, st, "client-unauth", mute, conc, count, daemon)  # type: ignore[arg-type]
    finally:
        daemon.stop()
        mute.close()
    return out


def measure_models(sim: Any, st: Setup, plan: Plan, say: Callable[[str], None]) -> list[ModelFigures]:
    """Threads (one process) against process pools, same workload and offered concurrency."""
    key_type, group = plan.key_types[0], plan.groups[0]
    out: list[ModelFigures] = []
    with contextlib.closing(PeerServers(st, "client-unauth", key_type, group)) as peers:
        for name, processes, inflight, conc in (
            ("threads", 1, 64, 8), ("threads", 1, 64, 64),
            ("2 processes x threads", 2, 32, 8), ("2 processes x threads", 2, 32, 64),
            ("process per worker", 8, 1, 8),
        ):
            say(f"model {name}: {processes} x max_inflight {inflight}, concurrency {conc}")
            with hsd_processes(sim, st.config_path(key_type, inflight), inflight, processes) as daemon:
                run_hsd_client(sim, st, "client-unauth", peers, processes, 3 * processes, daemon)
                figures = run_hsd_client(sim, st, "client-unauth", peers, conc, plan.counts.get(conc, 400), daemon)
                out.append(ModelFigures(name, processes, inflight, conc, figures, daemon.status_mb("VmHWM"),
                                        daemon.start_to_ready))
    return out


@dataclass
class BackendFigures:
    backend: str
    workload: str
    concurrency: int
    figures: RunFigures


def measure_backends(sim: Any, st: Setup, plan: Plan, say: Callable[[str], None]) -> list[BackendFigures]:
    """hsd with each backend on the same workloads: what the pure-Python stack costs."""
    key_type, group = plan.key_types[0], "x25519"  # tlslite has no hybrid group here
    out: list[BackendFigures] = []
    with contextlib.closing(PeerServers(st, "client-unauth", key_type, group)) as peers:
        for backend in plan.backends:
            with hsd_processes(sim, st.config_path(key_type, plan.max_inflight, backend), plan.max_inflight) as daemon:
                for conc, count in plan.backend_counts.items():
                    say(f"backend {backend}: client-unauth and server-x509 at concurrency {conc}")
                    out.append(BackendFigures(backend, "client-unauth", conc,
                                              run_hsd_client(sim, st, "client-unauth", peers, conc, count, daemon)))
                    figures, _ = run_hsd_server(sim, st, key_type, group, conc, count, daemon)
                    out.append(BackendFigures(backend, "server-x509", conc, figures))
    return out


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    floor: dict[int, RunFigures] = field(default_factory=dict)  # no-TLS pipeline, by concurrency
    bare_floor: dict[int, RunFigures] = field(default_factory=dict)  # the same with no dispatcher
    models: list[ModelFigures] = field(default_factory=list)
    backends: list[BackendFigures] = field(default_factory=list)


def run_bench(plan: Plan, say: Callable[[str], None] = lambda _: None) -> Results:
    """Measure every row of the plan, the no-TLS floor and the concurrency models; prints nothing."""
    from .simulator import Simulator

    results = Results()
    # the kernel caps its queue at 50; the burst is meant to sit queued, so this simulator holds it all
    with setup(plan.key_types) as st, Simulator(pending_max=max(plan.burst, 50) + 64) as sim:
        results.floor = measure_floor(sim, st, plan, say)
        results.bare_floor = measure_floor(sim, st, plan, say, bare=True)
        for workload in plan.workloads:
            for key_type in plan.key_types:
                for group in plan.groups:
                    results.rows.append(measure_row(sim, st, plan, workload, key_type, group, say))
        if plan.models:
            results.models = measure_models(sim, st, plan, say)
        if plan.backends:
            results.backends = measure_backends(sim, st, plan, say)
    return results


# ================================================================ the report


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None or value != value else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.2f}"


def _table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*headers), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _sim_cpu_ms(figures: RunFigures | None) -> float | None:
    return None if figures is None or figures.sim_cpu is None or not figures.ok else figures.sim_cpu / figures.ok * 1000


def report(results: Results, plan: Plan) -> str:
    rows, models = results.rows, results.models
    concs = list(plan.counts)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = [f"hsd bench: {os.cpu_count()} CPUs, load average at the end {load} (other work on the machine "
             f"skews every figure), counts {plan.counts}, burst {plan.burst}, max_inflight {plan.max_inflight}; "
             "handshakes/s unless noted"]
    head = ["workload", "cert", "group", "C s_time"] + [f"bare c{c}" for c in concs] + ["tlslite c1"] \
        + [f"hsd c{c}" for c in concs] + [f"hsd/bare c{c}" for c in concs] + ["hsd/C", "negotiated"]
    lines = []
    for row in rows:
        if row.not_possible:
            lines.append([row.workload, row.key_type, row.group, row.not_possible] + [""] * (len(head) - 4))
            continue
        best = max((f.rate for f in row.hsd.values()), default=None)
        lines.append([row.workload, row.key_type, row.group, row.c_note or _num(row.c_limit)]
                     + [_num(row.bare[c].rate) if c in row.bare else (row.bare_note or "-") for c in concs]
                     + [_num(row.tlslite.rate, "{:.1f}") if row.tlslite else (row.tlslite_note or "-")]
                     + [_num(row.hsd[c].rate) if c in row.hsd else "-" for c in concs]
                     + [_ratio(row.hsd[c].rate, row.bare[c].rate) if c in row.bare and c in row.hsd else "-"
                        for c in concs]
                     + [_ratio(best, row.c_limit), row.negotiated or "-"])
    parts.append("Throughput\n" + _table(head, lines))

    head = ["workload", "cert", "group"] + [f"hsd c{c} p50/p99 ms" for c in concs] \
        + [f"bare c{c} p50/p99 ms" for c in concs] + ["added c1 p50/p99 ms"]
    lines = []
    for row in rows:
        if row.not_possible:
            continue
        added = "-"
        if 1 in row.hsd and 1 in row.bare:
            added = (f"{_ms(row.hsd[1].pct(0.5) - row.bare[1].pct(0.5))}/"
                     f"{_ms(row.hsd[1].pct(0.99) - row.bare[1].pct(0.99))}")
        lines.append([row.workload, row.key_type, row.group]
                     + [f"{_ms(row.hsd[c].pct(0.5))}/{_ms(row.hsd[c].pct(0.99))}" if c in row.hsd else "-"
                        for c in concs]
                     + [f"{_ms(row.bare[c].pct(0.5))}/{_ms(row.bare[c].pct(0.99))}" if c in row.bare else "-"
                        for c in concs] + [added])
    parts.append("Latency, submit (READY) to DONE for hsd; handshake only for bare\n" + _table(head, lines))

    head = ["workload", "cert", "group"] + [f"hsd CPU ms/hs c{c}" for c in concs] \
        + [f"bare CPU ms/hs c{concs[-1]}", f"sim+consumer CPU ms/hs c{concs[-1]}", "burst ok", "burst hs/s", "burst p99 ms", "burst RSS +MB",
           "peak RSS MB", "fds before/after", "start->ready s"]
    lines = []
    for row in rows:
        if row.not_possible:
            continue
        burst = row.burst
        bad = {s: n for s, n in burst.statuses.items() if s} if burst else {}
        lines.append([row.workload, row.key_type, row.group]
                     + [_num(row.hsd[c].cpu_per_handshake_ms, "{:.2f}") if c in row.hsd else "-" for c in concs]
                     + [_num(row.bare[concs[-1]].cpu_per_handshake_ms, "{:.2f}") if concs[-1] in row.bare else "-"]
                     + [_num(_sim_cpu_ms(row.hsd.get(concs[-1])), "{:.2f}")]
                     + ([f"{burst.ok}/{burst.count}" + (f" {bad}" if bad else ""), _num(burst.rate),
                         _ms(burst.pct(0.99)), _num(burst.rss_growth_mb, "{:.1f}")] if burst else ["-"] * 4)
                     + [_num(row.peak_rss_mb, "{:.1f}"), f"{row.fds_before}/{row.fds_after}",
                        _num(row.start_to_ready, "{:.3f}")])
    parts.append("Resources (daemon process; CPU = user+system from /proc/PID/stat)\n" + _table(head, lines))

    if results.floor:
        head = ["concurrency", "hs/s", "p50/p99 ms", "daemon CPU ms/hs", "no dispatcher: p50 ms", "CPU ms/hs",
                "dispatcher's CPU ms/hs"]
        lines = []
        for c, f in results.floor.items():
            b = results.bare_floor.get(c)
            share = (f.cpu_per_handshake_ms - b.cpu_per_handshake_ms
                     if b and f.cpu_per_handshake_ms is not None and b.cpu_per_handshake_ms is not None else None)
            lines.append([str(c), _num(f.rate), f"{_ms(f.pct(0.5))}/{_ms(f.pct(0.99))}",
                          _num(f.cpu_per_handshake_ms, "{:.2f}"), _ms(b.pct(0.5)) if b else "-",
                          _num(b.cpu_per_handshake_ms, "{:.2f}") if b else "-", _num(share, "{:.2f}")])
        parts.append("Pipeline floor: READY -> ACCEPT -> (no TLS) -> kTLS install -> DONE through the simulator;\n"
                     "'no dispatcher' is the same exchanges from one loop with hsd's channel and kTLS code only\n"
                     + _table(head, lines))
    silent = [row for row in rows if row.silent]
    for row in silent:
        base, loaded = row.silent  # type: ignore[misc]
        parts.append(f"Silent peers ({row.label}, concurrency 1): p50 {_ms(base)} ms alone, {_ms(loaded)} ms "
                     f"with {plan.silent} silent peers in flight ({(loaded / base - 1) * 100:+.1f}%)")
    if models:
        head = ["model", "processes x max_inflight", "concurrency", "hs/s", "p50/p99 ms", "CPU ms/hs",
                "RSS MB (sum)", "start->ready s"]
        lines = [[m.name, f"{m.processes} x {m.max_inflight}", str(m.concurrency), _num(m.figures.rate),
                  f"{_ms(m.figures.pct(0.5))}/{_ms(m.figures.pct(0.99))}",
                  _num(m.figures.cpu_per_handshake_ms, "{:.2f}"), _num(m.rss_mb, "{:.1f}"),
                  _num(m.start_to_ready, "{:.3f}")] for m in models]
        parts.append(f"Concurrency models (client-unauth {plan.key_types[0]} {plan.groups[0]})\n" + _table(head, lines))
    if results.backends:
        head = ["workload", "concurrency"] + [f"{b} hs/s | p50/p99 ms" for b in plan.backends]
        cells: dict[tuple[str, int], dict[str, str]] = {}
        for b in results.backends:
            cells.setdefault((b.workload, b.concurrency), {})[b.backend] = (
                f"{_num(b.figures.rate)} | {_ms(b.figures.pct(0.5))}/{_ms(b.figures.pct(0.99))}")
        lines = [[w, str(c)] + [byb.get(name, "-") for name in plan.backends] for (w, c), byb in cells.items()]
        absent = "" if "tlslite" in plan.backends else "; tlslite: n/a, tlslite-ng is not installed"
        parts.append(f"hsd by backend, side by side ({plan.key_types[0]} x25519{absent})\n" + _table(head, lines))
    parts.append("Targets\n" + "\n".join(targets(rows, plan)))
    return "\n\n".join(parts) + "\n"


def targets(rows: list[Row], plan: Plan) -> list[str]:
    """Each target with the worst measured value and met/MISSED."""
    out = []
    measured = [row for row in rows if not row.not_possible]

    def line(name: str, worst: str, ok: bool | None) -> None:
        out.append(f"  [{'met' if ok else 'MISSED' if ok is not None else 'n/a'}] {name}: {worst}")

    ratios = [(row.hsd[c].rate / row.bare[c].rate, f"{row.label} c{c}") for row in measured for c in row.hsd
              if c in row.bare and row.bare[c].rate]
    if ratios:
        worst = min(ratios)
        line("hsd >= 0.9x bare at equal concurrency", f"worst {worst[0]:.2f} ({worst[1]})", worst[0] >= 0.9)
    c_ratios = [(max(f.rate for f in row.hsd.values()) / row.c_limit, row.label) for row in measured
                if row.c_limit and row.hsd]
    if c_ratios:
        worst = min(c_ratios)
        line("hsd >= 0.6x the C limit (best concurrency vs s_time)", f"worst {worst[0]:.2f} ({worst[1]})",
             worst[0] >= 0.6)
    added = [(row.hsd[1].pct(0.99) - row.bare[1].pct(0.99), row.label) for row in measured
             if 1 in row.hsd and 1 in row.bare]
    if added:
        worst = max(added)
        line("p99 added latency <= 2 ms at concurrency 1", f"worst {worst[0] * 1000:.2f} ms ({worst[1]})",
             worst[0] <= 0.002)
    bursts = [row for row in measured if row.burst]
    if bursts:
        all_ok = all(row.burst.ok == row.burst.count for row in bursts)  # type: ignore[union-attr]
        growth = max(row.burst.rss_growth_mb or 0 for row in bursts)  # type: ignore[union-attr]
        line(f"burst of {plan.burst}: all DONE status 0, RSS growth <= 100 MB",
             f"{'all status 0' if all_ok else 'FAILURES'}, max growth {growth:.1f} MB", all_ok and growth <= 100)
    for row in measured:
        if row.silent:
            base, loaded = row.silent
            change = abs(loaded / base - 1)
            line(f"{plan.silent} silent peers change the others' p50 by < 10%", f"{change * 100:.1f}%", change < 0.1)
    ready = [row.start_to_ready for row in measured if row.start_to_ready is not None]
    if ready:
        line("start to ready (group joined) <= 0.5 s", f"worst {max(ready):.3f} s", max(ready) <= 0.5)
    leaks = [row.label for row in measured if row.fds_after is not None and row.fds_before is not None
             and row.fds_after > row.fds_before]
    line("no fd left open in the daemon after the runs", ", ".join(leaks) or "none", not leaks)
    return out


def all_handshakes_ok(results: Results) -> bool:
    """Correctness of a run: every hsd and bare handshake (and every floor request) ended with status 0."""
    runs_everywhere = (list(results.floor.values()) + list(results.bare_floor.values())
                       + [m.figures for m in results.models] + [b.figures for b in results.backends])
    if any(f.ok != f.count for f in runs_everywhere):
        return False
    for row in results.rows:
        runs = list(row.hsd.values()) + list(row.bare.values()) + ([row.burst] if row.burst else [])
        if any(f.ok != f.count or set(f.statuses) - {0} for f in runs):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """`hsd bench [--quick] [--json FILE]`."""
    parser = argparse.ArgumentParser(prog="hsd bench")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI): p256, X25519, few handshakes")
    parser.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    parser.add_argument("--no-models", action="store_true", help="skip the concurrency-model comparison")
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--progress", action="store_true", help="say what is being measured, on stderr")


def run_cli(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan()
    if args.no_models:
        plan.models = False
    if args.workloads:
        plan.workloads = tuple(w.strip() for w in args.workloads.split(","))
        unknown = set(plan.workloads) - set(WORKLOADS)
        if unknown:
            print(f"hsd bench: unknown workload(s) {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    say = (lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True)) if args.progress else (lambda _: None)
    results = run_bench(plan, say)
    rows, models = results.rows, results.models
    print(report(results, plan), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"plan": {"counts": plan.counts, "burst": plan.burst},
                       "rows": [_row_json(row) for row in rows],
                       "floor": _floor_json(results.floor),
                       "bare_floor": _floor_json(results.bare_floor),
                       "models": [{"name": m.name, "processes": m.processes, "max_inflight": m.max_inflight,
                                   "concurrency": m.concurrency, "rate": m.figures.rate,
                                   "p50": m.figures.pct(0.5), "p99": m.figures.pct(0.99),
                                   "rss_mb": m.rss_mb} for m in models]}, handle, indent=1)
    return 0 if all_handshakes_ok(results) else 1


def _floor_json(floor: dict[int, RunFigures]) -> dict[int, dict[str, float | None]]:
    return {c: {"rate": f.rate, "p50": f.pct(0.5), "p99": f.pct(0.99), "cpu_ms": f.cpu_per_handshake_ms}
            for c, f in floor.items()}


def _row_json(row: Row) -> dict[str, Any]:
    def figs(f: RunFigures | None) -> dict[str, Any] | None:
        if f is None:
            return None
        return {"count": f.count, "ok": f.ok, "rate": f.rate, "p50": f.pct(0.5), "p99": f.pct(0.99),
                "cpu_ms": f.cpu_per_handshake_ms, "statuses": f.statuses, "rss_growth_mb": f.rss_growth_mb}

    return {"label": row.label, "not_possible": row.not_possible, "c_limit": row.c_limit, "c_note": row.c_note,
            "bare": {c: figs(f) for c, f in row.bare.items()}, "tlslite": figs(row.tlslite),
            "hsd": {c: figs(f) for c, f in row.hsd.items()}, "burst": figs(row.burst),
            "negotiated": row.negotiated, "start_to_ready": row.start_to_ready, "peak_rss_mb": row.peak_rss_mb,
            "fds": [row.fds_before, row.fds_after], "silent": row.silent}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_peer", "_bare"):
        sys.exit(_helper_main(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        sys.exit(_floor_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_bare_floor":
        sys.exit(_bare_floor_main(sys.argv[2:]))
    sys.exit(main())
