"""A client key in a SoftHSM2 token: mutual TLS through pkcs11-provider, and the key never leaves the token.

Run inside the Debian roots only (tests/test_debian.py's "token" step): it needs
hsd on Debian's python3-cryptography (the system OpenSSL), pkcs11-provider,
softhsm2 and opensc's pkcs11-tool.  The file is not named test_*.py, so no
other run collects it.  The key pair is generated inside the token (never
extractable, never in a file); a throw-away client CA signs a certificate for
its public half, which goes into the token too; hsd is configured with
`pkcs11:` URIs for both, serves a real handshake through the simulator
against `openssl s_server -Verify`, and the token refuses to hand the key out.
"""

from __future__ import annotations

import datetime
import glob
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsd_kit.harness import assert_ktls_roundtrip
from hsd_kit.peers import PeerOptions, openssl_server
from hsd_kit.pki import make_pki
from hsd_kit.processes import DaemonProcesses
from hsd_kit.simulator import Simulator

PIN = "4711"
TOKEN = "hsd-test"
KEY_URI = f"pkcs11:token={TOKEN};object=nfs-client;type=private?pin-value={PIN}"
CERT_URI = f"pkcs11:token={TOKEN};object=nfs-client;type=cert"
SUBJECT = "token.client.test"
WAIT = 30
# hsd's own way into the token, then OpenSSL asked for the DER of the public half and of the private key
EXPORT_ATTEMPT = """
import ctypes, sys
from hsd import pkcs11
key = pkcs11.load_key(sys.argv[1])
c = pkcs11._libcrypto()
c.i2d_PrivateKey.restype, c.i2d_PrivateKey.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]
print("public", "ok" if c.i2d_PUBKEY(key.address, None) > 0 else "refused",
      "private", "ok" if c.i2d_PrivateKey(key.address, None) > 0 else "refused")
"""


def _softhsm_module() -> str:
    found = glob.glob("/usr/lib/softhsm/libsofthsm2.so") + glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")
    assert found, "softhsm2 is not installed in this root"
    return found[0]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SoftHSM2 token with an EC key pair generated inside it; returns the PKCS#11 module path."""
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    module = _softhsm_module()
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv("PKCS11_PROVIDER_MODULE", module)  # pkcs11-provider's module, as an operator sets it
    made = _run("softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "0000")
    assert made.returncode == 0, made.stdout + made.stderr
    pair = _run("pkcs11-tool", "--module", module, "--token-label", TOKEN, "--login", "--pin", PIN,
                "--keypairgen", "--key-type", "EC:prime256v1", "--label", "nfs-client", "--id", "01")
    assert pair.returncode == 0, pair.stdout + pair.stderr
    return module


def _client_certificate(public_key, directory: Path) -> tuple[Path, Path]:
    """A client CA (its key only in memory) and a certificate it issues for the token key's public half."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsd token test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBJECT)]))
            .issuer_name(ca_name).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SUBJECT)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, leaf_path = directory / "client-ca.pem", directory / "token-client.der"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.DER))
    return ca_path, leaf_path


def _token_public_key(module: str, directory: Path):
    """The public half, read from the token's public-key object (what a CA would be sent in a CSR)."""
    out = directory / "token-public.der"
    got = _run("pkcs11-tool", "--module", module, "--token-label", TOKEN, "--read-object", "--type", "pubkey",
               "--id", "01", "--output-file", str(out))
    assert got.returncode == 0, got.stdout + got.stderr
    return serialization.load_der_public_key(out.read_bytes())


def test_a_client_key_in_a_token_signs_mutual_tls_and_never_leaves_it(token: str, tmp_path: Path) -> None:
    module = token
    ca_path, leaf_der = _client_certificate(_token_public_key(module, tmp_path), tmp_path)
    stored = _run("pkcs11-tool", "--module", module, "--token-label", TOKEN, "--login", "--pin", PIN,
                  "--write-object", str(leaf_der), "--type", "cert", "--label", "nfs-client", "--id", "01")
    assert stored.returncode == 0, stored.stdout + stored.stderr
    leaf_der.unlink()  # from now on the certificate, too, comes from the token
    pki = make_pki(str(tmp_path / "pki"))
    config = tmp_path / "tlshd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore = {pki.ca}\nx509.certificate = {CERT_URI}\n"
                      f"x509.private_key = {KEY_URI}\n")

    checked = subprocess.run([sys.executable, "-m", "hsd.cli", "check", "-c", str(config)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "configuration OK" in checked.stdout and PIN not in checked.stdout + checked.stderr, checked.stdout
    assert "a key in a token" in checked.stdout and SUBJECT in checked.stdout, checked.stdout

    log = tmp_path / "hsd.log"
    with Simulator() as sim, DaemonProcesses(sim, ["hsd.cli", "-c", str(config), "-s", "--debug"],
                                             log_path=str(log)) as daemon:
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key, ca=str(ca_path),
                                        require_client_cert=True)).start() as server:
            mine = socket.create_connection(server.address)
            try:
                request = sim.client_hello_x509(mine, peername="localhost", timeout_ms=20000)
                status, _ = request.wait(WAIT)
                assert status == 0, log.read_text()[-3000:] + server.output
                assert request.done_calls == 1 and request.ktls_tx is not None
                print(assert_ktls_roundtrip(request, server).summary())
            finally:
                mine.close()
            assert f"CN={SUBJECT}" in server.output.replace(" = ", "="), server.output
        assert daemon.proc.poll() is None, log.read_text()[-3000:]
    assert PIN not in log.read_text(), "the PIN reached the daemon's log"

    # the key never leaves the token: generated there and marked so, and OpenSSL, asked through the same
    # provider hsd uses for the private key's DER encoding, gets nothing (its public half it does get)
    listing = _run("pkcs11-tool", "--module", module, "--token-label", TOKEN, "--login", "--pin", PIN,
                   "--list-objects", "--type", "privkey")
    access = next(line.split(":", 1)[1].strip() for line in listing.stdout.splitlines() if "Access:" in line)
    assert "never extractable" in access and "always sensitive" in access, listing.stdout
    refused = subprocess.run([sys.executable, "-c", EXPORT_ATTEMPT, KEY_URI], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)  # its own process: the provider loaded afresh
    assert refused.returncode == 0 and refused.stdout.split() == ["public", "ok", "private", "refused"], \
        refused.stdout + refused.stderr
    print(f"token key: {access}; its DER encoding refused by the provider")


def test_a_wrong_pin_is_refused_at_start_in_one_line_without_the_pin(token: str, tmp_path: Path) -> None:
    pki = make_pki(str(tmp_path / "pki"))
    config = tmp_path / "tlshd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore = {pki.ca}\nx509.certificate = {pki.client.cert}\n"
                      f"x509.private_key = {KEY_URI.replace(PIN, '9999')}\n")
    checked = subprocess.run([sys.executable, "-m", "hsd.cli", "check", "-c", str(config)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
    errors = [line for line in checked.stdout.splitlines() if line.startswith("error: ")]
    assert checked.returncode == 2 and len(errors) == 1, checked.stdout + checked.stderr
    assert "no private key in a token matches it" in errors[0] and "9999" not in checked.stdout, errors
    assert "Traceback" not in checked.stderr


def test_a_token_key_that_is_not_the_certificates_is_refused(token: str, tmp_path: Path) -> None:
    """The public half read from the token is matched to the certificate, as for a key file."""
    pki = make_pki(str(tmp_path / "pki"))
    config = tmp_path / "tlshd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore = {pki.ca}\nx509.certificate = {pki.client.cert}\n"
                      f"x509.private_key = {KEY_URI}\n")
    checked = subprocess.run([sys.executable, "-m", "hsd.cli", "check", "-c", str(config)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
    errors = [line for line in checked.stdout.splitlines() if line.startswith("error: ")]
    assert checked.returncode == 2 and len(errors) == 1, checked.stdout + checked.stderr
    assert "is not the private key of" in errors[0] and "pin-value=***" in errors[0], errors
    assert PIN not in checked.stdout + checked.stderr
