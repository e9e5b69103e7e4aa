"""Server certificates chosen by SNI ([hsd.server.sni]), end to end: the real daemon on the kernel simulator.

The `hsd` process serves server x509 requests; real `openssl s_client` and
`gnutls-cli` clients send different server names (or none, or hostile ones)
and the test reads which certificate each received from the client's own
output (each certificate's subject carries a unique CN).  Both backends.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsd import sni, tls13
from hsd.config import ConfigError, parse
from hsd_kit import peers
from hsd_kit.processes import DaemonProcesses
from hsd_kit.simulator import Simulator

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-cli")),
                                reason="needs the openssl and gnutls-bin command-line tools")

BACKENDS = ("openssl", "tlslite")
# CN of each certificate -> the names its SAN carries; the CNs are what the clients print
CERTS = {"cert-default": ["localhost"], "cert-nfs1": ["nfs1.example.org"], "cert-nfs2": ["nfs2.example.org"],
         "cert-wild": ["*.example.net"]}
SNI_SECTION = """[hsd.server.sni]
nfs1.example.org = {d}/cert-nfs1.pem;{d}/cert-nfs1.key
# written in another case and with the root's dot: the same name after normalisation
NFS2.Example.ORG. = {d}/cert-nfs2.pem;{d}/cert-nfs2.key
*.example.net = {d}/cert-wild.pem;{d}/cert-wild.key
"""
LONG_NAME = ".".join(["a" * 63] * 3) + ".example.org"  # 203 bytes, a valid DNS name nobody configured


# ---------------------------------------------------------------- a PKI whose leaves say who they are

def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _make_pki(directory: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sni test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - day).not_valid_after(now + 30 * day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for common_name, names in CERTS.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - day).not_valid_after(now + 30 * day)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(directory / f"{common_name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(directory / f"{common_name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    soon_key = ec.generate_private_key(ec.SECP256R1())  # for the expiry warning: 5 days left
    soon = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert-soon")]))
            .issuer_name(ca_name).public_key(soon_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + 5 * day + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("soon.example.org")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / "cert-soon.pem", soon.public_bytes(serialization.Encoding.PEM))
    _write(directory / "cert-soon.key", soon_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(directory / "loose.key", (directory / "cert-nfs1.key").read_bytes(), 0o644)
    _write(directory / "garbage.pem", b"this is no certificate\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sni-pki")
    _make_pki(directory)
    return directory


# ---------------------------------------------------------------- the daemon

class Daemon(DaemonProcesses):
    """`hsd --debug` as its own process against this test's kernel simulator, once it logged ready."""

    def __init__(self, sim: Simulator, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(sim, ["hsd.cli", "-c", str(config), "-s", "--debug"], log_path=str(log), env=env)
        self.config, self.control = config, Path()
        self.wait_logged("hsd ready:")


def _config(pki: Path, backend: str, sni_section: str = SNI_SECTION, hsd_extra: str = "") -> str:
    return (f"[authenticate.server]\nx509.certificate={pki}/cert-default.pem\nx509.private_key={pki}/cert-default.key\n"
            f"[hsd]\nbackend={backend}\n{hsd_extra}" + sni_section.format(d=pki))


SOON_LINE = "soon.example.org = {d}/cert-soon.pem;{d}/cert-soon.key\n"


@pytest.fixture(scope="module", params=BACKENDS)
def daemon(request: pytest.FixtureRequest, pki: Path, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp(f"sni-{request.param}")
    config = directory / "hsd.conf"
    config.write_text(_config(pki, request.param, SNI_SECTION + SOON_LINE, f"control_socket={directory}/control\n"))
    with Simulator() as sim:
        running = Daemon(sim, config, directory / "hsd.log")
        running.config, running.control = config, directory / "control"
        try:
            yield running
        finally:
            assert running.stop() == 0, running.text()
            assert "Traceback" not in running.text(), running.text()


# ---------------------------------------------------------------- real clients

@dataclass
class Client:
    tool: str  # openssl | gnutls
    extra: tuple[str, ...] = ()

    def argv(self, port: int, name: str | None, ca: Path) -> list[str]:
        if self.tool == "openssl":
            sni_flags = ["-servername", name] if name is not None else ["-noservername"]
            return ["openssl", "s_client", "-connect", f"{peers.LOOPBACK}:{port}", "-tls1_3", "-ign_eof",
                    "-CAfile", str(ca), *sni_flags, *self.extra]
        # gnutls-cli sends no server_name for an address unless told one
        sni_flags = ["--sni-hostname", name] if name is not None else []
        return ["gnutls-cli", "--port", str(port), "--insecure", "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3",
                *sni_flags, peers.LOOPBACK]

    @property
    def completed(self) -> str:
        return r"Verify return code" if self.tool == "openssl" else r"Handshake was completed"


def handshake(daemon: Daemon, client: Client, name: str | None, ca: Path) -> tuple[int, str]:
    """One server x509 request served by hsd for a real client sending name; (DONE status, client output)."""
    with peers.Listener() as listener:
        process = PeerProcess(client.argv(listener.port, name, ca), client.tool)
        process.start()
        try:
            sock = listener.accept()
            try:
                status, _ = daemon.sim.server_hello_x509(sock, timeout_ms=8000).wait(20)
                if status == 0:
                    output = process.wait_for(client.completed, timeout=10)
                else:
                    time.sleep(0.3)
                    output = process.output
            finally:
                sock.close()
        finally:
            process.stop()
    return status, output


PeerProcess = peers.PeerProcess


def received(output: str) -> set[str]:
    """The CNs of our certificates the client printed (exactly one when a certificate arrived)."""
    return {common_name for common_name in CERTS if common_name in output}


CASES = [
    pytest.param("nfs1.example.org", "cert-nfs1", id="name-a"),
    pytest.param("nfs2.example.org", "cert-nfs2", id="name-b"),
    pytest.param("NFS1.Example.Org", "cert-nfs1", id="case-insensitive"),
    pytest.param("nfs2.example.org.", "cert-nfs2", id="trailing-dot"),
    pytest.param("host.example.net", "cert-wild", id="wildcard-one-label"),
    pytest.param("a.b.example.net", "cert-default", id="wildcard-two-labels-deep-is-no-match"),
    pytest.param("example.net", "cert-default", id="wildcard-parent-is-no-match"),
    pytest.param("unknown.example.org", "cert-default", id="unknown-name"),
    pytest.param("nfs1.example.org.evil", "cert-default", id="suffix-is-no-match"),
    pytest.param(LONG_NAME, "cert-default", id="long-valid-name"),
    pytest.param(None, "cert-default", id="no-sni"),
]


@pytest.mark.parametrize("tool", ("openssl", "gnutls"))
@pytest.mark.parametrize("name,expected", CASES)
def test_the_client_receives_the_certificate_its_server_name_selects(daemon: Daemon, pki: Path, tool: str,
                                                                      name: str | None, expected: str) -> None:
    status, output = handshake(daemon, Client(tool), name, pki / "ca.pem")
    assert status == 0, f"DONE {errno.errorcode.get(status, status)}; client:\n{output}\nhsd:\n{daemon.text()[-3000:]}"
    assert received(output) == {expected}, output


@pytest.mark.parametrize("name", ["not a name!", "x" * 255, "under_score.example.org", "1.2.3.4"])
def test_a_hostile_server_name_gets_the_default_certificate_or_an_alert(daemon: Daemon, pki: Path,
                                                                        name: str) -> None:
    status, output = handshake(daemon, Client("openssl"), name, pki / "ca.pem")
    if status == 0:
        assert received(output) == {"cert-default"}, output
    else:
        assert status == errno.EACCES and "alert" in output, output
    # and the daemon still serves the next client, by its name
    status, output = handshake(daemon, Client("openssl"), "nfs1.example.org", pki / "ca.pem")
    assert status == 0 and received(output) == {"cert-nfs1"}, output


def _real_client_hello(name: str) -> bytes:
    """The first flight of a real `openssl s_client` sending name (captured on a listener, never answered)."""
    with peers.Listener() as listener:
        process = PeerProcess(["openssl", "s_client", "-connect", f"{peers.LOOPBACK}:{listener.port}", "-tls1_3",
                               "-servername", name], "openssl s_client")
        process.start()
        try:
            sock = listener.accept()
            with sock:
                sock.settimeout(10)
                header = _recv_exact(sock, 5)
                return header + _recv_exact(sock, int.from_bytes(header[3:5], "big"))
        finally:
            process.stop()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the client closed early"
        data += chunk
    return data


PLACEHOLDER = "zzzzzzzzzzzzzzzz.example.org"


def _mutations(hello: bytes) -> dict[str, bytes]:
    """Real ClientHellos whose server_name was made hostile in place (other lengths kept consistent)."""
    at = hello.index(PLACEHOLDER.encode())
    name_len = at - 2  # HostName length, right before the name
    list_len = at - 5  # ServerNameList length, before the name type
    return {
        "nul-and-high-bytes": hello[:at] + (b"\x00\xff" * len(PLACEHOLDER))[:len(PLACEHOLDER)]
                              + hello[at + len(PLACEHOLDER):],
        "host-name-longer-than-its-list": hello[:name_len] + b"\xff\xff" + hello[name_len + 2:],
        "empty-name-list": hello[:list_len] + b"\x00\x00" + hello[list_len + 2:],
    }


@pytest.mark.parametrize("mutation", ["nul-and-high-bytes", "host-name-longer-than-its-list", "empty-name-list"])
def test_a_malformed_server_name_extension_costs_one_request_not_the_daemon(daemon: Daemon, pki: Path,
                                                                           mutation: str) -> None:
    hello = _mutations(_real_client_hello(PLACEHOLDER))[mutation]
    with peers.Listener() as listener:
        peer = socket.create_connection((peers.LOOPBACK, listener.port))
        with peer:
            sock = listener.accept()
            try:
                request = daemon.sim.server_hello_x509(sock, timeout_ms=3000)
                peer.sendall(hello)
                peer.settimeout(10)
                reply = peer.recv(5)
                peer.close()  # a hand-made hello has no keys to go on with
                status, _ = request.wait(15)
            finally:
                sock.close()
    # the library answered as it answers any hello: a ServerHello (default pair) or an alert
    assert reply[:1] in (bytes([tls13.HANDSHAKE]), bytes([tls13.ALERT])), reply
    assert status != 0
    status, output = handshake(daemon, Client("gnutls"), "nfs2.example.org", pki / "ca.pem")
    assert status == 0 and received(output) == {"cert-nfs2"}, output


# ---------------------------------------------------------------- the rule and the config, without a daemon

def test_the_choice_rule() -> None:
    config = parse(SNI_SECTION.format(d="/etc/hsd"), "hsd.conf")
    assert [pair.name for pair in config.sni] == ["nfs1.example.org", "nfs2.example.org", "*.example.net"]
    assert config.sni[1].where == "hsd.conf:4"

    def chosen(host_name: bytes | None) -> str | None:
        pair = sni.choose(config.sni, host_name)
        return pair.name if pair is not None else None

    assert chosen(b"NFS1.example.org.") == "nfs1.example.org"
    assert chosen(b"x.example.net") == "*.example.net"
    assert chosen(b"x.y.example.net") is None
    assert chosen(b"example.net") is None
    assert chosen(b"*.example.net") is None  # a wildcard is never a name a client selects by
    assert chosen(b"nfs1.example.org..") is None
    assert chosen(b"nfs1.example.org\x00.evil") is None
    assert chosen(b"\xff" * 300) is None
    assert chosen(b"") is None and chosen(None) is None


@pytest.mark.parametrize("line,words", [
    ("*.org = /a;/b", "wildcard"),
    ("a.*.example.org = /a;/b", "not letters"),
    ("f*.example.org = /a;/b", "not letters"),
    ("10.0.0.1 = /a;/b", "IP address"),
    ("::1 = /a;/b", "IP address"),
    ("bad_name.example = /a;/b", "not letters"),
    ("a.example.org = /only-a-certificate", "two paths"),
    ("a.example.org = /a;/b;/c", "two paths"),
    ("a.example.org = ;/b", "two paths"),
])
def test_a_bad_sni_line_is_an_error_naming_file_and_line(line: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[hsd]\nbackend=openssl\n[hsd.server.sni]\n{line}\n", "/etc/tlshd.conf")
    assert str(caught.value).startswith("/etc/tlshd.conf:4: [hsd.server.sni] ")
    assert words in str(caught.value)


def test_the_same_name_twice_is_an_error_naming_both_lines() -> None:
    with pytest.raises(ConfigError, match=r"hsd.conf:3: \[hsd.server.sni\] a.example.org is already configured "
                                          r"at hsd.conf:2"):
        parse("[hsd.server.sni]\na.example.org = /a;/b\nA.Example.Org. = /c;/d\n", "hsd.conf")


def test_a_section_name_typo_names_the_section() -> None:
    with pytest.raises(ConfigError, match=r"did you mean \[hsd.server.sni\]"):
        parse("[hsd.server.snl]\na.example.org = /a;/b\n")


def test_the_server_name_parser_reads_a_real_client_hello() -> None:
    records = _real_client_hello("nfs1.example.org")
    message = tls13.handshake_bytes([records])
    assert tls13.server_name(message) == b"nfs1.example.org"


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_a_client_hello_split_over_three_records_still_selects_by_name(daemon: Daemon, pki: Path) -> None:
    """A relay re-frames the client's first record into three (legal TLS): hsd reads all three ahead, the
    library gets them back in order, and the name still chooses the certificate."""
    import threading

    with peers.Listener() as front, peers.Listener() as back:
        process = PeerProcess(Client("openssl").argv(front.port, "nfs2.example.org", pki / "ca.pem"), "openssl")
        process.start()
        try:
            client = front.accept()
            relay = socket.create_connection((peers.LOOPBACK, back.port))
            sock = back.accept()
            with client, relay:
                request = daemon.sim.server_hello_x509(sock, timeout_ms=8000)
                client.settimeout(10)
                header = _recv_exact(client, 5)
                body = _recv_exact(client, int.from_bytes(header[3:5], "big"))
                cuts = (0, 3, len(body) // 2, len(body))  # the first piece even splits the message header
                relay.sendall(b"".join(header[:3] + (b - a).to_bytes(2, "big") + body[a:b]
                                       for a, b in zip(cuts, cuts[1:])))
                threads = [threading.Thread(target=_pipe, args=pair, daemon=True)
                           for pair in ((client, relay), (relay, client))]
                for thread in threads:
                    thread.start()
                try:
                    status, _ = request.wait(20)
                    assert status == 0, daemon.text()[-3000:]
                    output = process.wait_for(Client("openssl").completed, timeout=10)
                finally:
                    sock.close()
        finally:
            process.stop()
    assert received(output) == {"cert-nfs2"}, output


def test_bytes_that_are_no_tls_still_get_the_library_s_answer(daemon: Daemon) -> None:
    """hsd reads ahead only what is a handshake record: an HTTP request reaches the library as it was sent."""
    before = daemon.text().count("status=13 (EACCES): peer sent something that is not TLS (")
    with peers.Listener() as listener:
        peer = socket.create_connection((peers.LOOPBACK, listener.port))
        with peer:
            sock = listener.accept()
            try:
                request = daemon.sim.server_hello_x509(sock, timeout_ms=3000)
                peer.sendall(b"GET / HTTP/1.1\r\nHost: nfs1.example.org\r\n\r\n")
                status, _ = request.wait(15)
            finally:
                sock.close()
            peer.settimeout(10)
            try:
                reply = peer.recv(7)
            except ConnectionResetError:  # closed with our request unread
                reply = b""
    # the library judged the first bytes itself (OpenSSL sends nothing to HTTP, tlslite an alert), as it
    # does without [hsd.server.sni]: hsd's own read-ahead would have refused it silently, with another reason
    assert reply[:1] in (b"", bytes([tls13.ALERT])), reply
    assert status == errno.EACCES
    deadline = time.monotonic() + 10
    while daemon.text().count("status=13 (EACCES): peer sent something that is not TLS (") <= before:
        assert time.monotonic() < deadline, daemon.text()[-2000:]
        time.sleep(0.05)


# ---------------------------------------------------------------- start, status, check

def test_start_warns_of_an_sni_certificate_that_expires_soon_naming_its_line(daemon: Daemon) -> None:
    line = next(n for n, text in enumerate(daemon.config.read_text().split("\n"), 1) if text.startswith("soon."))
    assert (f"{daemon.config}:{line}: [hsd.server.sni] soon.example.org = " in daemon.text()
            and "cert-soon.pem: the certificate CN=cert-soon expires in 5 days" in daemon.text()), daemon.text()


def test_hsd_status_lists_every_sni_certificate_with_its_days_left(daemon: Daemon, pki: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "hsd.cli", "status", "--socket", str(daemon.control), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    files = {row["path"]: row for row in json.loads(result.stdout)["files"]}
    for common_name in ("cert-default", "cert-nfs1", "cert-nfs2", "cert-wild", "cert-soon"):
        row = files[str(pki / f"{common_name}.pem")]
        assert f"CN={common_name}" in row["what"] and not row["expired"], row
    assert files[str(pki / "cert-nfs2.pem")]["key"].endswith(": [hsd.server.sni] nfs2.example.org")
    assert files[str(pki / "cert-soon.pem")]["days"] == 5


from test_check import check_errors, daemon_errors, hsd, start_daemon  # noqa: E402  the same harness as test_check

# (id, [hsd.server.sni] lines with {d} for the PKI, [hsd] lines, words the one error must contain)
SNI_REFUSALS = [
    ("missing-certificate", "nfs1.example.org = {d}/absent.pem;{d}/cert-nfs1.key\n", "",
     [":7: [hsd.server.sni] nfs1.example.org = ", "absent.pem: cannot read it: No such file or directory"]),
    ("certificate-does-not-parse", "nfs1.example.org = {d}/garbage.pem;{d}/cert-nfs1.key\n", "",
     [":7: [hsd.server.sni] nfs1.example.org: ", "garbage.pem: not a certificate"]),
    ("key-does-not-match", "a.example.org = {d}/cert-nfs1.pem;{d}/cert-nfs1.key\n"
                           "nfs1.example.org = {d}/cert-nfs1.pem;{d}/cert-nfs2.key\n", "",
     [":8: [hsd.server.sni] nfs1.example.org (its private key) = ", "cert-nfs2.key is not the private key of ",
      ":8: [hsd.server.sni] nfs1.example.org = ", "(their public keys differ)"]),
    ("loose-key-when-strict", "nfs1.example.org = {d}/cert-nfs1.pem;{d}/loose.key\n", "strict_permissions=true\n",
     [":8: [hsd.server.sni] nfs1.example.org (its private key): ", "loose.key: private key file is accessible",
      "strict_permissions refuses it"]),
]


@pytest.mark.parametrize("lines,hsd_extra,words", [r[1:] for r in SNI_REFUSALS], ids=[r[0] for r in SNI_REFUSALS])
def test_check_and_the_daemon_refuse_a_bad_sni_pair_naming_file_and_line(pki: Path, tmp_path: Path, lines: str,
                                                                         hsd_extra: str, words: list[str]) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(_config(pki, "openssl", "[hsd.server.sni]\n" + lines, hsd_extra))
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    errors = check_errors(checked)
    assert len(errors) == 1 and errors[0].startswith(str(config)), checked.stdout
    assert all(word in errors[0] for word in words), errors[0]
    with Simulator() as sim:
        started = start_daemon(config, sim, tmp_path)
        assert started.returncode == 2 and daemon_errors(started.stderr) == errors, started.stderr
        assert sim.stats.accepted == 0
    assert "Traceback" not in checked.stderr + started.stderr


def test_check_reports_each_sni_pair_it_loaded(pki: Path, tmp_path: Path) -> None:
    config = tmp_path / "tlshd.conf"
    config.write_text(_config(pki, "openssl"))
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("configuration OK"), checked.stdout
    assert f"[hsd.server.sni] nfs2.example.org={pki}/cert-nfs2.pem;{pki}/cert-nfs2.key\n" in checked.stdout
    assert "warning" not in checked.stderr, checked.stderr  # each certificate names its entry
    for line, name, common_name in ((7, "nfs1.example.org", "cert-nfs1"), (9, "nfs2.example.org", "cert-nfs2"),
                                    (10, "*.example.net", "cert-wild")):
        assert f"{config}:{line}: [hsd.server.sni] {name}: CN={common_name}, 1 certificate(s)" in checked.stdout, \
            checked.stdout


def _wait_for(daemon: Daemon, words: str, count: int = 1) -> None:
    deadline = time.monotonic() + 15
    while daemon.text().count(words) < count:
        assert time.monotonic() < deadline, daemon.text()[-3000:]
        time.sleep(0.05)


def test_a_reload_applies_new_pairs_and_a_broken_pair_keeps_the_running_ones(pki: Path, tmp_path: Path) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text(_config(pki, "openssl"))
    with Simulator() as sim:
        daemon = Daemon(sim, config, tmp_path / "hsd.log")
        try:
            assert received(handshake(daemon, Client("openssl"), "nfs1.example.org", pki / "ca.pem")[1]) == {"cert-nfs1"}
            # nfs1 now gets nfs2's pair, and a new name appears
            config.write_text(_config(pki, "openssl", "[hsd.server.sni]\n"
                                      "nfs1.example.org = {d}/cert-nfs2.pem;{d}/cert-nfs2.key\n"
                                      "new.example.org = {d}/cert-wild.pem;{d}/cert-wild.key\n"))
            daemon.proc.send_signal(signal.SIGHUP)
            _wait_for(daemon, "configuration reloaded")
            assert received(handshake(daemon, Client("gnutls"), "nfs1.example.org", pki / "ca.pem")[1]) == {"cert-nfs2"}
            assert received(handshake(daemon, Client("openssl"), "new.example.org", pki / "ca.pem")[1]) == {"cert-wild"}
            # a reload whose pair does not match is refused as a whole: the running pairs stay
            config.write_text(_config(pki, "openssl", "[hsd.server.sni]\n"
                                      "nfs1.example.org = {d}/cert-nfs1.pem;{d}/cert-nfs2.key\n"))
            daemon.proc.send_signal(signal.SIGHUP)
            _wait_for(daemon, "cert-nfs2.key is not the private key of")
            assert received(handshake(daemon, Client("openssl"), "nfs1.example.org", pki / "ca.pem")[1]) == {"cert-nfs2"}
            assert received(handshake(daemon, Client("openssl"), "new.example.org", pki / "ca.pem")[1]) == {"cert-wild"}
        finally:
            assert daemon.stop() == 0, daemon.text()
    assert "Traceback" not in daemon.text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_isolation_process_the_child_gets_the_client_hello_hsd_read_ahead(pki: Path, tmp_path: Path,
                                                                               backend: str) -> None:
    """The read-ahead belongs to the socket: a forked handshake child replays it as a thread would."""
    config = tmp_path / "hsd.conf"
    config.write_text(_config(pki, backend, hsd_extra="isolation=process\n"))
    with Simulator() as sim:
        daemon = Daemon(sim, config, tmp_path / "hsd.log")
        try:
            for name, expected in (("nfs2.example.org", "cert-nfs2"), (None, "cert-default")):
                status, output = handshake(daemon, Client("openssl"), name, pki / "ca.pem")
                assert status == 0 and received(output) == {expected}, output + daemon.text()[-2000:]
        finally:
            assert daemon.stop() == 0, daemon.text()


def test_check_warns_of_a_pair_whose_certificate_does_not_name_its_entry(pki: Path, tmp_path: Path) -> None:
    """A typo in the mapping would make every verifying client fail with a name mismatch: say so up front."""
    config = tmp_path / "tlshd.conf"
    config.write_text(_config(pki, "openssl", "[hsd.server.sni]\n"
                              "nfs1.example.org = {d}/cert-nfs2.pem;{d}/cert-nfs2.key\n"  # nfs2's certificate
                              "host.example.net = {d}/cert-wild.pem;{d}/cert-wild.key\n"  # *.example.net names it
                              "*.example.net = {d}/cert-nfs1.pem;{d}/cert-nfs1.key\n"))  # no wildcard SAN
    checked = hsd("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # a warning: the pair still loads
    warnings = [line for line in checked.stderr.splitlines() if line.startswith("hsd: warning: ")]
    assert warnings == [
        f"hsd: warning: {config}:7: [hsd.server.sni] nfs1.example.org = {pki}/cert-nfs2.pem: the certificate does "
        "not name nfs1.example.org in its subjectAltName; clients that verify the server's name refuse it",
        f"hsd: warning: {config}:9: [hsd.server.sni] *.example.net = {pki}/cert-nfs1.pem: the certificate does "
        "not name *.example.net in its subjectAltName; clients that verify the server's name refuse it",
    ], checked.stderr
    strict = hsd("check", "--strict", "-c", str(config), cwd=tmp_path)
    assert strict.returncode == 2 and "configuration FAILED (--strict): 2 warning(s)" in strict.stdout, strict.stdout


def test_without_a_default_pair_an_unmatched_name_gets_access_denied_and_a_listed_one_its_pair(
        pki: Path, tmp_path: Path) -> None:
    config = tmp_path / "hsd.conf"
    config.write_text("[hsd]\nbackend=openssl\n[hsd.server.sni]\n"
                      f"nfs1.example.org = {pki}/cert-nfs1.pem;{pki}/cert-nfs1.key\n")
    with Simulator() as sim:
        daemon = Daemon(sim, config, tmp_path / "hsd.log")
        try:
            status, output = handshake(daemon, Client("openssl"), "nfs1.example.org", pki / "ca.pem")
            assert status == 0 and received(output) == {"cert-nfs1"}, output
            for name in ("nfs2.example.org", None):
                status, output = handshake(daemon, Client("openssl"), name, pki / "ca.pem")
                assert status == errno.EIO and "access denied" in output, output
                assert received(output) == set(), output
            _wait_for(daemon, "no [hsd.server.sni] name matched the client's server_name", 2)
        finally:
            assert daemon.stop() == 0, daemon.text()


def test_after_a_hello_retry_request_the_pair_chosen_from_the_first_client_hello_stays(pki: Path,
                                                                                      tmp_path: Path) -> None:
    """The server asks for another key share: the library reads the second ClientHello itself, after the
    replayed first one, and the certificate is still the one the first ClientHello's name chose.

    The openssl backend only: the daemon's OpenSSL is given X25519 as its only group (an OpenSSL config
    file, OPENSSL_CONF), so the client's P-521 key share makes it retry on every OpenSSL, the 3.3 of
    cryptography 43's wheel (the lowest-versions run) included, which would otherwise take P-521 (3.5
    and later retry it for X25519 by their own preference); tlslite-ng serves every group an OpenSSL or
    GnuTLS client can offer and takes the client's key share, so no real client makes it retry."""
    config = tmp_path / "hsd.conf"
    config.write_text(_config(pki, "openssl"))
    openssl_conf = tmp_path / "openssl.cnf"
    openssl_conf.write_text("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = groups\n"
                            "[groups]\nGroups = X25519\n")
    with Simulator() as sim:
        daemon = Daemon(sim, config, tmp_path / "hsd.log", env={"OPENSSL_CONF": str(openssl_conf)})
        try:
            client = Client("openssl", ("-groups", "P-521:X25519", "-msg"))
            status, output = handshake(daemon, client, "nfs2.example.org", pki / "ca.pem")
        finally:
            assert daemon.stop() == 0, daemon.text()
    assert status == 0, output
    assert output.count("ClientHello") == 2, output  # the retry happened
    assert received(output) == {"cert-nfs2"}, output


def test_the_debug_line_names_the_files_of_the_pair_the_name_chose(daemon: Daemon, pki: Path) -> None:
    for name, chosen in (("nfs1.example.org", "cert-nfs1"), ("other.example.org", "cert-default")):
        before = daemon.text().count(" -> backend ")
        status, _ = handshake(daemon, Client("openssl"), name, pki / "ca.pem")
        assert status == 0
        _wait_for(daemon, " -> backend ", before + 1)
        line = [text for text in daemon.text().splitlines() if " -> backend " in text][-1]
        assert f"certificate {pki}/{chosen}.pem (1 in chain), private key {pki}/{chosen}.key" in line, line
