"""The daemon as a service: readiness to systemd, SIGHUP reload, SIGTERM drain.

The real `hsd` runs as a subprocess against the kernel simulator of this test,
which plays the kernel consumer; hsd is the TLS client towards real or scripted
peers on loopback.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsd_kit.processes import DaemonProcesses
from hsd_kit.simulator import Simulator
from hsd_kit import peers
from hsd_kit.pki import TestPki


def write_config(path: Path, truststore: str) -> str:
    path.write_text(f"[authenticate.client]\nx509.truststore={truststore}\n[hsd]\nbackend=openssl\n")
    return str(path)


class Daemon(DaemonProcesses):
    """`hsd -c CONF -s` as installed, against the simulator: joined first (requests queue from
    then on), then ready once loaded, hardened and serving (its "hsd ready:" line)."""

    def __init__(self, sim: Simulator, config: str, log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(sim, ["hsd.cli", "-c", config, "-s"], log_path=str(log), env=env)
        self.wait_logged("hsd ready:")


@pytest.fixture
def sim():
    with Simulator() as simulator:
        yield simulator


def wait_accepted(req, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not req.accepted:
        assert time.monotonic() < deadline, "the daemon never accepted the request"
        time.sleep(0.02)


def test_ready_is_notified_to_systemd_once_joined(sim, tmp_path, hsd_pki: TestPki):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    daemon = Daemon(sim, write_config(tmp_path / "hsd.conf", hsd_pki.ca), tmp_path / "hsd.log",
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert notify.recv(4096) == b"READY=1"
        assert sim.listeners() >= 1  # ready means joined: a request can be submitted now
    finally:
        assert daemon.stop() == 0
        notes = []
        while not notes or notes[-1] != b"STOPPING=1":
            notes.append(notify.recv(4096))
        assert all(note.startswith(b"STATUS=served ") for note in notes[:-1]), notes  # hsd.status's line only
        notify.close()


def test_sigterm_finishes_in_flight_handshakes_each_with_its_done(sim, tmp_path, hsd_pki: TestPki):
    daemon = Daemon(sim, write_config(tmp_path / "hsd.conf", hsd_pki.ca), tmp_path / "hsd.log")
    with peers.silent_peer() as silent:
        sock = silent.connect()
        req = sim.client_hello_anon(sock, peername="localhost", timeout_ms=2000)
        wait_accepted(req)
        daemon.proc.send_signal(signal.SIGTERM)
        assert req.wait(15) == (errno.ETIMEDOUT, 0)  # answered at its deadline, not abandoned
        assert req.done_calls == 1
        assert daemon.proc.wait(30) == 0
        sock.close()
    assert "finishing in-flight handshakes" in daemon.text()
    assert "Traceback" not in daemon.text()


def test_sighup_reloads_for_new_requests_without_disturbing_in_flight(sim, tmp_path, hsd_pki: TestPki):
    config = tmp_path / "hsd.conf"
    daemon = Daemon(sim, write_config(config, hsd_pki.other_ca), tmp_path / "hsd.log")
    opts = peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key, ca=hsd_pki.ca)
    server = peers.openssl_server(opts).start()  # each s_server here serves one connection
    try:
        first = server.connect()
        assert sim.client_hello_anon(first, peername="localhost", timeout_ms=5000).wait(15)[0] == errno.EACCES
        first.close()
        server.stop()
        server = peers.openssl_server(opts).start()

        with peers.silent_peer() as silent:
            stalled_sock = silent.connect()
            stalled = sim.client_hello_anon(stalled_sock, peername="localhost", timeout_ms=3000)
            wait_accepted(stalled)
            write_config(config, hsd_pki.ca)  # now trust the right CA
            daemon.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while "configuration reloaded" not in daemon.text():
                assert time.monotonic() < deadline, daemon.text()
                time.sleep(0.05)
            second = server.connect()
            assert sim.client_hello_anon(second, peername="localhost", timeout_ms=5000).wait(15)[0] == 0
            assert stalled.wait(15) == (errno.ETIMEDOUT, 0)  # the reload did not cut it short
            assert stalled.done_calls == 1
            stalled_sock.close()
        second.close()
    finally:
        server.stop()
        assert daemon.stop() == 0
    assert daemon.proc.returncode == 0


def test_a_reload_with_a_broken_config_keeps_the_running_one(sim, tmp_path, hsd_pki: TestPki):
    config = tmp_path / "hsd.conf"
    daemon = Daemon(sim, write_config(config, hsd_pki.ca), tmp_path / "hsd.log")
    server = peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key,
                                                    ca=hsd_pki.ca)).start()
    try:
        config.write_text("[hsd]\nmax_inflight=lots\n")
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload failed" not in daemon.text():
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.05)
        assert "hsd.conf:2" in daemon.text()  # the message names file and line
        sock = server.connect()
        assert sim.client_hello_anon(sock, peername="localhost", timeout_ms=5000).wait(15)[0] == 0
        sock.close()
    finally:
        server.stop()
        assert daemon.stop() == 0


def test_a_reload_whose_key_does_not_match_keeps_the_running_config(sim, tmp_path, hsd_pki: TestPki):
    """A reload is judged like a start (hsd.check.inspect): a key that is not the certificate's is refused
    in words naming both files, and requests go on with the running configuration."""
    config = tmp_path / "hsd.conf"
    daemon = Daemon(sim, write_config(config, hsd_pki.ca), tmp_path / "hsd.log")
    server = peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key,
                                                    ca=hsd_pki.ca)).start()
    try:
        config.write_text(f"[authenticate.client]\nx509.truststore={hsd_pki.other_ca}\n"
                          f"[authenticate.server]\nx509.certificate={hsd_pki.server.cert}\n"
                          f"x509.private_key={hsd_pki.client.key}\n")
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload failed" not in daemon.text():
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.05)
        assert f"{hsd_pki.client.key} is not the private key of" in daemon.text()
        assert "configuration reloaded" not in daemon.text()
        sock = server.connect()  # still trusting hsd_pki.ca: the new file (other_ca) was not taken
        assert sim.client_hello_anon(sock, peername="localhost", timeout_ms=5000).wait(15)[0] == 0
        sock.close()
    finally:
        server.stop()
        assert daemon.stop() == 0


def core_file_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) RLIMIT_CORE of a running process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max core file size"):
                soft, hard = line.split()[4:6]
                return soft, hard
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def memory_readable_without_ptrace_capability(pid: int) -> bool:
    """Can a root process without CAP_SYS_PTRACE (so: the kernel's dumpable check applies) open /proc/PID/mem?"""
    probe = subprocess.run([shutil.which("setpriv") or "setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-all",
                            sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb').close()"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0 or "PermissionError" in probe.stderr, probe.stderr
    return probe.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the probe runs as root minus CAP_SYS_PTRACE (CI runs as root)")
def test_a_running_daemon_cannot_dump_core_nor_be_read_by_a_same_uid_process(sim, tmp_path, hsd_pki: TestPki):
    """Its memory holds private keys and traffic secrets: no core file, no /proc/PID/mem for others.

    A control process with the daemon's uid and capability set, but dumpable,
    is readable by the same probe: the difference is hsd's PR_SET_DUMPABLE 0."""
    daemon = Daemon(sim, write_config(tmp_path / "hsd.conf", hsd_pki.ca), tmp_path / "hsd.log")
    control = subprocess.Popen([shutil.which("setpriv") or "setpriv", "--bounding-set=-all,+net_admin", "sleep", "60"])
    try:
        assert core_file_limit(daemon.proc.pid) == ("0", "0"), "RLIMIT_CORE must be 0, the hard limit too"
        deadline = time.monotonic() + 10
        while open(f"/proc/{control.pid}/comm").read().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert memory_readable_without_ptrace_capability(control.pid), "the probe cannot even read a dumpable process"
        assert not memory_readable_without_ptrace_capability(daemon.proc.pid), "hsd's memory is readable"
    finally:
        control.kill()
        control.wait()
        assert daemon.stop() == 0
