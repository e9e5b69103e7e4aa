"""Expiry warnings (issue 15 point 5): certificates, chains and CRLs that expire within
[hsd] expiry_warning_days warn at start, reload and daily; expired ones are error lines naming the file.

Real files made with cryptography, the real `hsd check`, the real daemon against the simulator for
start and reload, and the daemon's daily watcher run with a short interval on real files.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsd import config as config_mod
from hsd import daemon, expiry
from hsd.check import inspect
from hsd.plugins import PluginHost
from hsd_kit.simulator import Simulator

NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key, issuer_cn: str, issuer_key, days_left: float, ca: bool = False) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer_cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=30))
               .not_valid_after(NOW + datetime.timedelta(days=days_left))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


class Files:
    """A CA, an intermediate and a leaf whose lifetimes each test chooses, written as PEM files."""

    def __init__(self, directory: Path, *, leaf_days: float = 365, intermediate_days: float = 365,
                 ca_days: float = 3650, crl_days: float | None = None) -> None:
        self.directory = directory
        ca_key, mid_key, self.leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = _cert("expiry test CA", ca_key, "expiry test CA", ca_key, ca_days, ca=True)
        mid = _cert("expiry test intermediate", mid_key, "expiry test CA", ca_key, intermediate_days, ca=True)
        leaf = _cert("localhost", self.leaf_key, "expiry test intermediate", mid_key, leaf_days)
        self.ca, self.cert, self.key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
        self.ca.write_bytes(_pem(ca))
        self.cert.write_bytes(_pem(leaf, mid))
        self.key.write_bytes(self.leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        os.chmod(self.key, 0o600)
        self.crl = None
        if crl_days is not None:
            crl = (x509.CertificateRevocationListBuilder().issuer_name(_name("expiry test CA"))
                   .last_update(NOW - datetime.timedelta(days=1))
                   .next_update(NOW + datetime.timedelta(days=crl_days)).sign(ca_key, hashes.SHA256()))
            self.crl = directory / "ca.crl"
            self.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def config(self, extra: str = "") -> Path:
        text = (f"[authenticate.server]\nx509.certificate={self.cert}\nx509.private_key={self.key}\n"
                f"[authenticate.client]\nx509.truststore={self.ca}\n")
        if self.crl:
            text += f"x509.crl={self.crl}\n"
        path = self.directory / "tlshd.conf"
        path.write_text(text + extra)
        return path


def check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hsd.cli", "check", *extra, "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def lines(stderr: str, level: str) -> list[str]:
    return [line.removeprefix(f"hsd: {level}: ") for line in stderr.splitlines() if line.startswith(f"hsd: {level}: ")]


def test_a_certificate_expiring_within_the_window_warns_naming_file_and_days(tmp_path: Path) -> None:
    files = Files(tmp_path, leaf_days=5.5)
    result = check(files.config())
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result.stderr, "warning") == [
        f"[authenticate.server] x509.certificate = {files.cert}: the certificate CN=localhost expires in 5 days "
        f"({(NOW + datetime.timedelta(days=5.5)):%Y-%m-%d %H:%M} UTC)"]
    assert lines(result.stderr, "error") == []
    assert check(files.config(), "--strict").returncode == 2  # strict: it counts as a warning


def test_the_window_is_the_config_key_and_zero_keeps_only_the_errors(tmp_path: Path) -> None:
    files = Files(tmp_path, leaf_days=20.5)
    assert lines(check(files.config()).stderr, "warning") == []  # 20 days: outside the default 14
    wide = lines(check(files.config("[hsd]\nexpiry_warning_days=30\n")).stderr, "warning")
    assert len(wide) == 1 and "the certificate CN=localhost expires in 20 days" in wide[0]
    expired = Files(tmp_path, leaf_days=-1)
    result = check(expired.config("[hsd]\nexpiry_warning_days=0\n"))
    assert result.returncode == 0 and lines(result.stderr, "warning") == []
    [error] = lines(result.stderr, "error")
    assert error.startswith(f"[authenticate.server] x509.certificate = {expired.cert}: the certificate CN=localhost "
                            "expired (")
    assert "1 certificate(s) or CRL(s) have expired" in result.stdout


@pytest.mark.parametrize("value, words", [("soon", "'soon' is not an integer"), ("-1", "-1 is outside 0..3650"),
                                          ("99999", "99999 is outside 0..3650")])
def test_an_invalid_window_is_refused_with_file_and_line(tmp_path: Path, value: str, words: str) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(f"# hsd\n[hsd]\nexpiry_warning_days={value}\n")
    result = check(config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"hsd: {config}:3: {words}"
    config.write_text("[hsd]\nexpiry_warning_day=3\n")
    with pytest.raises(config_mod.ConfigError, match="did you mean 'expiry_warning_days'"):
        config_mod.load(str(config))


def test_chain_certificates_cas_and_crls_are_judged_each_by_name(tmp_path: Path) -> None:
    files = Files(tmp_path, intermediate_days=3.5, ca_days=-2, crl_days=1.5)
    found = lines(check(files.config()).stderr, "warning")
    errors = lines(check(files.config()).stderr, "error")
    assert any(f"x509.certificate = {files.cert}: the chain certificate CN=expiry test intermediate expires in 3 days"
               in line for line in found), found
    assert any(f"x509.crl = {files.crl}: the CRL of CN=expiry test CA needs its next update in 1 day (" in line
               for line in found), found
    assert any(f"x509.truststore = {files.ca}: CA CN=expiry test CA expired (" in line for line in errors), errors


def test_the_daily_scan_says_exactly_what_check_says(tmp_path: Path) -> None:
    files = Files(tmp_path, leaf_days=2.5, intermediate_days=-1, crl_days=-0.5)
    cfg = config_mod.load(str(files.config()))
    from_check = [item.line() for item in inspect(cfg, PluginHost.discover(cfg)).expiring]
    from_scan = [item.line() for item in expiry.scan(cfg)]
    assert len(from_check) == 3 and sorted(from_check) == sorted(from_scan)
    assert sum(item.error for item in expiry.scan(cfg)) == 2  # the expired intermediate, the stale CRL


def test_the_daily_watch_repeats_and_rereads_the_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = Files(tmp_path, leaf_days=3.5)
    cfg = config_mod.load(str(files.config()))
    stop = threading.Event()
    caplog.set_level(logging.WARNING, logger="hsd")
    thread = daemon.watch_expiry(lambda: cfg, stop, interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while sum("expires in 3 days" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        (tmp_path / "renewed").mkdir()
        renewed = Files(tmp_path / "renewed", leaf_days=365)
        os.replace(renewed.cert, files.cert)  # renewed in place: the next check must see the new file
        time.sleep(0.3)
        caplog.clear()
        time.sleep(0.3)
        assert [r.getMessage() for r in caplog.records if r.name == "hsd"] == []
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_the_daemon_warns_at_start_and_again_at_reload(tmp_path: Path) -> None:
    files = Files(tmp_path, leaf_days=4.5)
    config = files.config("[hsd]\nbackend=openssl\n")
    log = tmp_path / "hsd.log"
    with Simulator() as sim, open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator", sim.address, "-s"],
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while "hsd ready:" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            expected = f"x509.certificate = {files.cert}: the certificate CN=localhost expires in 4 days"
            assert log.read_text().count(expected) == 1, log.read_text()
            proc.send_signal(signal.SIGHUP)
            while "configuration reloaded" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert log.read_text().count(expected) == 2, log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()
