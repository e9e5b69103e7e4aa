"""Hostile TLS peers on both roles: the handshake fails with the right status, the daemon stays up.

Raw Python sockets speak bytes at hsd (malformed, oversized, unexpected
records, alerts and KeyUpdate mid-handshake), and a record-level proxy in
front of real openssl peers corrupts Finished, or re-fragments a hello into
1-byte records (legal TLS: that handshake must succeed).  TLS 1.2-only peers
(`-tls1_2`) stand for downgrade attempts.  Every case runs on the OpenSSL and
the tlslite backend and ends with a real handshake through the same daemon.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

import hsd_openssl
import hsd_psk
import hsd_tlslite
from hsd.config import Config
from hsd.errors import HandshakeTimeout, PeerRejected
from hsd_kit.simulator import Simulator
from hsd_kit.harness import DaemonHarness
from hsd_kit.soak import tcp_pair
from hsd_kit.peers import (LOOPBACK, PeerOptions, PeerProcess, ServerPeer, free_port, openssl_client,
                               openssl_server)
from hsd_kit.pki import TestPki, make_pki

from flightproxy import FlightProxy

WAIT = 20.0
REJECTED = PeerRejected.status  # EACCES
TIMED_OUT = HandshakeTimeout.status
BACKENDS = ["openssl", "tlslite"]

# Inputs a library does not reject but waits on (more fragments, or the rest of a huge message):
# the handshake deadline bounds them, so the status is ETIMEDOUT, never a hang or a crash.
# tlslite reads on towards a declared 16 MiB handshake message (the handshake read limit stops a
# peer that sends it: tests/test_bytecap.py).  hsd.wire hands every record to the library, and
# OpenSSL ignores a zero-length handshake record, as it does on its own socket
# (tests/test_record_alerts.py), then waits for the hello.
DEADLINE_BOUNDED = {
    ("huge-clienthello-length", "tlslite"),
    ("huge-serverhello-length", "tlslite"),
    ("empty-handshake-record", "openssl"),
}


def expected(case: str, backend: str) -> int:
    return TIMED_OUT if (case, backend) in DEADLINE_BOUNDED else REJECTED

# --- raw records -------------------------------------------------------------------------------


def record(content_type: int, body: bytes, version: bytes = b"\x03\x03") -> bytes:
    return bytes([content_type]) + version + len(body).to_bytes(2, "big") + body


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


FATAL_HANDSHAKE_FAILURE = record(21, b"\x02\x28")
KEY_UPDATE = record(22, handshake(24, b"\x01"))  # update_requested, in plaintext, before any key exists
NOT_TLS = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
OVERSIZED = b"\x16\x03\x03\x48\x01" + b"\x00" * 64  # length 18433 > 2^14 + 256
BAD_VERSION = record(22, handshake(1, b"\x03\x03" + b"\x00" * 40), version=b"\x02\x00")
UNKNOWN_TYPE = record(24, b"\x01\x00\x10")  # heartbeat (RFC 6520): not a TLS 1.3 content type
EMPTY_HANDSHAKE = record(22, b"")
HUGE_MESSAGE = record(22, b"\x01\xff\xff\xff" + b"\x03\x03" + b"\x00" * 32)  # a 16 MiB ClientHello
SERVER_HELLO_START = record(22, handshake(2, b"\x03\x03" + b"\x00" * 20))  # truncated, then more garbage

SERVER_SIDE_CASES = {  # bytes a hostile client sends to hsd's server
    "not-tls": NOT_TLS,
    "oversized-record": OVERSIZED,
    "bad-record-version": BAD_VERSION,
    "unknown-content-type": UNKNOWN_TYPE,
    "empty-handshake-record": EMPTY_HANDSHAKE,
    "keyupdate-instead-of-hello": KEY_UPDATE,
    "alert-instead-of-hello": FATAL_HANDSHAKE_FAILURE,
    "huge-clienthello-length": HUGE_MESSAGE,
    "server-hello-from-a-client": SERVER_HELLO_START + b"\x00" * 40,
}
CLIENT_SIDE_CASES = {  # what a hostile server answers to hsd's ClientHello
    "not-tls": NOT_TLS,
    "oversized-record": OVERSIZED,
    "unknown-content-type": UNKNOWN_TYPE,
    "empty-handshake-record": EMPTY_HANDSHAKE,
    "keyupdate-instead-of-serverhello": KEY_UPDATE,
    "alert-instead-of-serverhello": FATAL_HANDSHAKE_FAILURE,
    "huge-serverhello-length": record(22, b"\x02\xff\xff\xff" + b"\x00" * 34),
    "clienthello-from-a-server": record(22, handshake(1, b"\x03\x03" + b"\x00" * 34)),
}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@contextmanager
def daemon(pki: TestPki, backend: str, *, psk: bool = False) -> Iterator[tuple[Simulator, DaemonHarness]]:
    """The in-process daemon on a simulator, both backends loaded (and the PSK policy if psk)."""
    config = Config(backend=backend, handshake_timeout_ms=3000)
    config.client.truststore = pki.ca
    config.server.truststore = pki.ca
    config.server.certificate, config.server.private_key = pki.server.chain, pki.server.key
    with Simulator() as sim:
        plugins = {"openssl": hsd_openssl, "tlslite": hsd_tlslite} | ({"psk": hsd_psk} if psk else {})
        running = DaemonHarness(None, config, sim=sim, extra_plugins=plugins, discover=False).start()
        try:
            yield sim, running
            still_serves(sim, pki)
        finally:
            running.stop()
        assert running.error is None


def still_serves(sim: Simulator, pki: TestPki) -> None:
    """After the hostile peer: a real client handshake and a real server handshake both succeed."""
    with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
        mine = socket.create_connection(server.address)
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
        assert req.wait(WAIT)[0] == 0, "the daemon no longer serves clients"
        mine.close()
    status, _ = server_handshake_with(sim, PeerOptions(ca=pki.ca))
    assert status == 0, "the daemon no longer serves servers"


def server_handshake_with(sim: Simulator, opts: PeerOptions, proxy_args: dict | None = None,
                          client_argv: list[str] | None = None) -> tuple[int, str]:
    """hsd as server, a real s_client connecting (through a FlightProxy if proxy_args; client_argv:
    an s_client command line without -connect, instead of the test kit's TLS 1.3 one)."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        proxy = FlightProxy(listener.getsockname(), hsd_is_client=False, **proxy_args) if proxy_args else None
        port = proxy.port if proxy else listener.getsockname()[1]
        try:
            peer = (PeerProcess(client_argv + ["-connect", f"{LOOPBACK}:{port}"], "s_client") if client_argv
                    else openssl_client(opts, port))
            with peer.start() as client:
                listener.settimeout(WAIT)
                conn, _ = listener.accept()
                req = sim.server_hello_x509(conn, timeout_ms=5000)
                status = req.wait(WAIT)[0]
                assert req.done_calls == 1
                conn.close()
                output = client.output
        finally:
            if proxy:
                proxy.close()
    return status, output


FINISHED_RECORD_SIZES = (4 + 32 + 1 + 16, 4 + 48 + 1 + 16)  # header + verify_data + inner type + tag


class CorruptFinished:
    """Flip one ciphertext byte of the encrypted record carrying Finished in `flight`.

    OpenSSL sends each TLS 1.3 handshake message in its own record, unpadded, so
    the Finished record is the application_data record of exactly that size."""

    def __init__(self, flight: int) -> None:
        self.flight = flight
        self.flipped = 0

    def __call__(self, at: int, index: int, direction: str, rec: bytes) -> list[bytes]:
        if at == self.flight and rec[0] == 23 and len(rec) - 5 in FINISHED_RECORD_SIZES:
            body = bytearray(rec)
            body[5 + 4] ^= 0x80  # inside the encrypted verify_data
            self.flipped += 1
            return [bytes(body)]
        return [rec]


def fragment_hello(flight: int) -> Callable[[int, int, str, bytes], list[bytes]]:
    """Re-send the first (plaintext handshake) record of the flight as 1-byte-fragment records."""

    def mutate(at: int, index: int, direction: str, rec: bytes) -> list[bytes]:
        if at == flight and index == 0 and rec[0] == 22:
            return [rec[:3] + b"\x00\x01" + rec[5 + i:6 + i] for i in range(len(rec) - 5)]
        return [rec]

    return mutate


# --- hsd as server -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(SERVER_SIDE_CASES))
def test_server_rejects_hostile_bytes(pki, backend, case):
    with daemon(pki, backend) as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.server_hello_x509(mine, timeout_ms=3000)
        theirs.sendall(SERVER_SIDE_CASES[case])
        status = req.wait(WAIT)[0]
        assert req.done_calls == 1 and req.ktls_tx is None
        mine.close(); theirs.close()
    assert status == expected(case, backend), running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_clienthello_in_one_byte_fragments_succeeds(pki, backend):
    with daemon(pki, backend) as (sim, running):
        status, output = server_handshake_with(sim, PeerOptions(ca=pki.ca), {"mutate": fragment_hello(1)})
    assert status == 0, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_rejects_a_corrupted_client_finished(pki, backend):
    corrupt = CorruptFinished(3)
    with daemon(pki, backend) as (sim, running):
        status, _ = server_handshake_with(sim, PeerOptions(ca=pki.ca), {"mutate": corrupt})
    assert corrupt.flipped == 1
    assert status == REJECTED, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_rejects_a_tls12_only_client(pki, backend):
    with daemon(pki, backend) as (sim, running):
        status, output = server_handshake_with(sim, PeerOptions(), client_argv=[
            "openssl", "s_client", "-tls1_2", "-ign_eof", "-CAfile", pki.ca])
    assert status == REJECTED, running.outcomes[0].line()


INJECTED = {"fatal-alert": FATAL_HANDSHAKE_FAILURE, "plaintext-keyupdate": KEY_UPDATE}


def inject_after_first_record(flight: int, injected: bytes) -> Callable[[int, int, str, bytes], list[bytes]]:
    """Let the flight's first record through, then send `injected` instead of the rest of it."""

    def mutate(at: int, index: int, direction: str, rec: bytes) -> list[bytes]:
        if at != flight:
            return [rec]
        return [rec, injected] if index == 0 else []

    return mutate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", sorted(INJECTED))
def test_server_unexpected_record_instead_of_client_finished(pki, backend, what):
    """After our flight the client sends an alert or a KeyUpdate instead of its Finished."""

    def instead(at: int, index: int, direction: str, rec: bytes) -> list[bytes]:
        return [INJECTED[what]] if at == 3 and index == 0 else ([] if at == 3 else [rec])

    with daemon(pki, backend) as (sim, running):
        status, _ = server_handshake_with(sim, PeerOptions(ca=pki.ca), {"mutate": instead})
    assert status == REJECTED, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", sorted(INJECTED))
def test_client_unexpected_record_after_server_hello(pki, backend, what):
    """The server's ServerHello arrives, then an alert or a plaintext KeyUpdate mid-handshake."""
    with daemon(pki, backend) as (sim, running):
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
            status = client_handshake_via_proxy(sim, server, mutate=inject_after_first_record(2, INJECTED[what]))
    assert status == REJECTED, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_trickle_of_tiny_records_is_bounded_by_the_deadline(pki, backend):
    """A slow-loris client: a valid record header every so often, never a whole hello."""
    with daemon(pki, backend) as (sim, running):
        mine, theirs = tcp_pair()
        req = sim.server_hello_x509(mine, timeout_ms=1000)
        theirs.sendall(b"\x16\x03\x01\x00\x01")  # a record header whose one-byte body never comes
        status = req.wait(WAIT)[0]
        mine.close(); theirs.close()
    assert status == TIMED_OUT


# --- hsd as client ------------------------------------------------------------------------------------


@contextmanager
def raw_server(answer: bytes) -> Iterator[tuple[str, int]]:
    """Reads hsd's ClientHello record, answers with `answer`, then holds the connection open."""
    listener = socket.create_server((LOOPBACK, 0))
    done = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(WAIT)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conns.append(conn)
        conn.settimeout(WAIT)
        try:
            header = conn.recv(5, socket.MSG_WAITALL)
            conn.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL)
            conn.sendall(answer)
        except OSError:
            pass
        done.wait(WAIT)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        done.set()
        thread.join(WAIT)
        listener.close()
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CLIENT_SIDE_CASES))
def test_client_rejects_hostile_server(pki, backend, case):
    with daemon(pki, backend) as (sim, running):
        with raw_server(CLIENT_SIDE_CASES[case]) as address:
            mine = socket.create_connection(address)
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=3000)
            status = req.wait(WAIT)[0]
            assert req.done_calls == 1 and req.ktls_tx is None
            mine.close()
    assert status == expected(case, backend), running.outcomes[0].line()


def client_handshake_via_proxy(sim: Simulator, server: ServerPeer, **proxy_args) -> int:
    with FlightProxy(server.address, hsd_is_client=True, **proxy_args) as proxy:
        mine = socket.create_connection(proxy.address)
        req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000)
        status = req.wait(WAIT)[0]
        assert req.done_calls == 1
        mine.close()
    return status


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_serverhello_in_one_byte_fragments_succeeds(pki, backend):
    with daemon(pki, backend) as (sim, running):
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
            status = client_handshake_via_proxy(sim, server, mutate=fragment_hello(2))
    assert status == 0, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_rejects_a_corrupted_server_finished(pki, backend):
    corrupt = CorruptFinished(2)
    with daemon(pki, backend) as (sim, running):
        with openssl_server(PeerOptions(cert=pki.server.cert, key=pki.server.key)).start() as server:
            status = client_handshake_via_proxy(sim, server, mutate=corrupt)
    assert corrupt.flipped == 1
    assert status == REJECTED, running.outcomes[0].line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_rejects_a_tls12_only_server(pki, backend):
    """A downgrade: the server only speaks TLS 1.2; hsd offers 1.3 only and must not fall back."""
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"{LOOPBACK}:{port}", "-tls1_2", "-naccept", "1",
            "-cert", pki.server.cert, "-key", pki.server.key]
    with daemon(pki, backend) as (sim, running):
        with ServerPeer(argv, "openssl s_server -tls1_2", port).start() as server:
            mine = socket.create_connection(server.address)
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=5000)
            status = req.wait(WAIT)[0]
            mine.close()
    assert status == REJECTED, running.outcomes[0].line()
    assert req.ktls_tx is None
