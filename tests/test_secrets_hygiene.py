"""Key material never reaches the logs, private key files are checked, secrets are wiped,
and the daemon keeps only CAP_NET_ADMIN.

Real handshakes (OpenSSL and tlslite backends against openssl s_server /
s_client) run with every debug knob turned up while all log output is captured;
the secrets each handshake produced are collected just before Session.wipe()
and the keys kTLS received are read back from the simulator, and none of them
may appear in the captured text in any common encoding.

The memory tests go further: a daemon process serves real handshakes through
the simulator, the peer's SSLKEYLOGFILE and the simulator's kTLS record say
what the secrets were, and the daemon's writable memory (/proc/self/mem,
dumped by the daemon itself) must then hold no copy of them: neither live
nor in freed heap blocks, where an unwiped `bytes` leaves its contents.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

import hsd_openssl
import hsd_tlslite
from hsd import privileges
from hsd import keyring
from hsd.config import Config
from hsd.daemon import serve
from hsd.ktls import tls13_crypto_info
from hsd.secret import Secret, wipe
from hsd.session import Session
from hsd_kit.simulator import Simulator
from hsd_kit.harness import DaemonHarness
from hsd_kit.soak import soak_config_text, soak_daemon
from hsd_kit.keyrings import ThrowawayKeyring
from hsd_kit.peers import PeerOptions, openssl_client, openssl_server
from hsd_kit.pki import TestPki, make_pki

WAIT = 20.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def loud_config(pki: TestPki, **kw) -> Config:
    config = Config(backend="openssl", loglevel=10, tls_debug=10, nl_debug=10, handshake_timeout_ms=10000, **kw)
    config.client.truststore = pki.ca
    config.client.certificate, config.client.private_key = pki.client.cert, pki.client.key
    config.server.truststore = pki.ca
    config.server.certificate, config.server.private_key = pki.server.chain, pki.server.key
    return config


class Capture(logging.Handler):
    """Every record from every logger, formatted with its traceback: what an operator could see."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def encodings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
            base64.urlsafe_b64encode(secret).decode().rstrip("="), secret.decode("latin-1"),
            repr(secret)[2:-1]]


class WipeObserver:
    """Wraps Session.wipe: copies the secrets just before, checks the buffers just after."""

    def __init__(self) -> None:
        self.before: list[bytes] = []
        self.zeroed: list[bool] = []
        self.lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = Session.wipe

        def wipe(session: Session) -> None:
            copies = [bytes(session.tx_secret), bytes(session.rx_secret)]
            original(session)
            with self.lock:
                self.before += copies
                self.zeroed.append(not any(session.tx_secret) and not any(session.rx_secret))

        monkeypatch.setattr(Session, "wipe", wipe)


def test_no_key_material_in_debug_logs(pki, monkeypatch):
    observer = WipeObserver()
    observer.install(monkeypatch)
    capture = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    installed: list[bytes] = []
    try:
        config = loud_config(pki, backends={"server.x509": "tlslite"})
        with Simulator() as sim:
            running = DaemonHarness(None, config, sim=sim, extra_plugins={"openssl": hsd_openssl, "tlslite": hsd_tlslite},
                                    discover=False).start()
            try:
                requests = []
                # client unauth and mutual TLS (OpenSSL backend) against s_server
                for auth in ("unauth", "x509"):
                    opts = PeerOptions(cert=pki.server.cert, key=pki.server.key, ca=pki.ca,
                                       request_client_cert=auth == "x509")
                    with openssl_server(opts).start() as server:
                        mine = socket.create_connection(server.address)
                        submit = sim.client_hello_x509 if auth == "x509" else sim.client_hello_anon
                        req = submit(mine, peername="localhost", timeout_ms=10000)
                        assert req.wait(WAIT)[0] == 0
                        requests.append(req)
                        mine.close()
                # server x509 (tlslite backend) against s_client presenting a client certificate
                with socket.create_server(("127.0.0.1", 0)) as listener, \
                        openssl_client(PeerOptions(ca=pki.ca, cert=pki.client.cert, key=pki.client.key),
                                       listener.getsockname()[1]).start():
                    listener.settimeout(WAIT)
                    conn, _ = listener.accept()
                    req = sim.server_hello_x509(conn, timeout_ms=10000)
                    assert req.wait(WAIT)[0] == 0
                    requests.append(req)
                    conn.close()
            finally:
                running.stop()
        for req in requests:
            for info in (req.ktls_tx, req.ktls_rx):
                assert info is not None
                installed += [info.key, info.iv, info.salt, info.salt + info.iv]
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    text = "\n".join(capture.lines)
    assert len(observer.before) == 6 and all(len(s) >= 32 and any(s) for s in observer.before)
    # [debug] tls=10 and nl=10 really traced: handshake messages and parameters from both backends, netlink
    for wanted in ("client: -> ClientHello", "client: <- CertificateVerify (", "server: <- ClientHello",
                   "server: -> CertificateVerify (", "server: <- Certificate (", "client: negotiated version",
                   "server: negotiated version", "nl: ACCEPT reply:", "AUTH_MODE(5)=3 (X509)", "nl: DONE:", "STATUS(1)=0"):
        assert any(wanted in line for line in capture.lines), f"no trace line with {wanted!r}"
    assert any("DONE" in line for line in capture.lines)
    for secret in observer.before + [k for k in installed if len(k) >= 8]:
        for form in encodings(secret):
            assert form not in text, "key material found in the logs"
    # (c) Session.wipe() really zeroed the very buffers the backend filled
    assert observer.zeroed == [True, True, True]
    print(f"\nhygiene: {len(capture.lines)} log lines checked against {len(observer.before)} traffic secrets "
          f"and {len(installed)} installed key/IV values")


def test_group_readable_key_warns_and_strict_mode_refuses(pki, tmp_path, caplog):
    key = tmp_path / "server-open.key"
    shutil.copy(pki.server.key, key)
    os.chmod(key, 0o640)
    for strict in (False, True):
        config = loud_config(pki, strict_permissions=strict)
        config.server.private_key = str(key)
        with Simulator() as sim:
            running = DaemonHarness(None, config, sim=sim, extra_plugins={"openssl": hsd_openssl}, discover=False).start()
            try:
                with socket.create_server(("127.0.0.1", 0)) as listener, \
                        openssl_client(PeerOptions(ca=pki.ca), listener.getsockname()[1]).start():
                    listener.settimeout(WAIT)
                    conn, _ = listener.accept()
                    status = sim.server_hello_x509(conn, timeout_ms=10000).wait(WAIT)[0]
                    conn.close()
            finally:
                running.stop()
        if strict:
            assert status == errno.EIO
            assert str(key) in running.outcomes[0].reason and "strict_permissions" in running.outcomes[0].reason
        else:
            assert status == 0
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(str(key) in w and "group" in w and "0640" in w for w in warnings), warnings


def test_strict_mode_refuses_to_start_with_an_open_key(pki, tmp_path, caplog):
    key = tmp_path / "client-open.key"
    shutil.copy(pki.client.key, key)
    os.chmod(key, 0o604)
    config = loud_config(pki, strict_permissions=True)
    config.client.private_key = str(key)
    with Simulator() as sim:
        code = serve(sim.channel(), config, backend="openssl", config_path=None, drop_capabilities=False)
    assert code == 2  # a configuration error (hsd(8) EXIT STATUS), as hsd check reports it
    assert f"{key}: private key file is accessible by others" in caplog.text


def test_config_reads_strict_permissions():
    from hsd.config import parse

    assert parse("[hsd]\nstrict_permissions=true\n").strict_permissions is True
    assert parse("[hsd]\n").strict_permissions is False


# ---------------------------------------------------------------- capabilities

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs root (CI runs as root)")
NET_ADMIN_ONLY = 1 << privileges.CAP_NET_ADMIN


@root_only
def test_drop_leaves_only_cap_net_admin_in_a_child():
    script = textwrap.dedent("""
        from hsd import privileges
        before = privileges.capability_sets()
        assert before["CapEff"] & ~(1 << 12), "the child must start with more than CAP_NET_ADMIN"
        privileges.drop_all_but()
        print(open("/proc/self/status").read())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    sets = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if ":" in line}
    assert int(sets["CapEff"], 16) == NET_ADMIN_ONLY
    assert int(sets["CapPrm"], 16) == NET_ADMIN_ONLY
    assert int(sets["CapBnd"], 16) == NET_ADMIN_ONLY
    assert int(sets["CapInh"], 16) == 0 and int(sets["CapAmb"], 16) == 0
    assert sets["NoNewPrivs"] == "1"


@root_only
def test_drop_succeeds_when_the_service_manager_already_restricted_us():
    """Under CapabilityBoundingSet=CAP_NET_ADMIN (the shipped unit) CAP_SETPCAP is gone: still fine."""
    script = textwrap.dedent("""
        from hsd import privileges
        privileges.drop_all_but()  # now like a process systemd started with the shipped unit
        assert privileges.drop_privileges() is True
        print(hex(privileges.capability_sets()["CapEff"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [hex(NET_ADMIN_ONLY)]


@root_only
def test_serving_daemon_runs_with_cap_net_admin_only(tmp_path):
    """serve() drops before starting handshake threads: every thread of the daemon, handshakes included."""
    config_path = tmp_path / "hsd.conf"
    config_path.write_text(soak_config_text(None))
    log_path = tmp_path / "daemon.log"
    with Simulator() as sim:
        daemon = soak_daemon(sim, str(config_path), str(log_path), verbose=True)
        try:
            end = time.monotonic() + WAIT
            while not sim.listeners():
                assert daemon.proc.poll() is None and time.monotonic() < end, log_path.read_text()
                time.sleep(0.02)
            from hsd_kit.soak import tcp_pair

            pairs = [tcp_pair() for _ in range(3)]
            reqs = [sim.client_hello_anon(a, peername="ok.test", timeout_ms=5000) for a, _ in pairs]
            assert [r.wait(WAIT)[0] for r in reqs] == [0, 0, 0]  # handshake threads now exist
            tasks = os.listdir(f"/proc/{daemon.proc.pid}/task")
            assert len(tasks) > 1
            for tid in tasks:
                sets = privileges.capability_sets(f"/proc/{daemon.proc.pid}/task/{tid}/status")
                assert sets["CapEff"] == NET_ADMIN_ONLY and sets["CapBnd"] == NET_ADMIN_ONLY, (tid, sets)
            for a, b in pairs:
                a.close(); b.close()
        finally:
            assert daemon.stop() == 0
    log = log_path.read_text()
    assert "dropped all capabilities except CAP_NET_ADMIN" in log, log
    assert "keep wider capabilities" not in log


# ---------------------------------------------------------------- secrets in the daemon's memory

# The daemon under test: a Dispatcher over a SimChannel (the simulator lives in the test process), with
# both TLS backends.  Each stdin line is a command; after it the daemon writes its writable mappings to
# stdout, read with os.preadv into one preallocated buffer so the dump itself copies nothing new.
MEMORY_DAEMON = textwrap.dedent("""
    import gc, json, os, struct, sys, threading
    import hsd_openssl, hsd_tlslite
    from hsd import keyring
    from hsd.config import Config
    from hsd.dispatcher import Dispatcher
    from hsd.plugins import PluginHost
    from hsd.secret import fromhex_into, wipe
    from hsd.sim_channel import SimChannel

    args = json.loads(sys.argv[2])
    canary = fromhex_into(args["canary"].encode())  # kept alive: proves the dump sees live heap data
    config = Config(backend=args["backend"], isolation=args["isolation"], handshake_timeout_ms=10000)
    config.client.truststore = config.server.truststore = args["ca"]
    config.client.certificate, config.client.private_key = args["client"]
    config.server.certificate, config.server.private_key = args["server"]
    host = PluginHost(config)
    host.add("openssl", hsd_openssl)
    host.add("tlslite", hsd_tlslite)
    dispatcher = Dispatcher(SimChannel.connect(sys.argv[1]), host, config)
    threading.Thread(target=dispatcher.run, args=(threading.Event(),), daemon=True).start()

    FRAME = struct.Struct("<QB")
    chunk = bytearray(1 << 20)
    maps = bytearray(1 << 20)
    out = sys.stdout.buffer
    def dump():
        # Nothing here may malloc a large block (it could land on, and overwrite, a freed copy of a
        # secret): /proc/self/maps is read into a preallocated buffer and parsed in place.
        gc.collect()
        fd = os.open("/proc/self/maps", os.O_RDONLY)
        try:
            size = os.readv(fd, [maps])
            while size < len(maps):
                step = os.readv(fd, [memoryview(maps)[size:]])
                if not step:
                    break
                size += step
        finally:
            os.close(fd)
        mem = os.open("/proc/self/mem", os.O_RDONLY)
        try:
            pos = 0
            while pos < size:
                eol = maps.find(b"\\n", pos, size)
                eol = size if eol < 0 else eol
                dash, space = maps.find(b"-", pos, eol), maps.find(b" ", pos, eol)
                writable = maps[space + 1] == 0x72 and maps[space + 2] == 0x77  # "rw"
                special = maps.find(b"[v", space, eol) >= 0  # [vvar], [vdso], [vsyscall]
                start, end = int(maps[pos:dash], 16), int(maps[dash + 1:space], 16)
                pos = eol + 1
                if not writable or special:
                    continue
                first = 1
                while start < end:
                    want = min(len(chunk), end - start)
                    try:
                        got = os.preadv(mem, [memoryview(chunk)[:want]], start)
                    except OSError:
                        break
                    if got <= 0:
                        break
                    out.write(FRAME.pack(got, first))
                    out.write(memoryview(chunk)[:got])
                    first, start = 0, start + got
        finally:
            os.close(mem)
        out.write(FRAME.pack(0, 1))
        out.flush()
    for line in sys.stdin:
        command = line.split()
        if command[0] == "readkey":  # what the PSK and keyring-certificate paths do with a payload
            payload = keyring.read_key(int(command[1]))
            wipe(payload)
            del payload
        dump()
""")
DUMP_FRAME = struct.Struct("<QB")


class DaemonMemory:
    """The daemon process above, and the writable memory it reports."""

    def __init__(self, sim: Simulator, pki: TestPki, backend: str, isolation: str, canary: bytes) -> None:
        args = {"backend": backend, "isolation": isolation, "ca": pki.ca, "canary": canary.hex(),
                "client": [pki.client.cert, pki.client.key], "server": [pki.server.chain, pki.server.key]}
        self.proc = subprocess.Popen([sys.executable, "-c", MEMORY_DAEMON, sim.address, json.dumps(args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        end = time.monotonic() + WAIT
        while not sim.listeners():
            assert self.proc.poll() is None and time.monotonic() < end, "the memory daemon did not start"
            time.sleep(0.02)

    def regions(self, command: str = "dump") -> list[bytes]:
        """Every writable mapping of the daemon, after `command` and a gc.collect() there."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        regions: list[bytearray] = []
        while True:
            size, first = DUMP_FRAME.unpack(self.proc.stdout.read(DUMP_FRAME.size))
            if size == 0:
                return [bytes(region) for region in regions]
            data = self.proc.stdout.read(size)
            if first:
                regions.append(bytearray())
            regions[-1] += data

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def memory_daemon(pki: TestPki, request: pytest.FixtureRequest) -> Iterator[tuple]:
    """(simulator, daemon, canary, library copies allowed) for request.param = (backend, isolation)."""
    backend, isolation = request.param
    canary = os.urandom(32)
    with Simulator() as sim:
        daemon = DaemonMemory(sim, pki, backend, isolation, canary)
        try:
            allowed = dict(OPENSSL_SSL_OBJECT) if request.param == ("openssl", "none") else {}
            if isolation == "none" and not hasattr(HKDFExpand, "derive_into"):
                allowed.update(HKDF_BYTES)
            yield sim, daemon, canary, allowed
        finally:
            daemon.close()


def copies(regions: list[bytes], needle: bytes) -> int:
    return sum(region.count(needle) for region in regions)


KEYLOG_LABELS = ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")


def keylog_secrets(path: str, wait: float = 10.0) -> dict[str, bytes]:
    """label -> secret from an NSS key log file the peer wrote.

    Read while the peer still runs: OpenSSL's server logs CLIENT_TRAFFIC_SECRET_0 only once it has
    read the client's Finished, which may be after hsd's DONE (hsd's client is done when it has sent
    that Finished).  So this reads until both application secrets are there, for up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        with open(path) as handle:
            fields = [line.split() for line in handle if not line.startswith("#")]
        secrets = {f[0]: bytes.fromhex(f[2]) for f in fields if len(f) == 3 and line_complete(f[2])}
        if all(label in secrets for label in KEYLOG_LABELS) or time.monotonic() > deadline:
            return secrets
        time.sleep(0.02)


def line_complete(hex_secret: str) -> bool:
    """A secret cut mid-write has an odd or short length; TLS 1.3 secrets are 32 or 48 bytes."""
    return len(hex_secret) in (64, 96)


def secret_needles(keylog: dict[str, bytes], req, suite_hint: str) -> dict[str, bytes]:
    """What must not stay in the daemon: both application traffic secrets (raw and as keylog hex), and
    the key and write IV kTLS got for each direction - checked to derive from those very secrets."""
    client, server = keylog["CLIENT_TRAFFIC_SECRET_0"], keylog["SERVER_TRAFFIC_SECRET_0"]
    needles = {"client traffic secret": client, "server traffic secret": server,
               "client traffic secret (hex)": client.hex().encode(),
               "server traffic secret (hex)": server.hex().encode()}
    installed = {"tx": req.ktls_tx, "rx": req.ktls_rx}
    ours, theirs = (client, server) if suite_hint == "client" else (server, client)
    for direction, secret in (("tx", ours), ("rx", theirs)):
        info = installed[direction]
        assert info is not None, f"kTLS {direction} was never installed"
        derived = tls13_crypto_info("TLS_AES_256_GCM_SHA384" if len(secret) == 48 else "TLS_AES_128_GCM_SHA256",
                                    secret, 0)
        assert bytes(info.key) == bytes(derived.key), f"the keylog's secret is not the one kTLS {direction} got"
        needles[f"kTLS {direction} key"] = bytes(info.key)
        needles[f"kTLS {direction} write IV"] = bytes(info.salt + info.iv)
    return needles


def assert_no_copies(daemon: DaemonMemory, canary: bytes, needles: dict[str, bytes], when: str,
                     library_copies: dict[str, int]) -> None:
    """No copy of any needle, except at most the documented library_copies (docs/secrets.md)."""
    regions = daemon.regions()
    assert copies(regions, canary) >= 1, "the memory dump does not see the daemon's heap"
    found = {name: n for name, n in ((name, copies(regions, needle)) for name, needle in needles.items()) if n}
    excess = {name: n for name, n in found.items() if n > library_copies.get(name, 0)}
    assert not excess, f"{when}: copies of secrets left in the daemon's memory: {found}"
    print(f"\nmemory {when}: {sum(map(len, regions)) >> 20} MiB scanned, {len(needles)} secret values, "
          f"copies found: {found or 'none'}")


KEY_POS_ALL, KEY_USR_VIEW, KEY_USR_READ = 0x3F000000, 0x00010000, 0x00020000
# OpenSSL keeps the TLS 1.3 secrets in fixed arrays of its SSL object and does not cleanse them when
# the object is freed: in-process (isolation=none) one copy of each application traffic secret can
# remain in freed heap until malloc reuses it.  Nothing reaches it; isolation=process leaves none.
OPENSSL_SSL_OBJECT = {"client traffic secret": 1, "server traffic secret": 1}
# docs/secrets.md, "cryptography without derive_into" (before 47; Debian trixie's 43): HKDFExpand.derive
# returns each kTLS key and IV as an immutable bytes first, freed, not wiped.  One copy each at most,
# and only in a daemon without process isolation (the child that derived them has exited).
HKDF_BYTES = {f"kTLS {direction} {what}": 1 for direction in ("tx", "rx") for what in ("key", "write IV")}
BACKENDS_AND_ISOLATION = [("openssl", "none"), ("tlslite", "none"), ("openssl", "process"), ("tlslite", "process")]


@pytest.mark.parametrize("memory_daemon", BACKENDS_AND_ISOLATION, indirect=True,
                         ids=[f"{b}-isolation_{i}" for b, i in BACKENDS_AND_ISOLATION])
def test_no_copy_of_traffic_secrets_or_ktls_keys_stays_in_daemon_memory(memory_daemon, pki, tmp_path):
    """After each real handshake (hsd client vs s_server, hsd server vs s_client with a client certificate),
    the secrets exist in the peer and the kernel only: the daemon's own memory holds not one copy
    (beyond the one library copy documented above)."""
    sim, daemon, canary, library_copies = memory_daemon
    server_log = str(tmp_path / "s_server.keys")
    opts = PeerOptions(cert=pki.server.cert, key=pki.server.key, ca=pki.ca, extra=["-keylogfile", server_log])
    with openssl_server(opts).start() as server:
        mine = socket.create_connection(server.address)
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
        assert req.wait(WAIT)[0] == 0
        server_secrets = keylog_secrets(server_log)  # while s_server runs: it may log its last line after our DONE
        mine.close()
    assert_no_copies(daemon, canary, secret_needles(server_secrets, req, "client"), "after a client",
                     library_copies)

    client_log = str(tmp_path / "s_client.keys")
    opts = PeerOptions(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, extra=["-keylogfile", client_log])
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            openssl_client(opts, listener.getsockname()[1]).start():
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        req = sim.server_hello_x509(conn, timeout_ms=10000)
        assert req.wait(WAIT)[0] == 0
        client_secrets = keylog_secrets(client_log)
        conn.close()
    assert req.remote_auth, "the client certificate was not reported: not the mutual-TLS path"
    needles = secret_needles(client_secrets, req, "server")
    with open(pki.server.key, "rb") as handle:  # the key file's text: read per handshake, then zeroed
        needles.update({f"server key file line {i}": line.strip()
                        for i, line in enumerate(handle) if len(line.strip()) == 64})
    assert_no_copies(daemon, canary, needles, "after a server", library_copies)


@pytest.mark.parametrize("memory_daemon", [("openssl", "none")], indirect=True)
def test_a_keyring_payload_read_and_wiped_leaves_no_copy(memory_daemon):
    """read_key moves the payload from a zeroed ctypes buffer into the caller's bytearray, nothing else."""
    _, daemon, canary, _ = memory_daemon
    secret = os.urandom(4096)  # a certificate-sized payload: malloc'd, so a freed copy keeps its bytes
    with ThrowawayKeyring() as ring:
        serial = ring.add("hsd-test:memory", secret)
        keyring.set_perm(serial, KEY_POS_ALL | KEY_USR_VIEW | KEY_USR_READ)  # the daemon (same uid) may read it
        regions = daemon.regions(f"readkey {serial}")
    assert copies(regions, canary) >= 1
    # any 64 bytes of it: a freed block's first bytes are overwritten by the allocator's own pointers
    assert [copies(regions, secret[i:i + 64]) for i in range(0, len(secret), 512)] == [0] * 8


# ---------------------------------------------------------------- hsd.secret


def test_wipe_zeroes_every_mutable_buffer_and_refuses_the_rest_quietly():
    import ctypes

    array = bytearray(b"k" * 16)
    view = memoryview(bytearray(b"v" * 16))[4:12]
    cbuf = ctypes.create_string_buffer(b"c" * 16)
    assert wipe(array) and wipe(view) and wipe(cbuf)
    assert array == bytearray(16) and bytes(view) == bytes(8) and view.obj[:4] == b"vvvv" and cbuf.raw == bytes(17)
    for unwipeable in (b"immutable", "text", None, 7, memoryview(b"read-only")):
        assert wipe(unwipeable) is False
    # in place: the very memory that held the secret is zeroed, not a new buffer swapped in
    for size in (1, 48, 4096):
        secret = bytearray(os.urandom(size).replace(b"\0", b"x"))
        memory = (ctypes.c_char * size).from_buffer(secret)
        address = ctypes.addressof(memory)
        assert wipe(secret) and ctypes.string_at(address, size) == bytes(size) and secret == bytearray(size)
        del memory


def test_secret_never_shows_its_bytes_and_is_zeroed_on_exit():
    raw = os.urandom(32)
    with Secret(raw) as secret:
        held = secret.buffer
        text = repr(secret) + str(secret) + f"{secret}"
        assert raw.hex() not in text and repr(raw) not in text and text.startswith("Secret(32 bytes)")
        with pytest.raises(TypeError):
            import pickle

            pickle.dumps(secret)
    assert held == bytearray(32)


def test_pem_private_keys_are_decoded_into_wipeable_der_in_every_format(tmp_path):
    """PKCS#8, traditional RSA and an EC key after its parameters block all load through our own decode;
    encrypted keys still reach cryptography's PEM loader and are refused with its reason."""
    from hsd.credentials import parse_private_key, pem_private_key_der
    from hsd.errors import CredentialError

    commands = {"pkcs8": "openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:P-256",
                "traditional": "openssl genrsa -traditional 2048",
                "ecparam": "openssl ecparam -name prime256v1 -genkey",
                "encrypted": "openssl genpkey -algorithm ed25519 -aes256 -pass pass:x"}
    for name, command in commands.items():
        pem = subprocess.run(command.split(), capture_output=True, check=True).stdout
        der = pem_private_key_der(pem)
        if name == "encrypted":
            assert der is None
            with pytest.raises(CredentialError, match="encrypted"):
                parse_private_key(pem, name)
            continue
        assert isinstance(der, bytearray) and der[0] == 0x30  # a DER SEQUENCE
        assert parse_private_key(bytearray(pem), name).private_numbers() is not None
