"""`hsd check` tells the truth: what it calls an error, the daemon refuses at start, in the same words.

Each refusal below is one config with one problem.  `hsd check` must exit 2
naming it, and the real daemon (`hsd -c FILE --simulator SOCKET`, a real
simulator listening) must exit 2 before it serves a single request, printing
the very same message.  The accepted configs - the ones the real-kernel VM
scenarios give hsd, built here by the scenarios' own shell functions - must
pass with exit 0 and no warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsd import credentials
from hsd.config import Config
from hsd.credentials import load_x509
from hsd.errors import CredentialError
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd_kit.simulator import Simulator
from hsd_kit.pki import TestPki

from test_config import TLSHD_SHIPPED

SCENARIOS = Path(__file__).parent / "vm" / "scenarios"


def hsd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hsd.cli", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def check_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.removeprefix("error: ") for line in result.stdout.splitlines() if line.startswith("error: ")]


def daemon_errors(stderr: str) -> list[str]:
    return [line.removeprefix("hsd: ") for line in stderr.splitlines()
            if line.startswith("hsd: ") and not line.startswith("hsd: warning: ")]


def warnings_of(stderr: str) -> list[str]:
    return [line.removeprefix("hsd: warning: ") for line in stderr.splitlines() if line.startswith("hsd: warning: ")]


def start_daemon(config: Path, sim: Simulator, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real daemon against a real simulator; a refused config exits, an accepted one would serve."""
    return subprocess.run([sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator", sim.address, "-s"],
                          cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


@pytest.fixture
def etc(tmp_path: Path, hsd_pki: TestPki) -> Path:
    """Copies of the test PKI in a private directory, keys mode 0600 (what an operator installs)."""
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    for name, source in (("ca.pem", hsd_pki.ca), ("crl.pem", hsd_pki.crl), ("server.pem", hsd_pki.server.cert),
                         ("server.key", hsd_pki.server.key), ("client.pem", hsd_pki.client.cert),
                         ("client.key", hsd_pki.client.key), ("expired.pem", hsd_pki.expired_server.cert),
                         ("expired.key", hsd_pki.expired_server.key)):
        shutil.copyfile(source, directory / name)
        os.chmod(directory / name, 0o600 if name.endswith(".key") else 0o644)
    (directory / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    os.chmod(directory / "garbage.key", 0o600)
    (directory / "garbage.pem").write_text("this is no certificate\n")
    (directory / "loose.key").write_bytes((directory / "server.key").read_bytes())
    os.chmod(directory / "loose.key", 0o644)
    return directory


def server(etc: Path, cert: str = "server.pem", key: str = "server.key", extra: str = "") -> str:
    lines = ["[authenticate.server]", f"x509.truststore={etc / 'ca.pem'}"]
    if cert:
        lines.append(f"x509.certificate={etc / cert}")
    if key:
        lines.append(f"x509.private_key={etc / key}")
    return "\n".join(lines) + "\n" + extra


# (id, config text from the etc directory, the words the one error must contain)
REFUSALS = [
    ("missing-certificate", lambda etc: server(etc, cert="absent.pem"),
     ["[authenticate.server] x509.certificate = ", "absent.pem: cannot read it: No such file or directory"]),
    ("key-does-not-parse", lambda etc: server(etc, key="garbage.key"),
     ["[authenticate.server] x509.private_key: ", "garbage.key: not an unencrypted private key"]),
    ("key-does-not-match", lambda etc: server(etc, key="client.key"),
     ["client.key is not the private key of", "server.pem (their public keys differ)"]),
    ("certificate-without-key", lambda etc: server(etc, key=""),
     ["x509.certificate and x509.private_key must be configured together",
      "set [authenticate.server] x509.private_key too"]),
    ("certificate-does-not-parse", lambda etc: server(etc, cert="garbage.pem"),
     ["[authenticate.server] x509.certificate: ", "garbage.pem: not a certificate"]),
    ("truststore-does-not-parse",
     lambda etc: f"[authenticate.client]\nx509.truststore={etc / 'garbage.pem'}\n",
     ["[authenticate.client] x509.truststore: ", "garbage.pem: not a certificate"]),
    ("crl-does-not-parse",
     lambda etc: f"[authenticate.client]\nx509.truststore={etc / 'ca.pem'}\nx509.crl={etc / 'garbage.pem'}\n",
     ["[authenticate.client] x509.crl: ", "garbage.pem: not a CRL"]),
    ("loose-key-when-strict", lambda etc: server(etc, key="loose.key", extra="[hsd]\nstrict_permissions=true\n"),
     ["loose.key: private key file is accessible by group and others (mode 0644); chmod 600 it",
      "strict_permissions refuses it"]),
    ("backend-typo", lambda etc: "[hsd]\nbackend=opensl\n",
     ["[hsd] backend = opensl: backend 'opensl' is not installed", "did you mean 'openssl'?"]),
    ("per-mode-backend-disabled",
     lambda etc: server(etc, extra="[hsd]\ndisable_plugins=tlslite\n[hsd.backends]\nserver.x509=tlslite\n"),
     ["[hsd.backends] server.x509 = tlslite: backend 'tlslite' is disabled by configuration",
      "selected for server/x509"]),
    ("pkcs11-key-url", lambda etc: server(etc, key="").replace(
        "x509.certificate=", "x509.private_key=pkcs11:token=nfs;object=server\nx509.certificate="),
     ["[authenticate.server] x509.private_key", "pkcs11:token=nfs;object=server: "]),  # why: test_pkcs11.py
    ("per-mode-not-served", lambda etc: "[hsd]\ndisable_plugins=psk\n[hsd.backends]\nclient.psk=openssl\n",
     ["[hsd.backends] client.psk = openssl: no PSK policy plugin serves client/psk", "hsd plugins shows"]),
]


NEEDS_TLSLITE = {"per-mode-backend-disabled"}  # without tlslite-ng the refusal is that it cannot be loaded


@pytest.mark.parametrize("text, words", [pytest.param(r[1], r[2], marks=[pytest.mark.needs("tlslite")]
                                                      if r[0] in NEEDS_TLSLITE else []) for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_check_and_the_daemon_refuse_the_same_config_with_the_same_message(etc: Path, tmp_path: Path, text,
                                                                          words: list[str]) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(text(etc))
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    errors = check_errors(checked)
    assert len(errors) == 1, checked.stdout
    assert all(word in errors[0] for word in words), errors[0]
    assert "configuration FAILED" in checked.stdout and "configuration OK" not in checked.stdout
    assert "Traceback" not in checked.stderr
    with Simulator() as sim:
        started = start_daemon(config, sim, tmp_path)
        assert started.returncode == 2, started.stderr
        assert daemon_errors(started.stderr) == errors, started.stderr  # the same words, one line each
        assert sim.stats.accepted == 0 and "hsd ready" not in started.stderr
    assert "Traceback" not in started.stderr


def test_each_refusal_has_its_own_message(etc: Path, tmp_path: Path) -> None:
    """No catch-all: each problem has its own first line."""
    seen = set()
    for name, text, _words in REFUSALS:
        config = tmp_path / f"{name}.conf"
        config.write_text(text(etc))
        errors = check_errors(hsd("check", "-c", str(config), cwd=tmp_path))
        assert len(errors) == 1
        seen.add(errors[0].replace(str(config), "CONFIG"))
    assert len(seen) == len(REFUSALS)


def test_a_typo_in_an_hsd_section_is_refused_by_check_and_daemon_alike(tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text("[hsd.sever]\nrequire_client_certificate=true\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 2 and "configuration OK" not in checked.stdout
    line = f"hsd: {config}:1: unknown section [hsd.sever] (did you mean [hsd.server]?)"
    assert checked.stderr.startswith(line), checked.stderr
    with Simulator() as sim:
        started = start_daemon(config, sim, tmp_path)
    assert started.returncode == 2 and started.stderr.startswith(line), started.stderr


def test_a_good_config_passes_check_and_the_daemon_starts_with_it(etc: Path, tmp_path: Path) -> None:
    """The control for the refusals above: the same files, correct, are accepted by both."""
    config = tmp_path / "tlshd.conf"
    config.write_text(server(etc) + f"[authenticate.client]\nx509.truststore={etc / 'ca.pem'}\n"
                      f"x509.crl={etc / 'crl.pem'}\n")
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("configuration OK"), checked.stdout
    assert checked.stderr == ""
    assert f"[loaded] [authenticate.server] x509.certificate: " in checked.stdout
    with Simulator() as sim:
        log = tmp_path / "daemon.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", str(config), "--simulator", sim.address,
                                     "-s"], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "hsd ready" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


def test_strict_fails_on_warnings_which_are_printed_once(etc: Path, tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(server(etc, cert="expired.pem", key="loose.key").replace(
        f"x509.private_key={etc / 'loose.key'}", f"x509.private_key={etc / 'expired.key'}")
        + "[debug]\nfuture_key=1\n")
    plain = hsd("check", "-c", str(config), cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # an expired certificate does not stop start-up
    warnings = warnings_of(plain.stderr)
    assert len(warnings) == 1 and "unknown key 'future_key' in [debug]" in warnings[0], plain.stderr
    expired = [line for line in plain.stderr.splitlines() if line.startswith("hsd: error: ")]
    assert len(expired) == 1 and f"{etc / 'expired.pem'}: the certificate CN=" in expired[0], plain.stderr
    assert "expired (" in expired[0] and "until it is renewed" in expired[0]
    assert "1 certificate(s) or CRL(s) have expired" in plain.stdout
    for line in warnings + [line.removeprefix("hsd: error: ") for line in expired]:  # once, not on stdout too
        assert (plain.stdout + plain.stderr).count(line) == 1
    strict = hsd("check", "--strict", "-c", str(config), cwd=tmp_path)
    assert strict.returncode == 2 and "configuration FAILED (--strict): 2 warning(s)" in strict.stdout


def test_a_loose_key_warns_once_without_strict_permissions(etc: Path, tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(server(etc, key="loose.key"))
    plain = hsd("check", "-c", str(config), cwd=tmp_path)
    assert plain.returncode == 0
    assert warnings_of(plain.stderr) == [f"{etc / 'loose.key'}: private key file is accessible by group and others "
                                         "(mode 0644); chmod 600 it"]
    assert hsd("check", "--strict", "-c", str(config), cwd=tmp_path).returncode == 2


def test_check_prints_every_effective_setting(tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text("[hsd]\nworkers=3\nisolation=process\nstrict_permissions=true\nenable_plugins=openssl;psk\n"
                      "disable_plugins=tlslite\nmax_inflight=9\nhandshake_timeout=1234\n")
    os.chmod(config, 0o600)
    result = hsd("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for setting in ("workers=3", "isolation=process", "strict_permissions=true", "enable_plugins=openssl;psk",
                    "disable_plugins=tlslite", "max_inflight=9", "handshake_timeout=1234ms", "backend=openssl",
                    "verify_server=true", "require_client_certificate=false", "modes=psk_dhe_ke", "loglevel=0"):
        assert setting in result.stdout, (setting, result.stdout)


@pytest.mark.needs("tlslite")  # lists tlslite as disabled: it must be installed to be listed at all
def test_plugins_reads_the_config_given_after_the_command(tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text("[hsd]\ndisable_plugins=tlslite\n")
    after = hsd("plugins", "-c", str(config), cwd=tmp_path)
    before = hsd("-c", str(config), "plugins", cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout
    assert "tlslite    (disabled by configuration)" in after.stdout
    assert "(disabled by configuration)" not in hsd("plugins", cwd=tmp_path).stdout


def test_a_key_that_stops_matching_after_start_fails_the_handshake_in_words(etc: Path) -> None:
    """Files are re-read when they change: a key swapped after start is caught at the handshake, in words."""
    config = Config()
    config.server.certificate, config.server.private_key = str(etc / "server.pem"), str(etc / "client.key")
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509)
    with pytest.raises(CredentialError) as caught:
        load_x509(config, request)
    assert str(caught.value) == (f"{etc / 'client.key'} is not the private key of {etc / 'server.pem'} "
                                 "(their public keys differ): configure the key the certificate was issued for")
    config.server.private_key = str(etc / "server.key")
    assert load_x509(config, request).key is not None


def test_a_private_key_is_parsed_once_while_its_file_is_unchanged_and_a_rewrite_is_seen(etc: Path) -> None:
    """The parsed key is kept by file identity: the same object while unchanged; a key rewritten in place
    with its old mtime put back (the size may match too) is still re-read, and its mismatch caught."""
    config = Config()
    config.server.certificate, config.server.private_key = str(etc / "server.pem"), str(etc / "server.key")
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509)
    first = load_x509(config, request).key
    assert load_x509(config, request).key is first
    st = os.stat(etc / "server.key")
    time.sleep(0.01)  # a ctime the rewrite cannot share with the first write
    (etc / "server.key").write_bytes((etc / "client.key").read_bytes())
    os.utime(etc / "server.key", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CredentialError, match="is not the private key of"):
        load_x509(config, request)
    assert not any(held is first for held, _ in credentials._public_ders.values()), "the replaced key lives on"


# ---------------------------------------------------------------- the configs the VM scenarios use


def scenario_heredoc(script: str, target: str) -> str:
    """The text a scenario writes with `cat > "TARGET" <<EOF` ... `EOF`, its variables not yet expanded."""
    match = re.search(rf'cat > "{re.escape(target)}" <<EOF\n(.*?\n)EOF\n', (SCENARIOS / script).read_text(), re.S)
    assert match, f"{script} no longer writes {target} with a here-document: update scenario_configs"
    return match.group(1)


def scenario_configs(directory: Path) -> dict[str, Path]:
    """The VM scenarios' configs, made by their own _lib.sh functions (make_pki, agent_config) and
    here-documents in directory.  nfs-token's (pkcs11: URIs) needs a token: tests/debian/token_mtls.py."""
    pki = directory / "pki"
    script = f"""
set -eu
. ./_lib.sh
PKI={pki}
make_pki
agent_config {directory}/tlshd.conf server           # tlshd-nfs, hsd-nfs, bench-*, nvme-psk, the boot's
agent_config {directory}/rogue.conf rogue-server     # hsd-nfs' reload
agent_config {directory}/mixed.conf server           # nvme-psk@mixed
printf '\\n[hsd.backends]\\nclient.psk=%s\\n' tlslite >> {directory}/mixed.conf
agent_config {directory}/unit-tlslite.conf server    # systemd-service@tlslite: the boot's, [hsd] backend
printf '\\n[hsd]\\nbackend=%s\\n' tlslite >> {directory}/unit-tlslite.conf
cat > {directory}/tenant1.conf <<EOF
{scenario_heredoc("netns-nfs.sh", "$NS_CONF")}EOF
"""
    subprocess.run(["bash", "-c", script], cwd=SCENARIOS, check=True, capture_output=True, timeout=120)
    shipped = directory / "shipped.conf"  # tlshd-config: the file ktls-utils installs as /etc/tlshd.conf
    shipped.write_text(TLSHD_SHIPPED)
    return {"agent": directory / "tlshd.conf", "rogue": directory / "rogue.conf",
            "mixed": directory / "mixed.conf", "unit-tlslite": directory / "unit-tlslite.conf",
            "tenant1": directory / "tenant1.conf", "shipped": shipped}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("openssl") is None, reason="needs bash and openssl")
@pytest.mark.needs("tlslite")  # the "mixed" scenario serves client/psk with tlslite
def test_every_config_the_vm_scenarios_use_passes_check_without_a_warning(tmp_path: Path) -> None:
    configs = scenario_configs(tmp_path)
    # hsd-nfs@tlslite and nvme-psk@tlslite give the agent config with `hsd --backend tlslite`
    runs = [(name, config, ()) for name, config in configs.items()] + [
        ("agent --backend tlslite", configs["agent"], ("--backend", "tlslite"))]
    for name, config, args in runs:
        # the scenarios' throwaway PKI lives 2 days (-days 2): expiring soon by design, so the window is 1 day
        # here; everything else must still draw no warning at all
        narrowed = tmp_path / f"{name.split()[0]}-narrowed.conf"
        narrowed.write_text(config.read_text() + "\n[hsd]\nexpiry_warning_days=1\n")
        result = hsd(*args, "check", "--strict", "-c", str(narrowed), cwd=tmp_path)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert result.stderr == "" and "warn" not in result.stdout.lower().replace("expiry_warning_days", ""), \
            (name, result.stdout)
        assert result.stdout.rstrip().endswith("configuration OK")
        if "tlslite" in name:  # the backend really was the one the scenario runs
            assert "[hsd] backend=tlslite " in result.stdout, (name, result.stdout)
    mixed = hsd("check", "-c", str(configs["mixed"]), cwd=tmp_path).stdout
    assert "[hsd.backends] client.psk=tlslite" in mixed.splitlines()  # nvme-psk@mixed greps this line
    agent = hsd("check", "-c", str(configs["agent"]), cwd=tmp_path).stdout
    assert "[loaded] [authenticate.server] x509.certificate: CN=localhost, 1 certificate(s)" in agent
    tenant1 = hsd("check", "-c", str(configs["tenant1"]), cwd=tmp_path).stdout  # netns-nfs' hsd@tenant1
    assert f"[authenticate.client] x509.truststore={tmp_path / 'pki' / 'ca.pem'}" in tenant1.splitlines()
    assert "[loaded] [authenticate.client] x509.truststore: 1 CA certificate(s)" in tenant1


def _crl(path: Path, issuer_name: str, key, *, days_ago: int) -> None:
    """A CRL by issuer_name signed with key, whose next update was days_ago days ago (negative: in the future)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
           .last_update(now - datetime.timedelta(days=abs(days_ago) + 2))
           .next_update(now - datetime.timedelta(days=days_ago))
           .sign(key, hashes.SHA256()))
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_a_stale_crl_or_one_no_trusted_ca_signed_is_a_warning_strict_refuses(etc: Path, tmp_path: Path) -> None:
    """The daemon still starts (a CRL may be renewed by cron), but every peer it covers would be refused."""
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = ec.generate_private_key(ec.SECP256R1())
    _crl(etc / "stale.crl", "nobody we trust", stranger, days_ago=3)
    config = tmp_path / "tlshd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={etc / 'ca.pem'}\nx509.crl={etc / 'stale.crl'}\n")
    plain = hsd("check", "-c", str(config), cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    warnings = warnings_of(plain.stderr)
    assert len(warnings) == 1 and "is signed by no CA in x509.truststore" in warnings[0], plain.stderr
    stale = [line for line in plain.stderr.splitlines() if line.startswith("hsd: error: ")]  # issue 15 point 5
    assert len(stale) == 1 and f"x509.crl = {etc / 'stale.crl'}: the CRL of CN=nobody we trust is past its " \
        "next update" in stale[0], plain.stderr
    assert hsd("check", "--strict", "-c", str(config), cwd=tmp_path).returncode == 2
    _crl(etc / "fresh.crl", "nobody we trust", stranger, days_ago=-30)
    config.write_text(f"[authenticate.client]\nx509.truststore={etc / 'ca.pem'}\nx509.crl={etc / 'fresh.crl'}\n")
    assert len(warnings_of(hsd("check", "-c", str(config), cwd=tmp_path).stderr)) == 1  # only: unsigned
    _crl(etc / "fresh.crl", "nobody we trust", stranger, days_ago=-3)  # due within expiry_warning_days (14)
    soon = warnings_of(hsd("check", "-c", str(config), cwd=tmp_path).stderr)
    assert len(soon) == 2 and any("the CRL of CN=nobody we trust needs its next update in 2 days (" in line
                                  for line in soon), soon


def test_a_plugin_list_naming_no_installed_plugin_warns_with_the_nearest_name(tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text("[hsd]\ndisable_plugins=tlslit\n")
    result = hsd("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0
    [warning] = warnings_of(result.stderr)
    assert warning.startswith("[hsd] disable_plugins names 'tlslit', which is not installed (did you mean 'tlslite'?)")
