"""TLS 1.3 external PSK through the plugin hooks, against openssl and gnutls peers.

Real parts only: kernel keyrings made per test, real TCP sockets on loopback,
independent TLS stacks as subprocesses (openssl s_server/s_client, gnutls-serv
/gnutls-cli) and tlslite-ng for a multi-identity client.  Every successful
handshake is proved by exchanging data both ways under the keys kTLS would get
(hsd.ktls.session_crypto_info), through a user-space TLS 1.3 record layer.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import threading
import time
import contextlib
from contextlib import contextmanager
from typing import Iterator

import pluggy
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

import hsd_openssl
import hsd_openssl.psk
import hsd_psk
from hsd import keyring
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.errors import HandshakeError
from hsd.hookspecs import PROJECT, HookSpecs
from hsd.ktls import CryptoInfo, session_crypto_info
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd.testing.keyrings import ThrowawayKeyring
from hsd.testing.peers import MemoryFile, free_port, psk_session_pem


def connect(port: int) -> socket.socket:
    from hsd.testing.peers import connect as connect_to

    return connect_to(port, timeout=TIMEOUT)

# No ':' in these NQNs: gnutls' PSK password file splits "identity:key" at the first colon.
HOST = "nqn.2024-01.org.example.host-8ae2b12c"
SUBSYS = "nqn.2014-08.org.nvmexpress.discovery"
ID256 = f"NVMe0R01 {HOST} {SUBSYS}"
ID384 = f"NVMe0R02 {HOST} {SUBSYS}"
TIMEOUT = 20.0


# --- a minimal user-space TLS 1.3 record layer over kTLS crypto_info -------------------------

class RecordLayer:
    """Encrypts and decrypts TLS 1.3 records the way the kernel would with these crypto_infos."""

    AEADS = {51: AESGCM, 52: AESGCM, 53: AESCCM, 54: ChaCha20Poly1305}

    def __init__(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo) -> None:
        self.sock = sock
        self.tx, self.rx = tx, rx
        self.tx_seq, self.rx_seq = tx.rec_seq, rx.rec_seq
        self.buffer = b""

    def _aead(self, info: CryptoInfo):  # noqa: ANN202
        return self.AEADS[info.cipher_type](info.key)

    @staticmethod
    def _nonce(info: CryptoInfo, seq: int) -> bytes:
        base = info.nonce_base()
        return base[:4] + bytes(a ^ b for a, b in zip(base[4:], seq.to_bytes(8, "big")))

    def send(self, data: bytes) -> None:
        inner = data + b"\x17"
        header = bytes([23, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
        sealed = self._aead(self.tx).encrypt(self._nonce(self.tx, self.tx_seq), inner, header)
        self.tx_seq += 1
        self.sock.sendall(header + sealed)

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv(self) -> bytes:
        """The next application-data payload; post-handshake messages (tickets) are skipped."""
        while True:
            header = self._read(5)
            body = self._read(int.from_bytes(header[3:5], "big"))
            assert header[0] == 23, f"unexpected outer record type {header[0]}"
            inner = self._aead(self.rx).decrypt(self._nonce(self.rx, self.rx_seq), body, header)
            self.rx_seq += 1
            inner = inner.rstrip(b"\x00")
            if inner[-1] == 23:
                return inner[:-1]
            assert inner[-1] == 22, f"unexpected inner record type {inner[-1]}"

    def recv_until(self, needle: bytes) -> bytes:
        got = b""
        while needle not in got:
            got += self.recv()
        return got


# --- kernel keyrings (hsd.testing.keyrings) --------------------------------------------------

@pytest.fixture
def ring() -> Iterator[ThrowawayKeyring]:
    made = ThrowawayKeyring()
    yield made
    made.close()


# --- the plugin stack --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    manager.register(hsd_psk, "psk")
    manager.register(hsd_openssl, "openssl")
    if not hasattr(hsd_openssl, "hsd_psk_handshake"):  # until the backend re-exports it
        manager.register(hsd_openssl.psk, "openssl.psk")
    return manager


def handshake(plugins: pluggy.PluginManager, sock: socket.socket, role: str, keyring_serial: int,
              identities: tuple[int, ...] = (), modes: tuple[str, ...] = ("psk_dhe_ke",),
              backend: str = "openssl", keyring_names: tuple[str, ...] = ()) -> Session:
    request = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AuthMode.PSK, timeout_ms=int(TIMEOUT * 1000),
        peer_identities=identities, keyring=keyring_serial)
    ctx = HandshakeContext(request=request, sock=sock, deadline=time.monotonic() + TIMEOUT,
                           backend=backend, hook=plugins.hook,
                           config=Config(psk_modes=list(modes), keyrings=list(keyring_names)))
    return plugins.hook.hsd_handshake(ctx=ctx)


def records_for(sock: socket.socket, session: Session) -> RecordLayer:
    sock.setblocking(True)
    sock.settimeout(TIMEOUT)
    tx, rx = session_crypto_info(session)
    return RecordLayer(sock, tx, rx)


# --- peers -------------------------------------------------------------------------------------

class Peer:
    """A TLS tool as a subprocess; its output is collected so tests can wait for lines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.output = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            with self._lock:
                self.output += line

    def wait_for(self, needle: bytes, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if needle in self.output:
                    return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"peer never printed {needle!r}; output:\n{self.output.decode(errors='replace')}")

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def openssl_psk_args(identity: str, secret: bytes, hash_name: str) -> tuple[list[str], MemoryFile | None]:
    """openssl's -psk builds a SHA-256 session; a SHA-384 PSK goes in through -psk_session."""
    if hash_name == "sha256":
        return ["-psk", secret.hex(), "-psk_identity", identity], None
    session_file = MemoryFile(psk_session_pem(secret, hash_name))
    return ["-psk_session", session_file.path, "-psk_identity", identity], session_file


GNUTLS_13 = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
GNUTLS_PRIORITY = {
    ("sha256", "psk_dhe_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-128-GCM:+CHACHA20-POLY1305:-KX-ALL:+ECDHE-PSK",
    ("sha384", "psk_dhe_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+ECDHE-PSK",
    ("sha256", "psk_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-128-GCM:-KX-ALL:+PSK",
    ("sha384", "psk_ke"): GNUTLS_13 + ":-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+PSK",
}


@contextmanager
def gnutls_server(identity: str, secret: bytes, priority: str) -> Iterator[int]:
    port = free_port()
    psk_file = MemoryFile(f"{identity}:{secret.hex()}\n".encode())  # gnutls' password file
    peer = Peer(["gnutls-serv", "--echo", "-p", str(port), "--pskpasswd", psk_file.path,
                 "--priority", priority, "--disable-client-cert"])
    try:
        yield port
    finally:
        peer.stop()
        psk_file.close()


@contextmanager
def openssl_server(identity: str, secret: bytes, hash_name: str = "sha256",
                   extra: tuple[str, ...] = ()) -> Iterator[tuple[int, Peer]]:
    port = free_port()
    psk_args, session_file = openssl_psk_args(identity, secret, hash_name)
    peer = Peer(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-nocert", "-tls1_3",
                 *psk_args, "-naccept", "1", *extra])
    try:
        peer.wait_for(b"ACCEPT")
        yield port, peer
    finally:
        peer.stop()
        if session_file is not None:
            session_file.close()


# --- client role --------------------------------------------------------------------------------

# openssl s_server 3.0 picks psk_dhe_ke whenever the client offers it (OpenSSL clients always do):
# psk_ke as a client is tested against gnutls-serv.
@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_client_against_openssl_server(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                       hash_name: str) -> None:
    mode = "psk_dhe_ke"
    identity, secret = (ID256, secrets.token_bytes(32)) if hash_name == "sha256" else (ID384, secrets.token_bytes(48))
    serial = ring.add(identity, secret)
    with openssl_server(identity, secret, hash_name) as (port, peer), connect(port) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (serial,))
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        layer = records_for(sock, session)
        layer.send(b"from-hsd-client\n")
        peer.wait_for(b"from-hsd-client")
        peer.send(b"from-openssl-server\n")
        assert b"from-openssl-server" in layer.recv_until(b"\n")


# gnutls-serv/-cli 3.7 compute external-PSK binders with SHA-256 only: SHA-384 is tested with openssl.
@pytest.mark.parametrize("hash_name", ["sha256"])
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_client_against_gnutls_server(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                      hash_name: str, mode: str) -> None:
    identity = ID256 if hash_name == "sha256" else ID384
    secret = secrets.token_bytes(32 if hash_name == "sha256" else 48)
    serial = ring.add(identity, secret)
    modes = ("psk_dhe_ke", "psk_ke") if mode == "psk_ke" else ("psk_dhe_ke",)
    with gnutls_server(identity, secret, GNUTLS_PRIORITY[hash_name, mode]) as port, connect(port) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (serial,), modes)
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        layer = records_for(sock, session)
        layer.send(b"echo-me-please\n")
        assert layer.recv_until(b"\n") == b"echo-me-please\n"


# --- server role --------------------------------------------------------------------------------

@contextmanager
def listener() -> Iterator[tuple[socket.socket, int]]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(TIMEOUT)
        yield server, server.getsockname()[1]


def openssl_client(port: int, identity: str, secret: bytes, hash_name: str,
                   extra: tuple[str, ...] = ()) -> tuple[Peer, MemoryFile | None]:
    psk_args, session_file = openssl_psk_args(identity, secret, hash_name)
    return Peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ign_eof",
                 *psk_args, *extra]), session_file


def gnutls_client(port: int, identity: str, secret: bytes, priority: str) -> Peer:
    return Peer(["gnutls-cli", "-p", str(port), "127.0.0.1", "--pskusername", identity,
                 "--pskkey", secret.hex(), "--priority", priority])


def serve_one(plugins: pluggy.PluginManager, server: socket.socket, keyring_serial: int,
              modes: tuple[str, ...] = ("psk_dhe_ke",), keyring_names: tuple[str, ...] = ()
              ) -> tuple[socket.socket, Session]:
    sock, _ = server.accept()
    try:
        return sock, handshake(plugins, sock, "server", keyring_serial, (0,), modes,
                               keyring_names=keyring_names)
    except BaseException:
        sock.close()
        raise


def prove_server_keys(sock: socket.socket, session: Session, peer: Peer) -> None:
    layer = records_for(sock, session)
    peer.send(b"from-peer-client\n")
    assert layer.recv_until(b"\n") == b"from-peer-client\n"
    layer.send(b"from-hsd-server\n")
    peer.wait_for(b"from-hsd-server")


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_server_against_openssl_client(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                       hash_name: str, mode: str) -> None:
    identity, secret = (ID256, secrets.token_bytes(32)) if hash_name == "sha256" else (ID384, secrets.token_bytes(48))
    serial = ring.add(identity, secret)
    ring.add("some-other-identity", secrets.token_bytes(32))
    extra = ("-allow_no_dhe_kex",) if mode == "psk_ke" else ()
    with listener() as (server, port):
        peer, session_file = openssl_client(port, identity, secret, hash_name, extra)
        try:
            sock, session = serve_one(plugins, server, ring.serial, (mode,))
            with sock:
                assert session.remote_auth == (serial,)
                assert session.cipher.endswith(hash_name.upper())
                assert session.details["psk_mode"] == mode
                assert session.tx_seq == 0  # no session ticket reached the client
                prove_server_keys(sock, session, peer)
        finally:
            peer.stop()
            if session_file is not None:
                session_file.close()


@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_server_against_gnutls_client(plugins: pluggy.PluginManager, ring: ThrowawayKeyring, mode: str) -> None:
    secret = secrets.token_bytes(32)
    serial = ring.add(ID256, secret)
    with listener() as (server, port):
        peer = gnutls_client(port, ID256, secret, GNUTLS_PRIORITY["sha256", mode])
        try:
            sock, session = serve_one(plugins, server, ring.serial, ("psk_dhe_ke", "psk_ke"))
            with sock:
                assert session.remote_auth == (serial,)
                assert session.details["psk_mode"] == mode
                peer.wait_for(b"Handshake was completed")
                prove_server_keys(sock, session, peer)
        finally:
            peer.stop()


def tlslite_client(port: int, psks: list[tuple[str, bytes, str]], result: dict[str, object]) -> threading.Thread:
    """tlslite-ng (an independent TLS 1.3 stack) offering several identities in one ClientHello."""
    from tlslite import HandshakeSettings, TLSConnection

    def run() -> None:
        try:
            settings = HandshakeSettings()
            settings.minVersion = settings.maxVersion = (3, 4)
            settings.pskConfigs = [(ident.encode(), key, hash_name) for ident, key, hash_name in psks]
            settings.psk_modes = ["psk_dhe_ke"]
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                conn = TLSConnection(sock)
                conn.handshakeClientCert(settings=settings)
                conn.write(b"from-tlslite\n")
                result["reply"] = conn.read(max=64)
        except Exception as exc:  # reported to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_server_takes_the_only_known_of_several_identities(plugins: pluggy.PluginManager,
                                                          ring: ThrowawayKeyring) -> None:
    known = secrets.token_bytes(48)
    serial = ring.add(ID384, known)
    offered = [("unknown-one", secrets.token_bytes(32), "sha256"),
               (ID256.replace("host", "other-host"), secrets.token_bytes(32), "sha256"),
               (ID384, known, "sha384")]
    result: dict[str, object] = {}
    with listener() as (server, port):
        thread = tlslite_client(port, offered, result)
        sock, session = serve_one(plugins, server, ring.serial)
        with sock:
            assert session.remote_auth == (serial,)
            assert session.details["psk_identity"] == ID384
            layer = records_for(sock, session)
            assert layer.recv_until(b"\n") == b"from-tlslite\n"
            layer.send(b"from-hsd-server\n")
            thread.join(TIMEOUT)
    assert "error" not in result, result.get("error")
    assert result["reply"] == b"from-hsd-server\n"


def test_client_skips_identities_without_a_usable_key(plugins: pluggy.PluginManager,
                                                    ring: ThrowawayKeyring) -> None:
    gone = ring.add("NVMe0R01 gone-host subsys", secrets.token_bytes(32))
    keyring.invalidate(gone)
    too_short = ring.add("short-key", secrets.token_bytes(16))  # neither SHA-256 nor SHA-384 sized
    secret = secrets.token_bytes(32)
    serial = ring.add(ID256, secret)
    with openssl_server(ID256, secret) as (port, peer), connect(port) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (gone, too_short, serial))
        assert session.remote_auth == (serial,)
        layer = records_for(sock, session)
        layer.send(b"after-skipping\n")
        peer.wait_for(b"after-skipping")


def test_client_with_no_usable_key_is_eio(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    too_short = ring.add("short-key", secrets.token_bytes(16))
    with listener() as (server, port), connect(port) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (too_short,))
    assert info.value.status == errno.EIO


# --- failures -----------------------------------------------------------------------------------

def test_client_with_wrong_key_is_eacces(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    serial = ring.add(ID256, secrets.token_bytes(32))
    with openssl_server(ID256, secrets.token_bytes(32)) as (port, _peer), connect(port) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (serial,))
    assert info.value.status == errno.EACCES


def test_server_with_wrong_key_is_eacces(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    ring.add(ID256, secrets.token_bytes(32))
    with listener() as (server, port):
        peer, _ = openssl_client(port, ID256, secrets.token_bytes(32), "sha256")
        try:
            with pytest.raises(HandshakeError) as info:
                serve_one(plugins, server, ring.serial)
        finally:
            peer.stop()
    assert info.value.status == errno.EACCES


def test_server_with_unknown_identity_is_ekeyrejected(plugins: pluggy.PluginManager,
                                                      ring: ThrowawayKeyring) -> None:
    ring.add("someone-else", secrets.token_bytes(32))
    with listener() as (server, port):
        peer = gnutls_client(port, ID256, secrets.token_bytes(32), GNUTLS_PRIORITY["sha256", "psk_dhe_ke"])
        try:
            with pytest.raises(HandshakeError) as info:
                serve_one(plugins, server, ring.serial)
            peer.wait_for(b"Received alert [115]")  # unknown_psk_identity, as tlshd sends it
        finally:
            peer.stop()
    assert info.value.status == errno.EKEYREJECTED


def test_client_told_unknown_identity_is_ekeyrejected(plugins: pluggy.PluginManager) -> None:
    """hsd against hsd: the server's unknown_psk_identity alert becomes the client's EKEYREJECTED."""
    client_ring, server_ring = ThrowawayKeyring(), ThrowawayKeyring()
    try:
        serial = client_ring.add(ID256, secrets.token_bytes(32))
        server_ring.add("someone-else", secrets.token_bytes(32))
        outcome: dict[str, BaseException] = {}
        with listener() as (server, port):
            def serve() -> None:
                try:
                    serve_one(plugins, server, server_ring.serial)
                except BaseException as exc:  # reported below
                    outcome["server"] = exc
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            with connect(port) as sock, pytest.raises(HandshakeError) as info:
                handshake(plugins, sock, "client", client_ring.serial, (serial,))
            thread.join(TIMEOUT)
        assert info.value.status == errno.EKEYREJECTED
        assert getattr(outcome.get("server"), "status", None) == errno.EKEYREJECTED
    finally:
        client_ring.close()
        server_ring.close()


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_servers_see_only_their_own_keyring(plugins: pluggy.PluginManager) -> None:
    """Same identity, a different key per request: any leak between keyrings fails a handshake."""
    count = 4
    rings = [ThrowawayKeyring() for _ in range(count)]
    keys = [secrets.token_bytes(32) for _ in range(count)]
    serials = [ring.add(ID256, key) for ring, key in zip(rings, keys)]
    results: dict[int, object] = {}
    peers: list[Peer] = []

    def serve(index: int, server: socket.socket) -> None:
        try:
            sock, session = serve_one(plugins, server, rings[index].serial)
            with sock:
                results[index] = session.remote_auth
                prove_server_keys(sock, session, peers[index])
        except BaseException as exc:  # reported below
            results[index] = exc

    try:
        with contextlib.ExitStack() as stack:
            listeners = [stack.enter_context(listener()) for _ in range(count)]
            for index, (_server, port) in enumerate(listeners):
                peers.append(gnutls_client(port, ID256, keys[index], GNUTLS_PRIORITY["sha256", "psk_dhe_ke"]))
            threads = [threading.Thread(target=serve, args=(i, listeners[i][0])) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT * 2)
    finally:
        for peer in peers:
            peer.stop()
        for ring in rings:
            ring.close()
    assert results == {i: (serials[i],) for i in range(count)}


def test_server_finds_keys_in_a_configured_keyring(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    """[authenticate] keyrings= names are resolved per request; ACCEPT carried no keyring here."""
    secret = secrets.token_bytes(32)
    serial = ring.add(ID256, secret)
    with listener() as (server, port):
        peer, _ = openssl_client(port, ID256, secret, "sha256")
        try:
            sock, session = serve_one(plugins, server, 0, keyring_names=(ring.name,))
            with sock:
                assert session.remote_auth == (serial,)
                prove_server_keys(sock, session, peer)
        finally:
            peer.stop()


def test_server_without_the_keyring_rejects_the_identity(plugins: pluggy.PluginManager,
                                                         ring: ThrowawayKeyring) -> None:
    """A key in a keyring this request was not given stays invisible (EKEYREJECTED)."""
    secret = secrets.token_bytes(32)
    ring.add(ID256, secret)
    with listener() as (server, port):
        peer, _ = openssl_client(port, ID256, secret, "sha256")
        try:
            with pytest.raises(HandshakeError) as info:
                serve_one(plugins, server, 0)
        finally:
            peer.stop()
    assert info.value.status == errno.EKEYREJECTED


def test_server_rejects_a_client_offering_no_psk(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    ring.add(ID256, secrets.token_bytes(32))
    with listener() as (server, port):
        peer = Peer(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3"])
        try:
            with pytest.raises(HandshakeError) as info:
                serve_one(plugins, server, ring.serial)
        finally:
            peer.stop()
    assert info.value.status == errno.EACCES


def test_backend_without_psk_mechanics_is_unsupported(plugins: pluggy.PluginManager,
                                                      ring: ThrowawayKeyring) -> None:
    serial = ring.add(ID256, secrets.token_bytes(32))
    with listener() as (server, port), connect(port) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (serial,), backend="no-such-backend")
    assert info.value.status == errno.EOPNOTSUPP
    assert "no-such-backend" in info.value.reason


def test_policy_ignores_other_auth_modes(plugins: pluggy.PluginManager) -> None:
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.X509)
    ctx = HandshakeContext(request=request, sock=socket.socket(), deadline=time.monotonic() + 1,
                           backend="openssl", config=Config(), hook=plugins.hook)
    with ctx.sock:
        assert hsd_psk.hsd_handshake(ctx=ctx) is None
    info = hsd_psk.hsd_backend_info()
    assert info.name == "psk" and info.kind == "policy"
    assert {str(mode) for mode in info.modes} == {"client/psk", "server/psk"}


# --- the whole path: simulated NVMe host -> dispatcher -> psk policy -> openssl -> kTLS ---------

def test_nvme_host_request_through_the_dispatcher(ring: ThrowawayKeyring) -> None:
    from hsd.dispatcher import Dispatcher
    from hsd.plugins import PluginHost
    from hsd.simulator import Simulator

    secret = secrets.token_bytes(48)
    serial = ring.add(ID384, secret)
    config = Config(backend="openssl")
    host = PluginHost(config)
    assert host.add("psk", hsd_psk) is not None
    assert host.add("openssl", hsd_openssl) is not None
    with Simulator() as sim, openssl_server(ID384, secret, "sha384") as (port, peer), connect(port) as mine:
        channel = sim.channel()
        dispatcher = Dispatcher(channel, host, config)
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop, ready.set), daemon=True)
        thread.start()
        try:
            assert ready.wait(5)
            request = sim.client_hello_psk(mine, [serial], keyring=ring.serial, timeout_ms=10000)
            status, peerid = request.wait(TIMEOUT)
            assert (status, peerid) == (0, serial)  # the NVMe host insists on the serial of the PSK used
            assert request.ktls_tx is not None and request.ktls_rx is not None
            layer = RecordLayer(mine, request.ktls_tx, request.ktls_rx)
            mine.settimeout(TIMEOUT)
            layer.send(b"nvme-over-ktls\n")
            peer.wait_for(b"nvme-over-ktls")
            peer.send(b"target-reply\n")
            assert b"target-reply" in layer.recv_until(b"\n")
        finally:
            stop.set()
            thread.join(15)
            channel.close()
