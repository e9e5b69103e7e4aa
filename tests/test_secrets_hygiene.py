"""Key material never reaches the logs, private key files are checked, secrets are wiped,
and the daemon keeps only CAP_NET_ADMIN.

Real handshakes (OpenSSL and tlslite backends against openssl s_server /
s_client) run with every debug knob turned up while all log output is captured;
the secrets each handshake produced are collected just before Session.wipe()
and the keys kTLS received are read back from the simulator, and none of them
may appear in the captured text in any common encoding.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import hsd_openssl
import hsd_tlslite
from hsd import privileges
from hsd.config import Config
from hsd.daemon import serve
from hsd.session import Session
from hsd.simulator import Simulator
from hsd.soak import DaemonProcess, RunningDaemon, soak_config_text
from hsd.testing.peers import PeerOptions, openssl_client, openssl_server
from hsd.testing.pki import TestPki, make_pki

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
            running = RunningDaemon(sim, config, {"openssl": hsd_openssl, "tlslite": hsd_tlslite})
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
                running.close()
        for req in requests:
            for info in (req.ktls_tx, req.ktls_rx):
                assert info is not None
                installed += [info.key, info.iv, info.salt, info.salt + info.iv]
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    text = "\n".join(capture.lines)
    assert len(observer.before) == 6 and all(len(s) >= 32 and any(s) for s in observer.before)
    assert any("openssl client:" in line for line in capture.lines), "tls debug tracing was not on"
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
            running = RunningDaemon(sim, config, {"openssl": hsd_openssl})
            try:
                with socket.create_server(("127.0.0.1", 0)) as listener, \
                        openssl_client(PeerOptions(ca=pki.ca), listener.getsockname()[1]).start():
                    listener.settimeout(WAIT)
                    conn, _ = listener.accept()
                    status = sim.server_hello_x509(conn, timeout_ms=10000).wait(WAIT)[0]
                    conn.close()
            finally:
                running.close()
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
    assert code == 1
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
        daemon = DaemonProcess(sim.address, str(config_path), str(log_path), verbose=True)
        try:
            end = time.monotonic() + WAIT
            while not sim.listeners():
                assert daemon.proc.poll() is None and time.monotonic() < end, log_path.read_text()
                time.sleep(0.02)
            from hsd.soak import tcp_pair

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
