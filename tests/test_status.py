"""Live status (issue 15 point 4): sd_notify STATUS= as handshakes end, and `hsd status` on a root-only socket.

The real daemon against the simulator, real peers (openssl s_server for a success, a scripted peer
that closes for a failure), a real NOTIFY_SOCKET, and `hsd status` run as root and as nobody.
"""

from __future__ import annotations

import json
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


def hsd(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
    return subprocess.run([*prefix, sys.executable, "-m", "hsd.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def running(tmp_path: Path, hsd_pki: TestPki):
    control = tmp_path / "run" / "control"
    config = tmp_path / "hsd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={hsd_pki.ca}\n"
                      f"[hsd]\nbackend=openssl\ncontrol_socket={control}\n")
    log = tmp_path / "hsd.log"
    with Simulator() as sim:
        daemon = DaemonProcesses(sim, ["hsd.cli", "-c", str(config), "-s"], log_path=str(log),
                                 notify_socket=str(tmp_path / "notify"))  # returns at READY=1
        try:
            yield sim, config, control, daemon.notify, log
        finally:
            assert daemon.stop() == 0, log.read_text()
    assert not control.exists(), "the control socket outlived the daemon"


def one_success_one_failure(sim: Simulator, hsd_pki: TestPki) -> None:
    server = peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key,
                                                    ca=hsd_pki.ca)).start()
    try:
        sock = server.connect()
        assert sim.client_hello_anon(sock, peername="localhost", timeout_ms=10000).wait(20)[0] == 0
        sock.close()
    finally:
        server.stop()
    with peers.closing_peer() as closing:
        sock = closing.connect()
        assert sim.client_hello_anon(sock, peername="localhost", timeout_ms=10000).wait(20)[0] != 0
        sock.close()


def test_systemd_status_line_follows_the_handshakes(running, hsd_pki: TestPki) -> None:
    sim, _config, _control, notify, log = running
    first = notify.recv(4096).decode()
    assert first == "STATUS=served 0, failed 0, in flight 0", first
    one_success_one_failure(sim, hsd_pki)
    deadline = time.monotonic() + 15
    seen = []
    while not any(line.startswith("STATUS=served 1, failed 1, in flight 0; last failure ") for line in seen):
        assert time.monotonic() < deadline, (seen, log.read_text())
        seen.append(notify.recv(4096).decode())
    assert "client/unauth " in seen[-1] and "\n" not in seen[-1]


def test_hsd_status_reports_counters_latency_config_and_expiry(running, hsd_pki: TestPki) -> None:
    sim, config, control, _notify, _log = running
    one_success_one_failure(sim, hsd_pki)
    deadline = time.monotonic() + 15
    while True:
        result = hsd("status", "-c", str(config), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        if doc["served"] + doc["failed"] == 2:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)
    assert (doc["served"], doc["failed"], doc["in_flight"]) == (1, 1, 0)
    rows = {(row["mode"], row["backend"], row["status"]): row["count"] for row in doc["counts"]}
    assert rows[("client/unauth", "openssl", "ok")] == 1 and sum(rows.values()) == 2, rows
    assert doc["latency"]["samples"] == 2 and 0 < doc["latency"]["p50_ms"] <= doc["latency"]["max_ms"]
    assert doc["config"]["source"] == str(config) and doc["config"]["backend"] == "openssl"
    [ca] = doc["files"]
    assert ca["key"] == "[authenticate.client] x509.truststore" and ca["path"] == hsd_pki.ca
    assert 0 < ca["days"] < 3650 and not ca["expired"] and ca["what"].startswith("CA ")
    text = hsd("status", "--socket", str(control))
    assert text.returncode == 0, text.stderr
    assert "served 1, failed 1, in flight 0" in text.stdout
    assert "client/unauth  openssl    ok           1" in text.stdout
    assert f"{hsd_pki.ca}: CA " in text.stdout and "days left)" in text.stdout
    assert "last failure: " in text.stdout and "p50 " in text.stdout
    secret = Path(hsd_pki.server.key).read_text()
    assert secret.splitlines()[1] not in result.stdout + text.stdout


def test_only_root_can_read_the_status(running) -> None:
    _sim, _config, control, _notify, _log = running
    assert control.stat().st_mode & 0o777 == 0o600 and control.parent.stat().st_mode & 0o777 == 0o700
    denied = hsd("status", "--socket", str(control), user="nobody")
    assert denied.returncode == 1 and "Traceback" not in denied.stderr
    assert denied.stderr.strip() == f"hsd: only root can read hsd's status ({control})"


def test_status_without_a_running_daemon_is_one_line(tmp_path: Path) -> None:
    result = hsd("status", "--socket", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"hsd: hsd is not running here: nothing answers at {tmp_path / 'nothing'}"


def test_control_socket_must_be_absolute_or_none(tmp_path: Path) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text("[hsd]\ncontrol_socket=run/control\n")
    result = hsd("check", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"hsd: {config}:2: control_socket must be an absolute path or 'none', "
                                     "got 'run/control'")
    config.write_text("[hsd]\ncontrol_socket=none\n")
    assert "control_socket=none" in hsd("check", "-c", str(config)).stdout


def test_control_socket_option_overrides_the_config(tmp_path: Path, hsd_pki: TestPki) -> None:
    """hsd@.service gives each namespace's instance its own socket with --control-socket, whatever its
    config file says: the socket the config names stays unmade, the option's answers for this pid."""
    named, given = tmp_path / "named" / "control", tmp_path / "given" / "control"
    given.parent.mkdir(mode=0o700)
    config = tmp_path / "hsd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={hsd_pki.ca}\n[hsd]\ncontrol_socket={named}\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    log = tmp_path / "hsd.log"
    with Simulator() as sim, open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", str(config), "--control-socket", str(given),
                                 "--simulator", sim.address, "-s"], stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            assert notify.recv(4096) == b"READY=1", log.read_text()
            result = hsd("status", "--socket", str(given), "--json")
            assert result.returncode == 0, result.stderr + log.read_text()
            assert json.loads(result.stdout)["pid"] == proc.pid
            assert not named.exists() and not named.parent.exists()
            assert hsd("status", "--socket", str(named)).returncode == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
            notify.close()
    assert not given.exists()


@pytest.mark.parametrize("value", ["run/control", ""])
def test_control_socket_option_must_be_absolute_or_none(tmp_path: Path, value: str) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text("[hsd]\ncontrol_socket=none\n")
    result = hsd("--control-socket", value, "check", "-c", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"hsd: --control-socket must be an absolute path or 'none', got {value!r}"
