"""Files hsd trusts that someone else could have written: warned about once, or refused when strict.

Real files, really chowned to another uid or chmod'ed group/other-writable,
read through the real loaders (the config loader, the credentials loader in a
handshake, hsd's start-up).  The adversary is a local user who can write the
trust store (or its directory) and put their own CA in it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsd import config as config_mod
from hsd import filetrust
from hsd.config import Config
from hsd_kit.simulator import Simulator
from hsd_kit import peers
from hsd_kit.harness import DaemonHarness
from hsd_kit.pki import TestPki

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root (CI runs as root)")

STRANGER = 65534  # nobody


@pytest.fixture
def etc(tmp_path: Path, hsd_pki: TestPki) -> Path:
    """A root-owned 0755 directory with copies of the PKI files, modes as an administrator sets them."""
    where = tmp_path / "etc"
    where.mkdir(mode=0o755)
    for name, source, mode in (("ca.pem", hsd_pki.ca, 0o644), ("crl.pem", hsd_pki.crl, 0o644),
                               ("server.pem", hsd_pki.server.cert, 0o644), ("server.key", hsd_pki.server.key, 0o600)):
        shutil.copy(source, where / name)
        os.chmod(where / name, mode)
    return where


def test_root_owned_files_in_root_owned_directories_are_trusted(etc: Path) -> None:
    for name in ("ca.pem", "crl.pem", "server.pem"):
        assert filetrust.problems(str(etc / name), "certificate") == []
    assert filetrust.problems(str(etc / "server.key"), "private key", secret=True) == []


@pytest.mark.parametrize("change, expected", [
    (lambda f: os.chown(f, STRANGER, -1), f"owned by uid {STRANGER}, not root"),
    (lambda f: os.chmod(f, 0o664), "writable by group (mode 0664)"),
    (lambda f: os.chmod(f, 0o646), "writable by others (mode 0646)"),
    (lambda f: os.chmod(f, 0o666), "writable by group and others (mode 0666)"),
    (lambda f: os.chmod(os.path.dirname(f), 0o757), "is writable by others (mode 0757); others can replace"),
    (lambda f: os.chmod(os.path.dirname(f), 0o775), "is writable by group (mode 0775)"),
    (lambda f: os.chown(os.path.dirname(f), STRANGER, -1), f"is owned by uid {STRANGER}"),
], ids=["file-owner", "g+w", "o+w", "g+w,o+w", "dir-o+w", "dir-g+w", "dir-owner"])
def test_every_way_someone_else_could_write_a_trusted_file_is_found(etc: Path, change, expected: str) -> None:
    path = str(etc / "ca.pem")
    change(path)
    found = filetrust.problems(path, "trust store")
    assert len(found) == 1 and expected in found[0] and found[0].startswith(f"{path}: "), found


def test_a_private_key_must_not_be_readable_by_others_nor_owned_by_them(etc: Path) -> None:
    key = str(etc / "server.key")
    os.chmod(key, 0o640)
    assert filetrust.problems(key, "private key", secret=True) == [
        f"{key}: private key file is accessible by group (mode 0640); chmod 600 it"]
    os.chmod(key, 0o600)
    os.chown(key, STRANGER, -1)
    assert filetrust.problems(key, "private key", secret=True) == [
        f"{key}: private key file is owned by uid {STRANGER}, not root; chown root it"]
    # a certificate may be world-readable: only writing is a problem for it
    assert filetrust.problems(str(etc / "server.pem"), "certificate") == []


def test_a_directory_higher_up_or_behind_a_symlink_counts_too(etc: Path, tmp_path: Path) -> None:
    nested = etc / "ca" / "private"
    nested.mkdir(parents=True, mode=0o755)
    shutil.copy(etc / "ca.pem", nested / "ca.pem")
    os.chmod(etc / "ca", 0o777)  # whoever writes etc/ca can rename private/ and put their own in its place
    found = filetrust.problems(str(nested / "ca.pem"), "trust store")
    assert found and f"its directory {etc / 'ca'} is writable by group and others" in found[0], found
    os.chmod(etc / "ca", 0o755)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    shutil.copy(etc / "ca.pem", open_dir / "ca.pem")
    (etc / "link.pem").symlink_to(open_dir / "ca.pem")  # the link sits in a good directory, its target does not
    found = filetrust.problems(str(etc / "link.pem"), "trust store")
    assert found and f"its directory {open_dir} is writable" in found[0], found


def test_a_sticky_world_writable_directory_like_tmp_is_accepted(etc: Path) -> None:
    """Others may create files there but not rename or remove root's: nobody can replace this one."""
    os.chmod(etc, 0o1777)
    assert filetrust.problems(str(etc / "ca.pem"), "trust store") == []
    os.chmod(etc, 0o0777)
    assert filetrust.problems(str(etc / "ca.pem"), "trust store")


class Refused(Exception):
    pass


def strict_check(path: str, secret: bool = False) -> None:
    filetrust.enforce(path, "trust store", True, refuse=Refused, secret=secret)


def test_a_file_that_passed_is_not_walked_again_until_it_changes_and_any_change_is_checked_at_once(
        etc: Path, monkeypatch) -> None:
    """The per-handshake check remembers a clean verdict by the file's identity; the adversary changes the file
    in every way that keeps its path: a replacement by rename, chmod/chown in place, a rewrite."""
    walks = []
    real = filetrust.problems
    monkeypatch.setattr(filetrust, "problems", lambda *a, **k: walks.append(a[0]) or real(*a, **k))
    path = str(etc / "ca.pem")
    strict_check(path)
    strict_check(path)
    assert walks == [path]  # the second use found the same file: no walk up the directories
    for change in (lambda: os.chmod(path, 0o646), lambda: os.chown(path, STRANGER, -1)):
        change()
        with pytest.raises(Refused):
            strict_check(path)
        with pytest.raises(Refused):  # a refused file is never remembered as clean
            strict_check(path)
        os.chmod(path, 0o644)
        os.chown(path, 0, -1)
        strict_check(path)
    forged = etc / "forged.pem"
    shutil.copy(path, forged)
    os.chown(forged, STRANGER, -1)
    os.rename(forged, path)  # same path, another file
    with pytest.raises(Refused, match=f"owned by uid {STRANGER}"):
        strict_check(path)


def test_a_directory_opened_above_an_unchanged_file_is_seen_within_the_bound_and_a_fix_at_once(etc: Path) -> None:
    path = str(etc / "server.key")
    strict_check(path, secret=True)
    os.chmod(etc, 0o757)
    time.sleep(filetrust.CLEAN_FOR)
    with pytest.raises(Refused, match="is writable by others"):
        strict_check(path, secret=True)
    os.chmod(etc, 0o755)
    strict_check(path, secret=True)  # fixed: accepted at the very next use


def write_config(path: Path, text: str, mode: int = 0o644) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_the_config_loader_warns_once_and_refuses_when_strict(etc: Path) -> None:
    loose = write_config(etc / "hsd.conf", "[hsd]\nbackend=openssl\n", 0o664)
    first = config_mod.load(loose)
    assert [w for w in first.warnings if "config file is writable by group" in w], first.warnings
    again = config_mod.load(loose)  # a reload: said once already
    assert not [w for w in again.warnings if "writable" in w], again.warnings

    stranger = write_config(etc / "stranger.conf", "[hsd]\nbackend=openssl\n")
    os.chown(stranger, STRANGER, -1)
    assert [w for w in config_mod.load(stranger).warnings if f"owned by uid {STRANGER}" in w]

    strict = write_config(etc / "strict.conf", "[hsd]\nstrict_permissions=true\n", 0o646)
    with pytest.raises(config_mod.ConfigError, match=r"config file is writable by others .*strict_permissions"):
        config_mod.load(strict)
    os.chmod(strict, 0o644)
    assert config_mod.load(strict).strict_permissions is True


def client_config(truststore: Path, strict: bool) -> Config:
    config = Config(strict_permissions=strict)
    config.client.truststore = str(truststore)
    return config


@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
def test_a_trust_store_a_stranger_rewrote_is_refused_when_strict(etc: Path, hsd_pki: TestPki, caplog,
                                                                 strict: bool) -> None:
    """The stranger owns the trust store and put their own CA in it; their server presents a cert from it.

    strict: the handshake fails (EIO) before that CA is trusted, no peer identity
    reported.  Otherwise (documented): it is used, with one warning for two handshakes."""
    truststore = etc / "ca.pem"
    shutil.copy(hsd_pki.other_ca, truststore)
    os.chown(truststore, STRANGER, -1)
    server_opts = peers.PeerOptions(cert=hsd_pki.untrusted_server.cert, key=hsd_pki.untrusted_server.key,
                                    ca=hsd_pki.other_ca)
    caplog.set_level(logging.WARNING, logger="hsd")
    with DaemonHarness("openssl", client_config(truststore, strict)) as daemon:
        finished = []
        for _ in range(2):
            server = peers.openssl_server(server_opts).start()
            try:
                sock = server.connect()
                finished.append(daemon.finish(daemon.client_hello_anon(sock, peername="localhost", timeout_ms=10000)))
                sock.close()
            finally:
                server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{truststore}: ")]
    if strict:
        for done in finished:
            done.expect(errno.EIO)
            assert str(truststore) in done.outcome.reason and "strict_permissions" in done.outcome.reason
        assert warnings == []
    else:
        for done in finished:
            done.expect(0)
        assert warnings == [f"{truststore}: trust store file is owned by uid {STRANGER}, not root; chown root it"]


def start_hsd(sim: Simulator, config: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hsd.cli", "-c", config, "--simulator", sim.address, "-s"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def test_hsd_refuses_to_start_with_an_other_writable_crl_when_strict_and_warns_otherwise(etc: Path,
                                                                                         tmp_path: Path) -> None:
    os.chmod(etc / "crl.pem", 0o646)
    roles = (f"[authenticate.server]\nx509.truststore={etc / 'ca.pem'}\nx509.crl={etc / 'crl.pem'}\n"
             f"x509.certificate={etc / 'server.pem'}\nx509.private_key={etc / 'server.key'}\n")
    with Simulator() as sim:
        strict = write_config(etc / "strict.conf", roles + "[hsd]\nbackend=openssl\nstrict_permissions=true\n")
        proc = start_hsd(sim, strict, tmp_path / "strict.log")
        assert proc.wait(60) == 2  # a configuration error (hsd(8)): the same refusal as hsd check
        text = (tmp_path / "strict.log").read_text()
        assert f"{etc / 'crl.pem'}: CRL file is writable by others (mode 0646)" in text, text
        assert "Traceback" not in text and sim.stats.accepted == 0

        relaxed = write_config(etc / "relaxed.conf", roles + "[hsd]\nbackend=openssl\n")
        proc = start_hsd(sim, relaxed, tmp_path / "relaxed.log")
        try:
            deadline = time.monotonic() + 30
            while "hsd ready" not in (tmp_path / "relaxed.log").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "relaxed.log").read_text()
                time.sleep(0.05)
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
        text = (tmp_path / "relaxed.log").read_text()
        assert text.count("CRL file is writable by others") == 1, text


@pytest.mark.parametrize("which", ["certificate", "private key", "sni certificate", "sni private key"])
@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
def test_a_stranger_owned_certificate_or_key_is_refused_when_strict(etc: Path, caplog, which: str,
                                                                     strict: bool) -> None:
    """The server's own certificate and key, [authenticate.server]'s and an [hsd.server.sni] pair's,
    through the credentials loader a handshake uses: the same rule as the trust store and the CRL."""
    from hsd.config import SniPair
    from hsd.credentials import CredentialError, load_x509
    from hsd.protocol import AuthMode, HandshakeRequest, MessageType

    for name in ("sni.pem", "sni.key"):
        shutil.copy(etc / name.replace("sni", "server"), etc / name)
    os.chmod(etc / "sni.key", 0o600)
    path = etc / {"certificate": "server.pem", "private key": "server.key", "sni certificate": "sni.pem",
                  "sni private key": "sni.key"}[which]
    os.chown(path, STRANGER, -1)
    config = Config(strict_permissions=strict)
    config.server.certificate, config.server.private_key = str(etc / "server.pem"), str(etc / "server.key")
    sni = SniPair("sni.example", str(etc / "sni.pem"), str(etc / "sni.key"), "hsd.conf:9") if "sni" in which else None
    request = HandshakeRequest(sockfd=3, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509)
    caplog.set_level(logging.WARNING, logger="hsd")
    if strict:
        with pytest.raises(CredentialError, match="strict_permissions") as info:
            load_x509(config, request, sni)
        assert str(path) in str(info.value) and f"owned by uid {STRANGER}" in str(info.value)
    else:
        assert load_x509(config, request, sni).key is not None
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{path}: ")] == [
            f"{path}: {which.removeprefix('sni ')} file is owned by uid {STRANGER}, not root; chown root it"]
