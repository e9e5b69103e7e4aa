"""`pkcs11:` key URIs where the OpenSSL in use cannot load pkcs11-provider: one line, check and start alike.

The handshake with a key in a real SoftHSM2 token runs in the Debian roots
(tests/debian/token_mtls.py, through tests/test_debian.py), where hsd runs on
the system OpenSSL.  Here, on a PyPI wheel of cryptography (its own static
OpenSSL), hsd must say in one line that it cannot; on the system OpenSSL the
same refusal is provoked for real by pointing OPENSSL_MODULES at a directory
without the provider.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_check import check_errors, daemon_errors, etc, hsd, start_daemon  # noqa: F401 (etc is a fixture)

from hsd import pkcs11
from hsd_kit.simulator import Simulator

PIN = "31337"
KEY_URI = f"pkcs11:token=nfs;object=client;type=private?pin-value={PIN}"
CERT_URI = "pkcs11:token=nfs;object=client;type=cert"


@pytest.fixture
def no_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The words hsd must use: a wheel's own OpenSSL, or (system OpenSSL) a provider that is not there."""
    if "PyPI wheel" in (pkcs11.unavailable() or ""):
        return "(a PyPI wheel), into which no provider can be loaded"
    monkeypatch.setenv("OPENSSL_MODULES", _modules_without_pkcs11(tmp_path))  # the daemon's OpenSSL finds no pkcs11.so
    return "the system OpenSSL cannot load pkcs11-provider"


def _modules_without_pkcs11(tmp_path: Path) -> str:
    """A copy (symlinks) of the system OpenSSL's provider directory without pkcs11.so: legacy.so stays
    (cryptography 43 refuses to start without it)."""
    listed = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True, timeout=30).stdout
    system = Path(listed.split('"')[1])
    modules = tmp_path / "ossl-modules"
    modules.mkdir()
    for module in system.glob("*.so"):
        if module.name != "pkcs11.so":
            (modules / module.name).symlink_to(module)
    return str(modules)


def _config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "tlshd.conf"
    config.write_text(text)
    return config


def test_check_and_start_refuse_a_token_key_in_one_line_when_the_provider_cannot_load(
        etc: Path, tmp_path: Path, no_provider: str) -> None:
    config = _config(tmp_path, f"[authenticate.client]\nx509.truststore = {etc / 'ca.pem'}\n"
                               f"x509.certificate = {CERT_URI}\nx509.private_key = {KEY_URI}\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    errors = check_errors(checked)
    assert checked.returncode == 2 and len(errors) == 1, checked.stdout + checked.stderr  # one line for both URIs
    assert errors[0].startswith("[authenticate.client] x509.") and no_provider in errors[0], errors
    assert "pkcs11-provider" in errors[0] and "pin-value=***" in errors[0], errors
    assert PIN not in checked.stdout + checked.stderr and "Traceback" not in checked.stderr
    assert "configuration FAILED" in checked.stdout
    with Simulator() as sim:
        started = start_daemon(config, sim, tmp_path)
        assert started.returncode == 2 and daemon_errors(started.stderr) == errors, started.stderr
        assert sim.stats.accepted == 0 and "hsd ready" not in started.stderr
    assert PIN not in started.stderr and "Traceback" not in started.stderr


def test_a_token_key_for_a_server_and_a_file_certificate_is_one_line_too(etc: Path, tmp_path: Path,
                                                                         no_provider: str) -> None:
    config = _config(tmp_path, f"[authenticate.server]\nx509.certificate = {etc / 'server.pem'}\n"
                               "x509.private_key = pkcs11:token=nfs;object=server\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    errors = check_errors(checked)
    assert checked.returncode == 2 and len(errors) == 1, checked.stdout
    assert errors[0].startswith("[authenticate.server] x509.private_key = pkcs11:token=nfs;object=server: ")
    assert no_provider in errors[0], errors


@pytest.mark.needs("tlslite")
def test_a_token_key_on_the_tlslite_backend_is_refused_with_its_own_line(etc: Path, tmp_path: Path) -> None:
    """tlslite is pure Python: it cannot sign inside a token, whatever OpenSSL is present."""
    config = _config(tmp_path, "[hsd.backends]\nclient.x509 = tlslite\n[authenticate.client]\n"
                               f"x509.certificate = {etc / 'client.pem'}\nx509.private_key = {KEY_URI}\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    errors = check_errors(checked)
    assert checked.returncode == 2, checked.stdout
    tlslite = [e for e in errors if "the tlslite backend (selected for client/x509) cannot use a key" in e]
    assert len(tlslite) == 1 and "set [hsd.backends] client.x509 = openssl" in tlslite[0], errors
    assert PIN not in checked.stdout + checked.stderr
    with Simulator() as sim:
        started = start_daemon(config, sim, tmp_path)
        assert started.returncode == 2 and tlslite[0] in daemon_errors(started.stderr), started.stderr


def test_only_the_certificate_and_key_may_name_a_token(etc: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, f"[authenticate.client]\nx509.truststore = {CERT_URI}\n")
    errors = check_errors(hsd("check", "-c", str(config), cwd=tmp_path))
    assert errors == [f"[authenticate.client] x509.truststore = {CERT_URI}: only x509.certificate and "
                      "x509.private_key may name a token object; this key takes a PEM or DER file"]


def test_the_effective_config_shows_the_uri_without_its_pin(etc: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, f"[authenticate.client]\nx509.private_key = {KEY_URI}\n"
                               f"x509.certificate = {etc / 'client.pem'}\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert f"[authenticate.client] x509.private_key={KEY_URI.replace(PIN, '***')}" in checked.stdout
    assert PIN not in checked.stdout + checked.stderr


def test_the_probe_names_the_openssl_it_judged(tmp_path: Path) -> None:
    """On a wheel, the line names cryptography's own OpenSSL version (not the system's, which _ssl may map)."""
    from OpenSSL import SSL

    why = pkcs11.unavailable() or ""
    bundled = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    if "PyPI wheel" in why:
        assert bundled in why, why
    else:  # the system OpenSSL: the libcrypto cryptography uses is mapped into this process, shared
        assert pkcs11._mapped_libcryptos(), "no shared libcrypto, yet not judged a wheel"
        probe = subprocess.run([sys.executable, "-c", "from hsd import pkcs11; print(pkcs11.unavailable())"],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "OPENSSL_MODULES": _modules_without_pkcs11(tmp_path)})
        assert "cannot load pkcs11-provider" in probe.stdout, probe.stdout + probe.stderr
