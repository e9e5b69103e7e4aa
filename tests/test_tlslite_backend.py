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

import pluggy
import pytest

import hsd_openssl
import hsd_psk
import hsd_tlslite
import hsd_tlslite.handshake
from hsd.config import Config
from hsd.credentials import X509Credentials
from hsd.ktls import session_crypto_info
from hsd.session import Session
from hsd_kit.handshakes import expect_handshake_error, handshake_context, plugin_manager
from hsd_kit.handshakes import run_handshake as run_hooks
from hsd_kit.harness import assert_records_pair, assert_records_roundtrip
from hsd_kit.keyrings import ThrowawayKeyring
from hsd_kit.peers import (
    Listener,
    PeerOptions,
    PskSecret,
    ServerPeer,
    closing_peer,
    garbage_peer,
    gnutls_psk_server,
    gnutls_server,
    openssl_client,
    openssl_psk_client,
    openssl_psk_server,
    openssl_server,
    silent_peer,
)
from hsd_kit.pki import TestPki, certificate_der, load_crls, x509_credentials
from hsd_kit.records import KtlsRecordChecker, session_records

TIMEOUT = 20.0
BACKENDS = ("tlslite", "openssl")
SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
          "TLS_AES_128_CCM_SHA256")
TIMINGS: dict[str, list[float]] = {}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(name="pki")
def _pki(hsd_pki: TestPki) -> TestPki:
    """The test kit's PKI (one per session)."""
    return hsd_pki


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_tlslite, hsd_openssl, hsd_psk)


@pytest.fixture(name="ring")
def _ring(hsd_keyring: ThrowawayKeyring) -> ThrowawayKeyring:
    """A fresh kernel keyring per test (the test kit's hsd_keyring)."""
    return hsd_keyring


def run_handshake(plugins: pluggy.PluginManager, sock: socket.socket, backend: str, role: str, auth: str,
                  creds: X509Credentials | None = None, peername: str | None = "localhost",
                  timeout: float = TIMEOUT, config: Config | None = None, **request) -> Session:
    """One handshake through the hooks; its duration goes to the figures printed at the end."""
    ctx = handshake_context(sock, role, auth, backend=backend, config=config, x509=creds, timeout=timeout,
                            peername=peername, **request)
    started = time.perf_counter()
    session = run_hooks(plugins, ctx)
    TIMINGS.setdefault(f"{backend} {role}/{auth}", []).append(time.perf_counter() - started)
    return session


def records_for(sock: socket.socket, session: Session) -> KtlsRecordChecker:
    return session_records(sock, session, TIMEOUT)


def reversing_server(pki: TestPki, pair=None, **options) -> ServerPeer:
    """s_server -rev: reverses each line it gets, so one exchange proves both directions' keys."""
    pair = pair or pki.server
    return openssl_server(PeerOptions(cert=pair.cert, key=pair.key, extra=["-rev"], **options))


def reversed_line(layer: KtlsRecordChecker, text: bytes) -> None:
    layer.send(text + b"\n")
    assert layer.recv_until(b"\n").strip() == text[::-1]


# --- client role --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suite", SUITES)
def test_client_unauth_each_suite_against_openssl(plugins, pki, backend: str, suite: str) -> None:
    with reversing_server(pki, suites=[suite]) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, backend, "client", "unauth", x509_credentials(pki))
        assert session.cipher == suite
        assert (session.tx_seq, session.rx_seq) == (0, 0)
        assert session.peer_certificates[0] == certificate_der(pki.server.cert)
        reversed_line(records_for(sock, session), b"hello-" + suite.encode())


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_unauth_by_ip_address_against_gnutls(plugins, pki, backend: str) -> None:
    with gnutls_server(PeerOptions(cert=pki.server.chain, key=pki.server.key)) as server, \
            server.connect() as sock:
        session = run_handshake(plugins, sock, backend, "client", "unauth", x509_credentials(pki),
                                peername="127.0.0.1")
        assert_records_roundtrip(records_for(sock, session), server, echo=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_x509_presents_certificate_to_verifying_server(plugins, pki, backend: str) -> None:
    with reversing_server(pki, ca=pki.ca, require_client_cert=True) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, backend, "client", "x509", x509_credentials(pki, pki.client))
        reversed_line(records_for(sock, session), b"mutual")
    assert "client.test" in server.output  # s_server printed the verified client certificate subject


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["wrong-host", "untrusted", "expired", "revoked", "no-peername"])
def test_client_rejects_bad_server(plugins, pki, backend: str, case: str) -> None:
    pair = {"untrusted": pki.untrusted_server, "expired": pki.expired_server,
            "revoked": pki.revoked_server}.get(case, pki.server)
    creds = x509_credentials(pki)
    if case == "revoked":
        creds.crls = load_crls(pki.crl)
    peername = {"wrong-host": "other.example", "no-peername": None}.get(case, "localhost")
    fragment = {"wrong-host": "mismatch", "untrusted": "issuer", "expired": "expired", "revoked": "revoked",
                "no-peername": "peer name"}[case]
    with reversing_server(pki, pair=pair) as server, server.connect() as sock:
        expect_handshake_error(errno.EACCES, fragment, run_handshake, plugins, sock, backend, "client", "unauth",
                               creds, peername=peername, timeout=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_verify_off_accepts_untrusted_server(plugins, pki, backend: str) -> None:
    with reversing_server(pki, pair=pki.untrusted_server) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, backend, "client", "unauth", x509_credentials(pki, verify_peer=False))
        reversed_line(records_for(sock, session), b"unverified")


BROKEN_PEERS = {  # behaviour -> (scripted peer, DONE status, reason fragment)
    "close": (lambda: closing_peer(partial=b""), errno.ETIMEDOUT, "closed"),
    "silent": (silent_peer, errno.ETIMEDOUT, "timed out"),
    "garbage": (lambda: garbage_peer(b"HTTP/1.1 400 Bad Request\r\n\r\n"), errno.EACCES, "not TLS"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("behaviour", sorted(BROKEN_PEERS))
def test_client_against_broken_peer(plugins, pki, backend: str, behaviour: str) -> None:
    make_peer, status, fragment = BROKEN_PEERS[behaviour]
    with make_peer() as peer, peer.connect() as sock:
        expect_handshake_error(status, fragment, run_handshake, plugins, sock, backend, "client", "unauth",
                               x509_credentials(pki), timeout=1.5)
        assert sock.fileno() >= 0  # the backend never closes the core's socket


# --- server role --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("client_cert", [False, True])
def test_server_x509_against_openssl_client(plugins, pki, backend: str, client_cert: bool) -> None:
    options = PeerOptions(ca=pki.ca)
    if client_cert:
        options.cert, options.key = pki.client.cert, pki.client.key
    with Listener() as listener, openssl_client(options, listener.port) as peer:
        with listener.accept(TIMEOUT) as sock:
            session = run_handshake(plugins, sock, backend, "server", "x509", x509_credentials(pki, pki.server))
            assert bool(session.peer_certificates) == client_cert
            assert_records_roundtrip(records_for(sock, session), peer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["missing-required", "untrusted-client", "san-not-allowed"])
def test_server_rejects_bad_client(plugins, pki, backend: str, case: str) -> None:
    creds = x509_credentials(pki, pki.server)
    options = PeerOptions(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    if case == "missing-required":
        creds.require_peer_cert, options.cert, options.key = True, None, None
        fragment = "no certificate"
    elif case == "untrusted-client":  # a certificate from a CA the server does not trust
        options.cert, options.key = pki.untrusted_server.cert, pki.untrusted_server.key
        fragment = "verify failed"
    else:
        creds.allowed_sans = ["someone-else.test"]
        fragment = "allowed_client_sans"
    with Listener() as listener, openssl_client(options, listener.port):
        with listener.accept(TIMEOUT) as sock:
            expect_handshake_error(errno.EACCES, fragment, run_handshake, plugins, sock, backend, "server", "x509",
                                   creds, timeout=5)


# --- PSK (keys in kernel keyrings, chosen by the PSK policy plugin) ------------------------------

IDENTITY = "NVMe0R01 nqn.2024-01.org.example.host-tl nqn.2014-08.org.nvmexpress.discovery"


def test_tlslite_psk_client_against_openssl(plugins, ring) -> None:
    psk = PskSecret(IDENTITY, secrets.token_bytes(32))
    serial = ring.add(IDENTITY, psk.secret)
    with openssl_psk_server(psk, extra=("-rev",)) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, "tlslite", "client", "psk", None,
                                peer_identities=(serial,), keyring=ring.serial)
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith("SHA256")
        assert session.details["psk_mode"] == "psk_dhe_ke"
        reversed_line(records_for(sock, session), b"psk-client")


@pytest.mark.parametrize("hash_name", ["sha256"])  # sha384 vs gnutls-serv: illegal_parameter, see the report
@pytest.mark.parametrize("mode", ["psk_dhe_ke", "psk_ke"])
def test_tlslite_psk_client_against_gnutls(plugins, ring, hash_name: str, mode: str) -> None:
    """gnutls-serv as an independent PSK server, in both key-exchange modes."""
    psk = PskSecret(IDENTITY, secrets.token_bytes(32 if hash_name == "sha256" else 48), hash_name, mode)
    serial = ring.add(IDENTITY, psk.secret)
    with gnutls_psk_server(psk) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, "tlslite", "client", "psk", None, config=Config(psk_modes=[mode]),
                                peer_identities=(serial,), keyring=ring.serial)
        assert session.remote_auth == (serial,)
        assert session.cipher.endswith(hash_name.upper())
        assert session.details["psk_mode"] == mode
        assert_records_roundtrip(records_for(sock, session), server, echo=True)


def test_tlslite_psk_server_against_openssl_client(plugins, ring) -> None:
    psk = PskSecret(IDENTITY, secrets.token_bytes(32))
    ring.add("decoy identity", secrets.token_bytes(32))
    serial = ring.add(IDENTITY, psk.secret)
    with Listener() as listener, openssl_psk_client(psk, listener.port) as peer:
        with listener.accept(TIMEOUT) as sock:
            session = run_handshake(plugins, sock, "tlslite", "server", "psk", None, peername=None,
                                    keyring=ring.serial)
            assert session.remote_auth == (serial,)
            assert_records_roundtrip(records_for(sock, session), peer)


def test_tlslite_psk_server_unknown_identity(plugins, ring) -> None:
    ring.add(IDENTITY, secrets.token_bytes(32))
    stranger = PskSecret("nobody-knows-me", secrets.token_bytes(32))
    with Listener() as listener, openssl_psk_client(stranger, listener.port) as peer:
        with listener.accept(TIMEOUT) as sock:
            expect_handshake_error(errno.EKEYREJECTED, "1 unknown PSK identities", run_handshake, plugins, sock,
                                   "tlslite", "server", "psk", None, peername=None, keyring=ring.serial, timeout=5)
        peer.wait_for("unknown psk identity", TIMEOUT)


# --- internals: the kTLS keys are tlslite's own record-layer keys; nothing was over-read ---------

def test_ktls_keys_equal_tlslite_record_layer(plugins, pki, monkeypatch) -> None:
    seen = {}
    real_run = hsd_tlslite.handshake.run

    def capture(*args, **kw):
        conn, transport = real_run(*args, **kw)
        seen["conn"], seen["transport"] = conn, transport
        layer = conn._recordLayer  # tlslite's keys as the handshake left them (build_session zeroes them)
        seen["keys"] = [(bytes(state.encContext.key), bytes(state.fixedNonce), state.seqnum)
                        for state in (layer._writeState, layer._readState)]
        return conn, transport

    monkeypatch.setattr(hsd_tlslite.handshake, "run", capture)
    with reversing_server(pki, suites=["TLS_CHACHA20_POLY1305_SHA256"]) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, "tlslite", "client", "unauth", x509_credentials(pki))
        tx, rx = session_crypto_info(session)
        for info, (key, nonce, seqnum) in zip((tx, rx), seen["keys"]):
            assert key == info.key and nonce == info.nonce_base() and seqnum == info.rec_seq
        layer = seen["conn"]._recordLayer  # once hsd has its copies, tlslite's are zeroed in place
        for state in (layer._writeState, layer._readState):
            assert not any(state.encContext.key) and not any(state.fixedNonce)
        tls_session = seen["conn"].session
        for name in ("masterSecret", "cl_app_secret", "sr_app_secret", "exporterMasterSecret",
                     "resumptionMasterSecret"):
            secret = getattr(tls_session, name)
            assert len(secret) >= 32 and not any(secret), name
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
                                              x509_credentials(pki, pki.server, require_peer_cert=auth == "x509"))
        except BaseException as exc:  # reported below
            results["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = run_handshake(plugins, client_sock, client_backend, "client", auth,
                               x509_credentials(pki, pki.client if auth == "x509" else None))
    finally:
        thread.join(TIMEOUT)
    server = results["server"]
    assert isinstance(server, Session), server
    assert client.cipher == server.cipher
    assert bool(server.peer_certificates) == (auth == "x509")
    assert_records_pair(records_for(client_sock, client), records_for(server_sock, server))
    client_sock.close()
    server_sock.close()


def teardown_module() -> None:
    for name, values in sorted(TIMINGS.items()):
        ok = sorted(values)
        print(f"\nhandshake {name}: n={len(ok)} median={ok[len(ok) // 2] * 1000:.1f} ms max={ok[-1] * 1000:.1f} ms")


def test_importing_the_backend_warns_nothing_a_user_could_act_on() -> None:
    """tlslite-ng's asyncore DeprecationWarning stays out of users' runs (pytest or not), warnings as errors."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", "import hsd_tlslite"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr


# --- the library's ciphers and X25519 under tlslite (hsd_tlslite.accel) ---------------------------

def test_library_ciphers_and_x25519_agree_with_tlslites_own() -> None:
    """Same output as tlslite's pure-Python code on random inputs; a tampered record or a small-order
    X25519 point fails the way tlslite's own functions fail (None / all zeros, which tlslite rejects)."""
    from tlslite.recordlayer import RecordLayer
    from tlslite.utils import cipherfactory, x25519

    from hsd_tlslite import accel

    for make, reference, sizes in ((accel.create_aesgcm, cipherfactory.createAESGCM, (16, 32)),
                                   (accel.create_aesccm, cipherfactory.createAESCCM, (16, 32)),
                                   (accel.create_chacha20, cipherfactory.createCHACHA20, (32,))):
        for size in sizes:
            key = bytearray(secrets.token_bytes(size))
            ours, theirs = make(key), reference(key, ["python"])
            assert (ours.name, ours.tagLength, ours.nonceLength) == (theirs.name, theirs.tagLength, theirs.nonceLength)
            nonce, text, data = (bytearray(secrets.token_bytes(n)) for n in (12, 300, 5))
            sealed = ours.seal(nonce, text, data)
            assert sealed == theirs.seal(nonce, text, data)
            assert theirs.open(nonce, sealed, data) == text == ours.open(nonce, sealed, data)
            sealed[7] ^= 1
            assert ours.open(nonce, sealed, data) is None
            assert ours.open(nonce, sealed[:15], data) is None
            with pytest.raises(ValueError):
                ours.seal(nonce[:8], text, data)
    for _ in range(10):
        scalar, point = bytearray(secrets.token_bytes(32)), bytearray(secrets.token_bytes(32))
        assert accel.x25519(scalar, bytearray(x25519.X25519_G)) == x25519.x25519(scalar, bytearray(x25519.X25519_G))
        assert accel.x25519(scalar, point) == x25519.x25519(scalar, point)
    assert accel.x25519(bytearray(secrets.token_bytes(32)), bytearray(32)) == bytearray(32)
    # ECDSA: each side verifies the other's signatures; a changed signature or digest does not verify
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec
    from tlslite.utils.python_ecdsakey import Python_ECDSAKey

    for curve, name, digest in ((ec.SECP256R1(), "NIST256p", "sha256"), (ec.SECP384R1(), "NIST384p", "sha384")):
        numbers = ec.generate_private_key(curve).private_numbers()
        key = Python_ECDSAKey(numbers.public_numbers.x, numbers.public_numbers.y, name, numbers.private_value)
        hashed = bytearray(getattr(hashlib, digest)(secrets.token_bytes(10)).digest())
        ours, theirs = key._sign(hashed, digest), accel._python_sign(key, hashed, digest)
        assert accel._python_verify(key, ours, hashed) and key._verify(theirs, hashed) and key._verify(ours, hashed)
        bad = bytearray(theirs)
        bad[-3] ^= 1
        other = bytearray(hashed)
        other[0] ^= 1
        assert not key._verify(bad, hashed) and not key._verify(ours, other)
        assert not key._verify(bytearray(b"\x30\x00"), hashed)
    # what tlslite's record layer, key exchange and ECDSA keys call now
    import tlslite.keyexchange
    assert Python_ECDSAKey._verify is accel.ecdsa_verify and Python_ECDSAKey._sign is accel.ecdsa_sign
    assert RecordLayer._getCipherSettings(0x1301)[2] is accel.create_aesgcm
    assert RecordLayer._getCipherSettings(0x1303)[2] is accel.create_chacha20
    assert tlslite.keyexchange.x25519 is accel.x25519


def test_handshake_records_use_the_library_and_never_hand_it_the_application_keys(plugins, pki,
                                                                                    monkeypatch) -> None:
    """The handshake's records go through the library ciphers; the application-traffic keys tlslite
    derives (kTLS gets its own from the secrets) never reach the library."""
    from hsd_tlslite import accel

    built: list[bytes] = []
    created: list[bytearray] = []
    real_init, real_get = accel.LazyAEAD.__init__, accel.LazyAEAD._get

    def init(self, key, name, factory):
        created.append(key)
        real_init(self, key, name, factory)

    def get(self):
        if self._cipher is None:
            built.append(bytes(self.key))
        return real_get(self)

    monkeypatch.setattr(accel.LazyAEAD, "__init__", init)
    monkeypatch.setattr(accel.LazyAEAD, "_get", get)
    with reversing_server(pki, suites=["TLS_AES_128_GCM_SHA256"]) as server, server.connect() as sock:
        session = run_handshake(plugins, sock, "tlslite", "client", "unauth", x509_credentials(pki))
        tx, rx = session_crypto_info(session)
        app_keys = {bytes(tx.key), bytes(rx.key)}
        reversed_line(records_for(sock, session), b"accel")
    assert len(built) == 2 and len(created) == 4  # handshake read + write keys built; app keys only created
    assert not app_keys & set(built)
