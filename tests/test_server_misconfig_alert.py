"""A misconfigured server answers the client with a fatal alert at once (issue 15, point 2).

tlshd 1.3.1 and later send access_denied (49) when the server has no usable
certificate or key, instead of closing the connection silently: a client that
only sees the close takes it for a transient failure (NFS, NVMe retry until
their own timeout).  hsd does the same for every backend, from the core
(hsd.tls13.refuse_handshake), and a PSK server whose key for the offered
identity is missing or unusable answers unknown_psk_identity (115).  DONE
carries the status it always did (EIO for our own credentials, EKEYREJECTED
for an identity no keyring holds) and no remote identity.

Real parts: the kernel simulator and the dispatcher with the built-in
backends (DaemonHarness), real openssl s_client and gnutls-cli, real kernel
keyrings.  The consumer's socket stays open until the client has exited, as
the kernel keeps it until the consumer closes it: without the alert the client
would wait for the server's hello until it is killed, so its prompt exit and
the alert it prints are what these tests prove.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hsd.config import Config
from hsd_kit import matrix, peers
from hsd_kit.harness import DaemonHarness, Finished
from hsd_kit.keyrings import ThrowawayKeyring
from hsd_kit.pki import TestPki

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-cli")),
                                reason="needs the openssl and gnutls-bin command-line tools")

BACKENDS = matrix.BUILTIN_BACKENDS
CLIENTS = ("openssl", "gnutls")
HANDSHAKE_TIMEOUT_MS = 20000  # the request's own timeout: a client still waiting at its end had no alert
ACCESS_DENIED = 49
UNKNOWN_PSK_IDENTITY = 115
ALERT_RECORD = bytes.fromhex("15 03 03 00 02 02")  # plaintext fatal alert, legacy version 3.3; description follows
PSK_IDENTITY = "hsd-test misconfigured-psk"  # no NVMe identity: the key length must name the hash


def alert_pattern(client: str, description: int) -> str:
    """What each real client prints for a fatal alert it received."""
    if client == "openssl":
        return rf"SSL alert number {description}\b"
    return rf"Received alert \[{description}\]"


@pytest.fixture(scope="module")
def pki(hsd_pki: TestPki) -> TestPki:
    return hsd_pki


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonHarness]:
    with DaemonHarness() as harness:
        yield harness


def server_config(pki: TestPki, backend: str, **server: object) -> Config:
    """[authenticate.server] as given (nothing more: a server that lacks what the case leaves out)."""
    config = Config(backend=backend)
    config.server = dataclasses.replace(config.server, truststore=pki.ca, **server)
    return config


def x509_client(client: str, pki: TestPki, port: int) -> peers.PeerProcess:
    opts = peers.PeerOptions(ca=pki.ca)
    return (peers.openssl_client if client == "openssl" else peers.gnutls_client)(opts, port)


def psk_client(client: str, psk: peers.PskSecret, port: int) -> peers.PeerProcess:
    return (peers.openssl_psk_client if client == "openssl" else peers.gnutls_psk_client)(psk, port)


def serve_refused(daemon: DaemonHarness, process: peers.PeerProcess, listener: peers.Listener,
                  submit: Callable[[socket.socket], object], status: int, client: str, description: int) -> Finished:
    """One server request the daemon must refuse: its DONE; the client has exited and printed the alert."""
    with process:
        sock = listener.accept()
        with sock:
            finished = daemon.finish(submit(sock)).expect(status)  # type: ignore[arg-type]
            try:
                code = process.wait_exit(HANDSHAKE_TIMEOUT_MS / 1000)  # the socket is still open: only an alert ends it
            except Exception:
                pytest.fail(f"{process.name} still waits for the server after DONE; output:\n{process.output}")
            assert code != 0, f"{process.name} reports success; output:\n{process.output}"
            # the output may still be in the pipe: read to its end (PeerError if the alert is not in it)
            process.wait_for(alert_pattern(client, description), HANDSHAKE_TIMEOUT_MS / 1000)
    return finished


def assert_refused(finished: Finished, reason: str) -> None:
    assert finished.remote_auth == (), finished.describe()
    assert re.search(reason, finished.outcome.reason), finished.describe()


# ---------------------------------------------------------------- x509: our certificate or key

def write_private(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return str(path)


X509_CASES = {
    # case -> (the [authenticate.server] it gets, what the DONE's reason names)
    "no-certificate": (lambda pki, tmp: {}, "no server certificate is configured"),
    "key-not-a-key": (lambda pki, tmp: {"certificate": pki.server.chain,
                                        "private_key": write_private(tmp, "garbage.key", b"-----BEGIN PRIVATE KEY-----\n"
                                                                     b"bm90IGEga2V5\n-----END PRIVATE KEY-----\n")},
                      "not an unencrypted private key"),
    "key-of-another-certificate": (lambda pki, tmp: {"certificate": pki.server.chain, "private_key": pki.client.key},
                                   "is not the private key of"),
    "key-file-missing": (lambda pki, tmp: {"certificate": pki.server.chain, "private_key": str(tmp / "absent.key")},
                         "absent.key"),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", sorted(X509_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_x509_server_without_usable_credentials_sends_access_denied(
        daemon: DaemonHarness, pki: TestPki, tmp_path: Path, backend: str, case: str, client: str) -> None:
    server, reason = X509_CASES[case]
    daemon.reconfigure(server_config(pki, backend, **server(pki, tmp_path)), backend)
    with peers.Listener() as listener:
        process = x509_client(client, pki, listener.port)
        finished = serve_refused(
            daemon, process, listener,
            lambda sock: daemon.server_hello_x509(sock, timeout_ms=HANDSHAKE_TIMEOUT_MS), errno.EIO,
            client, ACCESS_DENIED)
    assert_refused(finished, reason)


# ---------------------------------------------------------------- PSK: the key for the offered identity

def psk_of(length: int) -> peers.PskSecret:
    return peers.PskSecret(PSK_IDENTITY, secrets.token_bytes(length), "sha256")


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", ["no-keyring", "identity-not-in-keyring", "key-unusable"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_psk_server_without_a_usable_key_sends_unknown_psk_identity(
        daemon: DaemonHarness, pki: TestPki, hsd_keyring: ThrowawayKeyring, backend: str, case: str,
        client: str) -> None:
    psk = psk_of(16 if case == "key-unusable" else 32)  # 16 bytes: neither SHA-256 nor SHA-384 sized
    keyring = 0
    if case == "identity-not-in-keyring":
        hsd_keyring.add("hsd-test someone-else", secrets.token_bytes(32))
        keyring = hsd_keyring.serial
    elif case == "key-unusable":
        hsd_keyring.add(psk.identity, psk.secret)
        keyring = hsd_keyring.serial
    status, reason = ((errno.EIO, "only 32 .SHA-256. or 48 .SHA-384. bytes") if case == "key-unusable"
                      else (errno.EKEYREJECTED, "unknown PSK identities"))
    daemon.reconfigure(server_config(pki, backend), backend)
    with peers.Listener() as listener:
        process = psk_client(client, psk, listener.port)
        finished = serve_refused(
            daemon, process, listener,
            lambda sock: daemon.server_hello_psk(sock, keyring=keyring, timeout_ms=HANDSHAKE_TIMEOUT_MS), status,
            client, UNKNOWN_PSK_IDENTITY)
    assert_refused(finished, reason)


# ---------------------------------------------------------------- adversarial: no ClientHello at all

def garbage_exchange(daemon: DaemonHarness, garbage: bytes) -> tuple[Finished, bytes]:
    """A peer that sends garbage (all of it before the request is queued), then reads what comes back."""
    with peers.Listener() as listener:
        with socket.create_connection(listener.sock.getsockname(), timeout=HANDSHAKE_TIMEOUT_MS / 1000) as peer:
            sock = listener.accept()
            with sock:
                peer.sendall(garbage)
                finished = daemon.finish(daemon.server_hello_x509(sock, timeout_ms=HANDSHAKE_TIMEOUT_MS))
                received = peer.recv(65536)
    return finished, received


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: nfs\r\n\r\n", b"\x16\x03\x03\xff\xff" + bytes(60000)],
                         ids=["http", "huge-record-header"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_instead_of_a_client_hello_still_gets_done_and_the_daemon_goes_on(
        daemon: DaemonHarness, pki: TestPki, backend: str, garbage: bytes) -> None:
    daemon.reconfigure(server_config(pki, backend), backend)
    finished, received = garbage_exchange(daemon, garbage)
    finished.expect(errno.EIO)
    assert received == ALERT_RECORD + bytes([ACCESS_DENIED])  # the alert and nothing else
    # still serving: a real client is refused the same way, then a configured server completes a handshake
    with peers.Listener() as listener:
        finished = serve_refused(
            daemon, x509_client("openssl", pki, listener.port), listener,
            lambda sock: daemon.server_hello_x509(sock, timeout_ms=HANDSHAKE_TIMEOUT_MS), errno.EIO,
            "openssl", ACCESS_DENIED)
    assert_refused(finished, "no server certificate is configured")
    good = next(case for case in matrix.MATRIX if case.name == "server-x509-openssl-aes-128-gcm-sha256")
    result = matrix.run_case(daemon, good, pki, backend)
    assert result.finished.status == 0 and result.roundtrip is not None


def test_a_configured_server_sends_no_alert_of_its_own_before_the_client_hello(
        daemon: DaemonHarness, pki: TestPki) -> None:
    """The alert belongs to the refusal only: a configured server is silent until the peer speaks."""
    config = server_config(pki, "openssl", certificate=pki.server.chain, private_key=pki.server.key)
    daemon.reconfigure(config, "openssl")
    with peers.Listener() as listener:
        with socket.create_connection(listener.sock.getsockname(), timeout=5) as peer:
            sock = listener.accept()
            with sock:
                request = daemon.server_hello_x509(sock, timeout_ms=1500)
                peer.settimeout(1.0)
                with pytest.raises(socket.timeout):
                    peer.recv(1)
                finished = daemon.finish(request).expect(errno.ETIMEDOUT)
    assert finished.remote_auth == ()
