"""The tlslite backend against real peers, and the same certificate matrix on the OpenSSL backend.

Real parts only: TCP sockets on loopback, openssl s_server/s_client and
gnutls-serv as independent peers, the test PKI, kernel keyrings for PSKs.
Every successful handshake is proved by exchanging data both ways with the
keys kTLS would get (hsd.ktls.session_crypto_info) through a user-space TLS 1.3
record layer.  Negative cases check the DONE status (errno) and the reason.
Handshake times are printed (-s), never asserted.
"""

from __future__ import annotations

import errno
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pluggy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import hsd_openssl
import hsd_psk
import hsd_tlslite
import hsd_tlslite.handshake
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials, parse_certificates, parse_crls, parse_private_key
from hsd.errors import HandshakeError
from hsd.hookspecs import PROJECT, HookSpecs
from hsd.ktls import session_crypto_info
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd.testing.pki import TestPki, make_pki

try:  # the shared test kit, once it has these
    from hsd.testing.peers import Peer, connect, free_port  # type: ignore[import-not-found]
    from hsd.testing.records import RecordLayer  # type: ignore[import-not-found]
except ImportError:  # until then, the PSK tests' helpers (tests/ is on sys.path under pytest)
    from test_psk import Peer, RecordLayer, connect, free_port  # type: ignore[no-redef]
from test_psk import GNUTLS_PRIORITY, ThrowawayKeyring, gnutls_server

TIMEOUT = 20.0
BACKENDS = ("tlslite", "openssl")
SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
          "TLS_AES_128_CCM_SHA256")
TIMINGS: dict[str, list[float]] = {}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    manager.register(hsd_tlslite, "tlslite")
    manager.register(hsd_openssl, "openssl")
    manager.register(hsd_psk, "psk")
    return manager


@pytest.fixture
def ring() -> Iterator[ThrowawayKeyring]:
    made = ThrowawayKeyring()
    yield made
    made.close()


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def certs(path: str) -> list[x509.Certificate]:
    return parse_certificates(_read(path), path)


def creds_for(pki: TestPki, pair=None, **kw) -> X509Credentials:
    made = X509Credentials(trust=certs(pki.ca), **kw)
    if pair is not None:
        made.chain = certs(pair.chain)
        made.key = parse_private_key(_read(pair.key), pair.key)
    return made


def run_handshake(plugins: pluggy.PluginManager, sock: socket.socket, backend: str, role: str, auth: str,
                  creds: X509Credentials | None = None, peername: str | None = "localhost",
                  timeout: float = TIMEOUT, config: Config | None = None, **request) -> Session:
    req = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode={"unauth": AuthMode.UNAUTH, "x509": AuthMode.X509, "psk": AuthMode.PSK}[auth],
        timeout_ms=int(timeout * 1000), peername=peername, **request)
    ctx = HandshakeContext(request=req, sock=sock, deadline=time.monotonic() + timeout, backend=backend,
                           config=config or Config(), x509=creds, hook=plugins.hook)
    started = time.perf_counter()
    session = plugins.hook.hsd_handshake(ctx=ctx)
    TIMINGS.setdefault(f"{backend} {role}/{auth}", []).append(time.perf_counter() - started)
    assert session is not None, f"no backend took {backend} {role}/{auth}"
    return session


def records_for(sock: socket.socket, session: Session) -> RecordLayer:
    sock.setblocking(True)
    sock.settimeout(TIMEOUT)
    tx, rx = session_crypto_info(session)
    return RecordLayer(sock, tx, rx)


@contextmanager
def openssl_server(pki: TestPki, *extra: str, pair=None) -> Iterator[tuple[int, Peer]]:
    """s_server -rev: reverses each line it gets, so one exchange proves both directions' keys."""
    port = free_port()
    pair = pair or pki.server
    peer = Peer(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", pair.cert, "-key", pair.key,
                 "-tls1_3", "-naccept", "1", "-rev", *extra])
    try:
        peer.wait_for(b"ACCEPT")
        yield port, peer
    finally:
        peer.stop()


@contextmanager
def openssl_client_of(port: int, *extra: str) -> Iterator[Peer]:
    peer = Peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet", *extra])
    try:
        yield peer
    finally:
        peer.stop()


@contextmanager
def listening() -> Iterator[tuple[socket.socket, int]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        yield server, server.getsockname()[1]
    finally:
        server.close()


def accept(server: socket.socket) -> socket.socket:
    server.settimeout(TIMEOUT)
    conn, _ = server.accept()
    return conn


def reversed_line(layer: RecordLayer, text: bytes) -> None:
    layer.send(text + b"\n")
    assert layer.recv_until(b"\n").strip() == text[::-1]


def expect_failure(status: int, fragment: str, call, *args, **kw) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        call(*args, **kw)
    assert info.value.status == status, info.value
    assert fragment in info.value.reason, info.value.reason
    return info.value


# --- client role --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suite", SUITES)
def test_client_unauth_each_suite_against_openssl(plugins, pki, backend: str, suite: str) -> None:
    with openssl_server(pki, "-ciphersuites", suite) as (port, _), connect(port) as sock:
        session = run_handshake(plugins, sock, backend, "client", "unauth", creds_for(pki))
        assert session.cipher == suite
        assert (session.tx_seq, session.rx_seq) == (0, 0)
        assert session.peer_certificates[0] == certs(pki.server.cert)[0].public_bytes(Encoding.DER)
        reversed_line(records_for(sock, session), b"hello-" + suite.encode())


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_unauth_by_ip_address_against_gnutls(plugins, pki, backend: str) -> None:
    port = free_port()
    peer = Peer(["gnutls-serv", "--echo", "-p", str(port), "--x509certfile", pki.server.chain,
                 "--x509keyfile", pki.server.key, "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.3"])
    try:
        with connect(port) as sock:
            session = run_handshake(plugins, sock, backend, "client", "unauth", creds_for(pki), peername="127.0.0.1")
            layer = records_for(sock, session)
            layer.send(b"echo-me\n")
            assert layer.recv_until(b"\n") == b"echo-me\n"
    finally:
        peer.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_x509_presents_certificate_to_verifying_server(plugins, pki, backend: str) -> None:
    with openssl_server(pki, "-Verify", "1", "-verify_return_error", "-CAfile", pki.ca) as (port, peer), \
            connect(port) as sock:
        session = run_handshake(plugins, sock, backend, "client", "x509", creds_for(pki, pki.client))
        reversed_line(records_for(sock, session), b"mutual")
    assert b"client.test" in peer.output  # s_server printed the verified client certificate subject


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wrong-host", "untrusted", "expired", "revoked", "no-peername"])
def test_client_rejects_bad_server(plugins, pki, backend: str, case: str) -> None:
    pair = {"untrusted": pki.untrusted_server, "expired": pki.expired_server,
            "revoked": pki.revoked_server}.get(case, pki.server)
    creds = creds_for(pki)
    if case == "revoked":
        creds.crls = parse_crls(_read(pki.crl), pki.crl)
    peername = {"wrong-host": "other.example", "no-peername": None}.get(case, "localhost")
    fragment = {"wrong-host": "mismatch", "untrusted": "issuer", "expired": "expired", "revoked": "revoked",
                "no-peername": "peer name"}[case]
    with openssl_server(pki, pair=pair) as (port, _), connect(port) as sock:
        expect_failure(errno.EACCES, fragment, run_handshake, plugins, sock, backend, "client", "unauth", creds,
                       peername=peername, timeout=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_verify_off_accepts_untrusted_server(plugins, pki, backend: str) -> None:
    with openssl_server(pki, pair=pki.untrusted_server) as (port, _), connect(port) as sock:
        session = run_handshake(plugins, sock, backend, "client", "unauth", creds_for(pki, verify_peer=False))
        reversed_line(records_for(sock, session), b"unverified")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("behaviour", ["close", "silent", "garbage"])
def test_client_against_broken_peer(plugins, pki, backend: str, behaviour: str) -> None:
    with listening() as (server, port), socket.create_connection(("127.0.0.1", port)) as sock:
        peer = accept(server)
        try:
            if behaviour == "close":
                peer.close()
            elif behaviour == "garbage":
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            status, fragment = {"close": (errno.ETIMEDOUT, "closed"), "silent": (errno.ETIMEDOUT, "timed out"),
                                "garbage": (errno.EACCES, "not TLS")}[behaviour]
            expect_failure(status, fragment, run_handshake, plugins, sock, backend, "client", "unauth",
                           creds_for(pki), timeout=1.5)
            assert sock.fileno() >= 0  # the backend never closes the core's socket
        finally:
            peer.close()


# --- server role --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("client_cert", [False, True])
def test_server_x509_against_openssl_client(plugins, pki, backend: str, client_cert: bool) -> None:
    extra = ("-cert", pki.client.cert, "-key", pki.client.key) if client_cert else ()
    with listening() as (server, port), openssl_client_of(port, "-CAfile", pki.ca, "-verify_return_error",
                                                          *extra) as peer:
        with accept(server) as sock:
            session = run_handshake(plugins, sock, backend, "server", "x509", creds_for(pki, pki.server))
            assert bool(session.peer_certificates) == client_cert
            layer = records_for(sock, session)
            layer.send(b"from-hsd-server\n")
            peer.wait_for(b"from-hsd-server")
            peer.send(b"from-openssl-client\n")
            assert layer.recv_until(b"\n") == b"from-openssl-client\n"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["missing-required", "untrusted-client", "san-not-allowed"])
def test_server_rejects_bad_client(plugins, pki, backend: str, case: str) -> None:
    creds = creds_for(pki, pki.server)
    extra: tuple[str, ...] = ("-cert", pki.client.cert, "-key", pki.client.key)
    if case == "missing-required":
        creds.require_peer_cert, extra = True, ()
        fragment = "no certificate"
    elif case == "untrusted-client":  # a certificate from a CA the server does not trust
        extra = ("-cert", pki.untrusted_server.cert, "-key", pki.untrusted_server.key)
        fragment = "verify failed"
    else:
        creds.allowed_sans = ["someone-else.test"]
        fragment = "allowed_client_sans"
    with listening() as (server, port), openssl_client_of(port, "-CAfile", pki.ca, *extra):
        with accept(server) as sock:
            expect_failure(errno.EACCES, fragment, run_handshake, plugins, sock, backend, "server", "x509",
                           creds, timeout=5)


# --- PSK (keys in kernel keyrings, chosen by the PSK policy plugin) ------------------------------

IDENTITY = "NVMe0R01 nqn.2024-01.org.example.host-tl nqn.2014-08.org.nvmexpress.discovery"


def test_tlslite_psk_client_against_openssl(plugins, ring) -> None:
    secret = secrets.token_bytes(32)
    serial = ring.add(IDENTITY, secret)
    port = free_port()
    peer = Peer(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-nocert", "-tls1_3", "-rev",
                 "-psk", secret.hex(), "-psk_identity", IDENTITY, "-naccept", "1"])
    try:
        peer.wait_for(b"ACCEPT")
        with connect(port) as sock:
            session = run_handshake(plugins, sock, "tlslite", "client", "psk", None,
                                    peer_identities=(serial,), keyring=ring.serial)
            assert session.remote_auth == (serial,)
            assert session.cipher.endswith("SHA256")
            assert session.details["psk_mode"] == "psk_dhe_ke"
            reversed_line(records_for(sock, session), b"psk-client")
    finally:
        peer.stop()


@pytest.mark.parametrize("hash_name", ["sha256"])  # sha384 vs gnutls-serv: illegal_parameter, see the report
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_tlslite_psk_client_against_gnutls(plugins, ring, hash_name: str, mode: str) -> None:
    """gnutls-serv as an independent PSK server, in both key-exchange modes."""
    secret = secrets.token_bytes(32 if hash_name == "sha256" else 48)
    serial = ring.add(IDENTITY, secret)
    with gnutls_server(IDENTITY, secret, GNUTLS_PRIORITY[hash_name, mode]) as port, connect(port) as sock:
        modes = ["psk_ke"] if mode == "psk_ke" else ["psk_dhe_ke"]
        session = run_handshake(plugins, sock, "tlslite", "client", "psk", None, config=Config(psk_modes=modes),
                                peer_identities=(serial,), keyring=ring.serial)
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        layer = records_for(sock, session)
        layer.send(b"echo-psk\n")
        assert layer.recv_until(b"\n") == b"echo-psk\n"


def test_tlslite_psk_server_against_openssl_client(plugins, ring) -> None:
    secret = secrets.token_bytes(32)
    ring.add("decoy identity", secrets.token_bytes(32))
    serial = ring.add(IDENTITY, secret)
    with listening() as (server, port), openssl_client_of(
            port, "-psk", secret.hex(), "-psk_identity", IDENTITY) as peer:
        with accept(server) as sock:
            session = run_handshake(plugins, sock, "tlslite", "server", "psk", None, peername=None,
                                    keyring=ring.serial)
            assert session.remote_auth == (serial,)
            layer = records_for(sock, session)
            layer.send(b"psk-from-server\n")
            peer.wait_for(b"psk-from-server")
            peer.send(b"psk-from-client\n")
            assert layer.recv_until(b"\n") == b"psk-from-client\n"


def test_tlslite_psk_server_unknown_identity(plugins, ring) -> None:
    ring.add(IDENTITY, secrets.token_bytes(32))
    with listening() as (server, port), openssl_client_of(
            port, "-psk", secrets.token_bytes(32).hex(), "-psk_identity", "nobody-knows-me") as peer:
        with accept(server) as sock:
            expect_failure(errno.EKEYREJECTED, "nobody-knows-me", run_handshake, plugins, sock, "tlslite",
                           "server", "psk", None, peername=None, keyring=ring.serial, timeout=5)
        peer.wait_for(b"unknown psk identity")


# --- internals: the kTLS keys are tlslite's own record-layer keys; nothing was over-read ---------

def test_ktls_keys_equal_tlslite_record_layer(plugins, pki, monkeypatch) -> None:
    seen = {}
    real_run = hsd_tlslite.handshake.run

    def capture(*args, **kw):
        conn, transport = real_run(*args, **kw)
        seen["conn"], seen["transport"] = conn, transport
        return conn, transport

    monkeypatch.setattr(hsd_tlslite.handshake, "run", capture)
    with openssl_server(pki, "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256") as (port, _), connect(port) as sock:
        session = run_handshake(plugins, sock, "tlslite", "client", "unauth", creds_for(pki))
        tx, rx = session_crypto_info(session)
        layer = seen["conn"]._recordLayer
        for info, state in ((tx, layer._writeState), (rx, layer._readState)):
            assert bytes(state.encContext.key) == info.key
            assert bytes(state.fixedNonce) == info.nonce_base()
            assert state.seqnum == info.rec_seq
        assert seen["transport"].unread == 0
        # s_server's NewSessionTickets are still in the socket, for kTLS: the first record read is seq 0
        reversed_line(records_for(sock, session), b"after-tickets")


# --- cross-backend: hsd client on one backend, hsd server on the other ---------------------------

@pytest.mark.parametrize("client_backend,server_backend", [("tlslite", "openssl"), ("openssl", "tlslite")])
@pytest.mark.parametrize("auth", ["unauth", "x509"])
def test_cross_backend(plugins, pki, client_backend: str, server_backend: str, auth: str) -> None:
    client_sock, server_sock = socket.socketpair()
    results: dict[str, object] = {}

    def serve() -> None:
        try:
            results["server"] = run_handshake(plugins, server_sock, server_backend, "server", "x509",
                                              creds_for(pki, pki.server, require_peer_cert=auth == "x509"))
        except BaseException as exc:  # reported below
            results["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = run_handshake(plugins, client_sock, client_backend, "client", auth,
                               creds_for(pki, pki.client if auth == "x509" else None))
    finally:
        thread.join(TIMEOUT)
    server = results["server"]
    assert isinstance(server, Session), server
    assert client.cipher == server.cipher
    assert bool(server.peer_certificates) == (auth == "x509")
    client_layer, server_layer = records_for(client_sock, client), records_for(server_sock, server)
    client_layer.send(b"client->server\n")
    assert server_layer.recv_until(b"\n") == b"client->server\n"
    server_layer.send(b"server->client\n")
    assert client_layer.recv_until(b"\n") == b"server->client\n"
    client_sock.close()
    server_sock.close()


def teardown_module() -> None:
    for name, values in sorted(TIMINGS.items()):
        ok = sorted(values)
        print(f"\nhandshake {name}: n={len(ok)} median={ok[len(ok) // 2] * 1000:.1f} ms max={ok[-1] * 1000:.1f} ms")
