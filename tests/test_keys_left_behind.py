"""The demo, the simulator and the test kit leave no key in root's real user keyring.

Serving the kernel, hsd stores each verified server certificate as a key
"TLS x509 <peer>" in root's user keyring, as tlshd does.  An agent serving a
simulator keeps it in its own process keyring instead.  Checked on the real
keyring: its keys are listed before and after real handshakes (openssl peers),
and no key was added.  Other processes of the same uid may use the keyring at
the same time, so the check counts the keys these runs would add: those
described "TLS x509 localhost" / "TLS x509 127.0.0.1".
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hsd import keyring
from hsd_kit.simulator import Simulator
from hsd_kit import peers
from hsd_kit.harness import DaemonHarness
from hsd_kit.pki import TestPki

PEER_KEYS = ("TLS x509 localhost", "TLS x509 127.0.0.1")


def user_keys() -> dict[int, str]:
    """Serial -> description of every key linked in root's (this uid's) user keyring."""
    raw = keyring.read_key(keyring.keyring_id(keyring.KEY_SPEC_USER_KEYRING))
    keys = {}
    for offset in range(0, len(raw), 4):
        serial = int.from_bytes(raw[offset:offset + 4], "little")
        try:
            keys[serial] = keyring.describe_key(serial)[4]
        except keyring.KeyringError:
            continue  # gone meanwhile
    return keys


def peer_keys() -> set[int]:
    return {serial for serial, description in user_keys().items() if description in PEER_KEYS}


@pytest.fixture
def no_new_user_keys():  # type: ignore[no-untyped-def]
    """Fail the test if the user keyring gained a peer-certificate key while it ran."""
    before = peer_keys()
    count = len(before)
    yield
    after = peer_keys()
    assert after - before == set(), f"left in the user keyring: {[user_keys().get(s) for s in after - before]}"
    assert len(after) <= count


def test_the_test_kit_keeps_peer_keys_out_of_the_user_keyring(hsd_pki: TestPki, no_new_user_keys) -> None:
    """A verified server's key, reported in DONE, lives in this process's keyring and never in root's."""
    from hsd.config import Config

    config = Config()
    config.client.truststore = hsd_pki.ca
    with DaemonHarness("openssl", config) as harness, \
            peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key)) as server:
        finished = harness.finish(harness.client_hello_anon(server.connect(), peername="localhost"))
        finished.expect(0)
    serial = finished.remote_auth[0]
    assert serial and serial not in user_keys()
    found = []
    for key_type in ("asymmetric", "user"):
        try:
            found.append(keyring.search(keyring.KEY_SPEC_PROCESS_KEYRING, key_type, "TLS x509 localhost"))
        except keyring.KeyringError:
            pass
    assert serial in found
    keyring.invalidate(serial)


def in_a_fresh_session(*argv: str) -> list[str]:
    """argv run in a new anonymous session keyring that does not hold root's user keyring - as a service or
    a login without pam_keyinit has it: the process then cannot remove a key it left in the user keyring."""
    return ["keyctl", "session", "-", *argv] if shutil.which("keyctl") else list(argv)


def test_the_demo_leaves_nothing_in_the_user_keyring(tmp_path: Path, no_new_user_keys) -> None:
    result = subprocess.run(in_a_fresh_session(sys.executable, "-m", "hsd.cli", "demo"), cwd=tmp_path,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all scenarios behaved as expected" in result.stdout


def test_hsd_serving_hsd_sim_leaves_nothing_in_the_user_keyring(tmp_path: Path, hsd_pki: TestPki,
                                                                 no_new_user_keys) -> None:
    """hsd-sim plays the NFS client, hsd --simulator verifies a real openssl s_server: DONE reports a key."""
    config = tmp_path / "tlshd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={hsd_pki.ca}\n")
    socket_path = str(tmp_path / "sim.sock")
    with peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key)) as server:
        sim = subprocess.Popen([sys.executable, "-m", "hsd_kit.simulator", "--socket", socket_path, "--once",
                                "--client-anon", f"127.0.0.1:{server.port}", "--peername", "localhost"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "listening" in (sim.stdout.readline() if sim.stdout else "")
            daemon = subprocess.Popen(in_a_fresh_session(sys.executable, "-m", "hsd.cli", "-c", str(config),
                                                         "--simulator", socket_path, "-s"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
            try:
                out, err = sim.communicate(timeout=60)
            finally:
                daemon.terminate()
                _, daemon_err = daemon.communicate(timeout=30)
        finally:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
    assert sim.returncode == 0, out + err + daemon_err
    done = [line for line in out.splitlines() if "DONE status 0 (ok)" in line]
    assert done and not done[0].rstrip().endswith("peerid 0"), out  # a key was reported, just not left in @u


def test_the_daemon_serving_the_kernel_still_uses_the_user_keyring() -> None:
    """The control: outside the simulator nothing changed (tlshd's behaviour, which consumers rely on)."""
    code = ("from hsd import identity, keyring; "
            "assert identity._peer_ring == keyring.KEY_SPEC_USER_KEYRING; print('user')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "user", result.stderr
    with Simulator() as sim:
        sim.channel().close()  # what joining a simulator does to the process that joins
    from hsd import identity

    assert identity._peer_ring == keyring.KEY_SPEC_PROCESS_KEYRING
