"""TLS 1.3 external PSK through the plugin hooks, against openssl and gnutls peers.

Real parts only: kernel keyrings made per test, real TCP sockets on loopback,
independent TLS stacks as subprocesses (openssl s_server/s_client, gnutls-serv
/gnutls-cli) and tlslite-ng for a multi-identity client.  Every successful
handshake is proved by exchanging data both ways under the keys kTLS would get
(hsd.ktls.session_crypto_info), through the test kit's user-space record layer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import secrets
import socket
import os
import threading
import time
import uuid
from typing import Iterator

import pluggy
import pytest

import hsd_openssl
import hsd_psk
from hsd import keyring
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.errors import HandshakeError
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd_kit.handshakes import handshake_context, plugin_manager, run_handshake
from hsd_kit.harness import assert_ktls_roundtrip, assert_records_roundtrip
from hsd_kit.keyrings import ThrowawayKeyring
from hsd_kit.peers import (
    LOOPBACK,
    Listener,
    PeerProcess,
    PskSecret,
    connect,
    gnutls_psk_client,
    gnutls_psk_server,
    openssl_psk_client,
    openssl_psk_server,
)
from hsd_kit.records import KtlsRecordChecker, session_records

# No ':' in these NQNs: gnutls' PSK password file splits "identity:key" at the first colon.
HOST = "nqn.2024-01.org.example.host-8ae2b12c"
SUBSYS = "nqn.2014-08.org.nvmexpress.discovery"
ID256 = f"NVMe0R01 {HOST} {SUBSYS}"
ID384 = f"NVMe0R02 {HOST} {SUBSYS}"
TIMEOUT = 20.0


@pytest.fixture(name="ring")
def _ring(hsd_keyring: ThrowawayKeyring) -> ThrowawayKeyring:
    """A fresh kernel keyring per test (the test kit's hsd_keyring)."""
    return hsd_keyring


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_psk, hsd_openssl)


def handshake(plugins: pluggy.PluginManager, sock: socket.socket, role: str, keyring_serial: int,
              identities: tuple[int, ...] = (), modes: tuple[str, ...] = ("psk_dhe_ke",),
              backend: str = "openssl", keyring_names: tuple[str, ...] = ()) -> Session:
    """A PSK handshake as the PSK policy gets it from ACCEPT: identities, keyring, [authenticate] config."""
    config = Config(psk_modes=list(modes), keyrings=list(keyring_names))
    ctx = handshake_context(sock, role, "psk", backend=backend, config=config, timeout=TIMEOUT, peername=None,
                            peer_identities=identities, keyring=keyring_serial)
    return run_handshake(plugins, ctx)


def records_for(sock: socket.socket, session: Session) -> KtlsRecordChecker:
    return session_records(sock, session, TIMEOUT)


def psk_for(hash_name: str, identity: str | None = None, mode: str = "psk_dhe_ke") -> PskSecret:
    """A fresh secret of the hash's length (32 or 48 bytes) under the NVMe identity naming that hash."""
    identity = identity or (ID256 if hash_name == "sha256" else ID384)
    return PskSecret(identity, secrets.token_bytes(32 if hash_name == "sha256" else 48), hash_name, mode)


# --- client role --------------------------------------------------------------------------------

# openssl s_server 3.0 picks psk_dhe_ke whenever the client offers it (OpenSSL clients always do):
# psk_ke as a client is tested against gnutls-serv.
@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_client_against_openssl_server(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                       hash_name: str) -> None:
    mode = "psk_dhe_ke"
    psk = psk_for(hash_name)
    serial = ring.add(psk.identity, psk.secret)
    with openssl_psk_server(psk) as peer, connect(peer.port, timeout=TIMEOUT) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (serial,))
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        assert_records_roundtrip(records_for(sock, session), peer)


# gnutls-serv/-cli 3.7 compute external-PSK binders with SHA-256 only: SHA-384 is tested with openssl.
@pytest.mark.parametrize("hash_name", ["sha256"])
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_client_against_gnutls_server(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                      hash_name: str, mode: str) -> None:
    psk = psk_for(hash_name, mode=mode)
    serial = ring.add(psk.identity, psk.secret)
    modes = ("psk_dhe_ke", "psk_ke") if mode == "psk_ke" else ("psk_dhe_ke",)
    with gnutls_psk_server(psk) as peer, connect(peer.port, timeout=TIMEOUT) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (serial,), modes)
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        assert_records_roundtrip(records_for(sock, session), peer, echo=True)


# --- server role --------------------------------------------------------------------------------

def serve_one(plugins: pluggy.PluginManager, listener: Listener, keyring_serial: int,
              modes: tuple[str, ...] = ("psk_dhe_ke",), keyring_names: tuple[str, ...] = ()
              ) -> tuple[socket.socket, Session]:
    sock = listener.accept(TIMEOUT)
    try:
        return sock, handshake(plugins, sock, "server", keyring_serial, (0,), modes,
                               keyring_names=keyring_names)
    except BaseException:
        sock.close()
        raise


def prove_server_keys(sock: socket.socket, session: Session, peer: PeerProcess) -> None:
    assert_records_roundtrip(records_for(sock, session), peer)


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_server_against_openssl_client(plugins: pluggy.PluginManager, ring: ThrowawayKeyring,
                                       hash_name: str, mode: str) -> None:
    psk = psk_for(hash_name, mode=mode)  # psk_ke: the client allows it (-allow_no_dhe_kex)
    serial = ring.add(psk.identity, psk.secret)
    ring.add("some-other-identity", secrets.token_bytes(32))
    with Listener() as listener, openssl_psk_client(psk, listener.port) as peer:
        sock, session = serve_one(plugins, listener, ring.serial, (mode,))
        with sock:
            assert session.remote_auth == (serial,)
            assert session.cipher.endswith(hash_name.upper())
            assert session.details["psk_mode"] == mode
            assert session.tx_seq == 0  # no session ticket reached the client
            prove_server_keys(sock, session, peer)


@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_server_against_gnutls_client(plugins: pluggy.PluginManager, ring: ThrowawayKeyring, mode: str) -> None:
    psk = psk_for("sha256", mode=mode)
    serial = ring.add(psk.identity, psk.secret)
    with Listener() as listener, gnutls_psk_client(psk, listener.port) as peer:
        sock, session = serve_one(plugins, listener, ring.serial, ("psk_dhe_ke", "psk_ke"))
        with sock:
            assert session.remote_auth == (serial,)
            assert session.details["psk_mode"] == mode
            peer.wait_for("Handshake was completed", TIMEOUT)
            prove_server_keys(sock, session, peer)


def tlslite_client(port: int, psks: list[tuple[str, bytes, str]], result: dict[str, object]) -> threading.Thread:
    """tlslite-ng (an independent TLS 1.3 stack) offering several identities in one ClientHello."""
    from tlslite import HandshakeSettings, TLSConnection

    def run() -> None:
        try:
            settings = HandshakeSettings()
            settings.minVersion = settings.maxVersion = (3, 4)
            settings.pskConfigs = [(ident.encode(), key, hash_name) for ident, key, hash_name in psks]
            settings.psk_modes = ["psk_dhe_ke"]
            with socket.create_connection((LOOPBACK, port), timeout=TIMEOUT) as sock:
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
    with Listener() as listener:
        thread = tlslite_client(listener.port, offered, result)
        sock, session = serve_one(plugins, listener, ring.serial)
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
    psk = psk_for("sha256")
    serial = ring.add(psk.identity, psk.secret)
    with openssl_psk_server(psk) as peer, connect(peer.port, timeout=TIMEOUT) as sock:
        session = handshake(plugins, sock, "client", ring.serial, (gone, too_short, serial))
        assert session.remote_auth == (serial,)
        assert_records_roundtrip(records_for(sock, session), peer)


def test_client_with_no_usable_key_is_eio(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    too_short = ring.add("short-key", secrets.token_bytes(16))
    with Listener() as listener, connect(listener.port, timeout=TIMEOUT) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (too_short,))
    assert info.value.status == errno.EIO


# --- failures -----------------------------------------------------------------------------------

def test_client_with_wrong_key_is_eacces(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    serial = ring.add(ID256, secrets.token_bytes(32))
    with openssl_psk_server(psk_for("sha256")) as peer, connect(peer.port, timeout=TIMEOUT) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (serial,))
    assert info.value.status == errno.EACCES


def test_server_with_wrong_key_is_eacces(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    ring.add(ID256, secrets.token_bytes(32))
    with Listener() as listener, openssl_psk_client(psk_for("sha256"), listener.port):
        with pytest.raises(HandshakeError) as info:
            serve_one(plugins, listener, ring.serial)
    assert info.value.status == errno.EACCES


def test_server_with_unknown_identity_is_ekeyrejected(plugins: pluggy.PluginManager,
                                                      ring: ThrowawayKeyring) -> None:
    ring.add("someone-else", secrets.token_bytes(32))
    with Listener() as listener, gnutls_psk_client(psk_for("sha256"), listener.port) as peer:
        with pytest.raises(HandshakeError) as info:
            serve_one(plugins, listener, ring.serial)
        peer.wait_for(re.escape("Received alert [115]"), TIMEOUT)  # unknown_psk_identity, as tlshd sends it
    assert info.value.status == errno.EKEYREJECTED


def test_client_told_unknown_identity_is_ekeyrejected(plugins: pluggy.PluginManager) -> None:
    """hsd against hsd: the server's unknown_psk_identity alert becomes the client's EKEYREJECTED."""
    with ThrowawayKeyring() as client_ring, ThrowawayKeyring() as server_ring:
        serial = client_ring.add(ID256, secrets.token_bytes(32))
        server_ring.add("someone-else", secrets.token_bytes(32))
        outcome: dict[str, BaseException] = {}
        with Listener() as listener:
            def serve() -> None:
                try:
                    serve_one(plugins, listener, server_ring.serial)
                except BaseException as exc:  # reported below
                    outcome["server"] = exc
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            with connect(listener.port, timeout=TIMEOUT) as sock, pytest.raises(HandshakeError) as info:
                handshake(plugins, sock, "client", client_ring.serial, (serial,))
            thread.join(TIMEOUT)
        assert info.value.status == errno.EKEYREJECTED
        assert getattr(outcome.get("server"), "status", None) == errno.EKEYREJECTED


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_servers_see_only_their_own_keyring(plugins: pluggy.PluginManager) -> None:
    """Same identity, a different key per request: any leak between keyrings fails a handshake."""
    count = 4
    psks = [psk_for("sha256") for _ in range(count)]
    results: dict[int, object] = {}
    peers: list[PeerProcess] = []

    def serve(index: int, listener: Listener, ring: ThrowawayKeyring) -> None:
        try:
            sock, session = serve_one(plugins, listener, ring.serial)
            with sock:
                results[index] = session.remote_auth
                prove_server_keys(sock, session, peers[index])
        except BaseException as exc:  # reported below
            results[index] = exc

    with contextlib.ExitStack() as stack:
        rings = [stack.enter_context(ThrowawayKeyring()) for _ in range(count)]
        serials = [ring.add(psk.identity, psk.secret) for ring, psk in zip(rings, psks)]
        listeners = [stack.enter_context(Listener()) for _ in range(count)]
        peers += [stack.enter_context(gnutls_psk_client(psk, listener.port)) for psk, listener in zip(psks, listeners)]
        threads = [threading.Thread(target=serve, args=(i, listeners[i], rings[i])) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
    assert results == {i: (serials[i],) for i in range(count)}


def test_server_finds_keys_in_a_configured_keyring(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    """[authenticate] keyrings= names are resolved per request; ACCEPT carried no keyring here."""
    psk = psk_for("sha256")
    serial = ring.add(psk.identity, psk.secret)
    with Listener() as listener, openssl_psk_client(psk, listener.port) as peer:
        sock, session = serve_one(plugins, listener, 0, keyring_names=(ring.name,))
        with sock:
            assert session.remote_auth == (serial,)
            prove_server_keys(sock, session, peer)


NOBODY = 65534


def _hold_keyring(name: str, keys: dict[str, bytes], uid: int, report: int, release: int) -> None:
    """In a forked child: become uid, make the keyring in our own process keyring, report, wait, exit.

    The process keyring is the child's, so no keyring of the test process
    reaches the new one: only /proc/keys shows it.  Everyone may view, read and
    search it and its keys - what a local user planting a keyring would grant."""
    try:
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        ring = keyring.add_key("keyring", name, b"", keyring.KEY_SPEC_PROCESS_KEYRING)
        serials = {ident: keyring.add_key("user", ident, secret, ring) for ident, secret in keys.items()}
        for serial in (ring, *serials.values()):
            keyring.set_perm(serial, 0x3F3F3F3F)
        os.write(report, json.dumps({"ring": ring, "keys": serials}).encode() + b"\n")
        os.read(release, 1)  # returns when the parent closes its end
        os._exit(0)
    except BaseException as exc:  # reported to the parent, never raised into pytest's copy
        os.write(report, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        os._exit(1)


@contextlib.contextmanager
def held_keyring(name: str, keys: dict[str, bytes], uid: int = 0) -> Iterator[tuple[int, dict[str, int]]]:
    """A real keyring called name, owned by uid, holding these PSKs: (its serial, identity -> key serial)."""
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(release_w)
        _hold_keyring(name, keys, uid, report_w, release_r)
    os.close(report_w)
    os.close(release_r)
    try:
        with os.fdopen(report_r, "rb") as reader:
            held = json.loads(reader.readline() or b'{"error": "the child said nothing"}')
        if "error" in held:
            pytest.fail(f"could not make a keyring as uid {uid}: {held['error']}")
        yield held["ring"], held["keys"]
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


def test_a_planted_keyring_of_another_user_is_not_used(plugins: pluggy.PluginManager,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Any local user can name a keyring like a configured one and fill it with PSKs of its choice."""
    name = f"hsd-test-configured-{uuid.uuid4().hex}"
    planted = psk_for("sha256")
    with held_keyring(name, {planted.identity: planted.secret}, uid=NOBODY) as (ring, _keys):
        assert keyring.describe_key(ring)[1] == NOBODY  # real, and visible to hsd
        with Listener() as listener, openssl_psk_client(planted, listener.port):
            with caplog.at_level(logging.WARNING, logger="hsd.psk"), pytest.raises(HandshakeError) as info:
                serve_one(plugins, listener, 0, keyring_names=(name,))
    assert info.value.status == errno.EKEYREJECTED  # the planted identity is unknown to hsd
    assert f"not using keyring '{name}' ({ring}): it is owned by uid {NOBODY}" in caplog.text


def test_the_root_keyring_is_found_behind_a_planted_one(plugins: pluggy.PluginManager) -> None:
    """Both keyrings only in /proc/keys, the planted one listed first: hsd still uses root's."""
    name = f"hsd-test-configured-{uuid.uuid4().hex}"
    real, fake = psk_for("sha256"), psk_for("sha256")
    with contextlib.ExitStack() as stack:
        # Serials are random and /proc/keys lists keyrings by serial.  Plant several first, then make
        # the real keyring again until its serial is above the lowest planted one: that planted one is
        # then listed first.  (Planting after one real keyring failed about 1 run in 40: a real serial
        # low in the range leaves hardly any room below it.)
        planted = [stack.enter_context(held_keyring(name, {fake.identity: fake.secret}, uid=NOBODY))[0]
                   for _ in range(8)]
        real_keys: set[int] = set()  # every root-owned key made: a dropped attempt's keyring lives on
        for _ in range(40):              # until the kernel's key GC runs, and may be found first
            attempt = contextlib.ExitStack()
            ring, keys = attempt.enter_context(held_keyring(name, {real.identity: real.secret}))
            real_keys.add(keys[real.identity])
            if min(planted) < ring:
                stack.enter_context(attempt)
                break
            attempt.close()
        else:
            pytest.fail("no real keyring got a serial above the lowest planted one's")
        with Listener() as listener, openssl_psk_client(real, listener.port) as peer:
            sock, session = serve_one(plugins, listener, 0, keyring_names=(name,))
            with sock:
                (used,) = session.remote_auth
                assert used in real_keys, f"remote-auth {used} is not one of root's keys {real_keys}"
                prove_server_keys(sock, session, peer)


def test_server_without_the_keyring_rejects_the_identity(plugins: pluggy.PluginManager,
                                                         ring: ThrowawayKeyring) -> None:
    """A key in a keyring this request was not given stays invisible (EKEYREJECTED)."""
    psk = psk_for("sha256")
    ring.add(psk.identity, psk.secret)
    with Listener() as listener, openssl_psk_client(psk, listener.port):
        with pytest.raises(HandshakeError) as info:
            serve_one(plugins, listener, 0)
    assert info.value.status == errno.EKEYREJECTED


def test_server_rejects_a_client_offering_no_psk(plugins: pluggy.PluginManager, ring: ThrowawayKeyring) -> None:
    ring.add(ID256, secrets.token_bytes(32))
    with Listener() as listener, PeerProcess(["openssl", "s_client", "-connect", f"{LOOPBACK}:{listener.port}",
                                              "-tls1_3"], "openssl s_client (no psk)"):
        with pytest.raises(HandshakeError) as info:
            serve_one(plugins, listener, ring.serial)
    assert info.value.status == errno.EACCES


def test_backend_without_psk_mechanics_is_unsupported(plugins: pluggy.PluginManager,
                                                      ring: ThrowawayKeyring) -> None:
    serial = ring.add(ID256, secrets.token_bytes(32))
    with Listener() as listener, connect(listener.port, timeout=TIMEOUT) as sock:
        with pytest.raises(HandshakeError) as info:
            handshake(plugins, sock, "client", ring.serial, (serial,), backend="no-such-backend")
    assert info.value.status == errno.EOPNOTSUPP
    assert "no-such-backend" in info.value.reason


def test_the_policy_only_offers_keys_and_is_asked_only_for_psk(plugins, ring: ThrowawayKeyring) -> None:
    """The policy runs no handshake of its own (it has no hsd_handshake to take other modes with); for a
    PSK request it offers the ACCEPT's keys in order, and the host wipes them when the request ends."""
    assert not hasattr(hsd_psk, "hsd_handshake")
    first, second = secrets.token_bytes(32), secrets.token_bytes(48)
    serials = (ring.add(ID256, first), ring.add(ID384, second))
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                               peer_identities=serials, keyring=ring.serial)
    ctx = HandshakeContext(request=request, sock=socket.socket(), deadline=time.monotonic() + 1, backend="openssl")
    with ctx.sock:
        offer = hsd_psk.hsd_psk_offer(ctx=ctx)
    assert [(key.serial, key.hash, bytes(key.secret)) for key in offer.keys] == \
        [(serials[0], "sha256", first), (serials[1], "sha384", second)]
    offer.wipe()
    assert all(not any(key.secret) for key in offer.keys)
    info = hsd_psk.hsd_backend_info()
    assert info.name == "psk" and info.kind == "policy"
    assert {str(mode) for mode in info.modes} == {"client/psk", "server/psk"}


# --- the whole path: simulated NVMe host -> dispatcher -> psk policy -> openssl -> kTLS ---------

def test_nvme_host_request_through_the_dispatcher(ring: ThrowawayKeyring) -> None:
    from hsd.dispatcher import Dispatcher
    from hsd.plugins import PluginHost
    from hsd_kit.simulator import Simulator

    psk = psk_for("sha384")
    serial = ring.add(psk.identity, psk.secret)
    config = Config(backend="openssl")
    host = PluginHost(config)
    assert host.add("psk", hsd_psk) is not None
    assert host.add("openssl", hsd_openssl) is not None
    with Simulator() as sim, openssl_psk_server(psk) as peer, connect(peer.port, timeout=TIMEOUT) as mine:
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
            assert_ktls_roundtrip(request, peer, label="nvme")  # under the keys installed in the kernel
        finally:
            stop.set()
            thread.join(15)
            channel.close()
