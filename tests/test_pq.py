"""x509.pq.certificate / x509.pq.private_key: a second, ML-DSA identity next to the classic one.

hsd (OpenSSL backend, bundled OpenSSL 4.0) against hsd over loopback TCP gets
the ML-DSA certificate with its own intermediate; the system's OpenSSL 3.0 and
GnuTLS 3.7 tools, which know no ML-DSA, get the classic P-256 one from the very
same configuration.  Application data through hsd_kit.records (keyed only
by the crypto_info hsd would install) proves the kTLS keys of each handshake.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pluggy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding

import hsd_openssl
import hsd_tlslite
from hsd_tlslite import identity as tlslite_identity
from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.daemon import serve
from hsd.credentials import X509Credentials, load_x509
from hsd.errors import CredentialError, PeerRejected
from hsd.dispatcher import settings_of
from hsd.plugins import PluginHost
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd_kit.simulator import Simulator
from hsd_kit import peers
from hsd_kit.handshakes import plugin_host, run_handshake
from hsd_kit.pki_pq import PqPki, make_pq_pki
from hsd_kit.records import session_records

CLASSIC_LEAF = r"O ?= ?hsd test, CN ?= ?localhost"  # openssl 3.0 prints "O = x, CN = y", 3.5+ "O=x, CN=y"

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-cli")),
                                reason="needs the openssl and gnutls-bin command-line tools")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PqPki:
    return make_pq_pki(str(tmp_path_factory.mktemp("pqpki")))


def backend(module) -> PluginHost:
    return plugin_host(module)


@pytest.fixture(scope="module")
def openssl_backend() -> pluggy.PluginManager:
    return backend(hsd_openssl)


def server_config(pki: PqPki, *, pq: bool = True, require_client_cert: bool = False) -> Config:
    config = Config()
    config.server.truststore = pki.trust_both
    config.server.certificate, config.server.private_key = pki.classic.server.cert, pki.classic.server.key
    if pq:
        config.server.pq_certificate, config.server.pq_private_key = pki.server.chain, pki.server.key
    config.require_client_certificate = require_client_cert
    return config


def client_config(pki: PqPki, *, trust: str | None = None, mutual: bool = False, pq: bool = True) -> Config:
    config = Config()
    config.client.truststore = trust or pki.trust_both
    if mutual:
        config.client.certificate, config.client.private_key = pki.classic.client.cert, pki.classic.client.key
        if pq:
            config.client.pq_certificate, config.client.pq_private_key = pki.client.chain, pki.client.key
    return config


def request(sock: socket.socket, role: str, auth: str = "x509") -> HandshakeRequest:
    return HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AuthMode.X509 if auth == "x509" else AuthMode.UNAUTH,
        timeout_ms=10_000,
        peername="localhost" if role == "client" else None,
    )


def context(sock: socket.socket, role: str, config: Config, *, auth: str = "x509",
            backend_name: str = "openssl") -> HandshakeContext:
    req = request(sock, role, auth)
    return HandshakeContext(request=req, sock=sock, deadline=time.monotonic() + 10, backend=backend_name,
                            x509=load_x509(config, req), settings=settings_of(config))


def handshake(plugins: pluggy.PluginManager, ctx: HandshakeContext) -> Session:
    return run_handshake(plugins, ctx)


def tcp_pair(cleanup: list) -> tuple[socket.socket, socket.socket]:
    """(client end, server end) of a loopback TCP connection, both non-blocking like kernel-handed fds."""
    listener = peers.Listener()
    cleanup.append(listener)
    client = socket.create_connection(("127.0.0.1", listener.port))
    client.setblocking(False)
    cleanup.append(client)
    server = listener.accept()
    cleanup.append(server)
    return client, server


def hsd_to_hsd(plugins: pluggy.PluginManager, cleanup: list, server_cfg: Config, client_cfg: Config,
               client_auth: str = "unauth") -> tuple[Session, Session, socket.socket, socket.socket]:
    """Two hsd OpenSSL-backend handshakes, server in a thread, client here; returns both sessions."""
    client_sock, server_sock = tcp_pair(cleanup)
    server_ctx = context(server_sock, "server", server_cfg)
    client_ctx = context(client_sock, "client", client_cfg, auth=client_auth)
    outcome: dict[str, object] = {}

    def serve() -> None:
        try:
            outcome["session"] = handshake(plugins, server_ctx)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=serve, name="hsd-server")
    thread.start()
    try:
        client_session = handshake(plugins, client_ctx)
    finally:
        thread.join(15)
    assert not thread.is_alive(), "server handshake did not finish"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return client_session, outcome["session"], client_sock, server_sock  # type: ignore[return-value]


def leaf_key(session: Session):
    assert session.peer_certificates, "the peer sent no certificate"
    return x509.load_der_x509_certificate(session.peer_certificates[0]).public_key()


def prove_ktls_keys(client: Session, server: Session, client_sock: socket.socket,
                    server_sock: socket.socket) -> None:
    """Both directions, each side keyed only by the crypto_info hsd would install."""
    client_records = session_records(client_sock, client)
    server_records = session_records(server_sock, server)
    client_records.send(b"ping from the hsd client\n")
    assert server_records.recv_until(b"\n") == b"ping from the hsd client\n"
    server_records.send(b"pong from the hsd server\n")
    assert client_records.recv_until(b"\n") == b"pong from the hsd server\n"


def pem_der(path: str) -> bytes:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read()).public_bytes(Encoding.DER)


# ---------------------------------------------------------------- hsd <-> hsd: ML-DSA on both sides


def test_mldsa_capable_client_gets_the_mldsa_chain(openssl_backend, pki, cleanup) -> None:
    client, server, client_sock, server_sock = hsd_to_hsd(openssl_backend, cleanup, server_config(pki),
                                                          client_config(pki))
    assert isinstance(leaf_key(client), mldsa.MLDSA65PublicKey)
    # the ML-DSA leaf travels with its own intermediate, not with the classic pair's
    assert client.peer_certificates == (pki.server.leaf_der, pki.server.intermediate_der)
    assert server.peer_certificates == ()
    prove_ktls_keys(client, server, client_sock, server_sock)


def test_without_pq_keys_the_same_client_gets_the_classic_certificate(openssl_backend, pki, cleanup) -> None:
    client, server, client_sock, server_sock = hsd_to_hsd(openssl_backend, cleanup, server_config(pki, pq=False),
                                                          client_config(pki))
    assert isinstance(leaf_key(client), ec.EllipticCurvePublicKey)
    assert client.peer_certificates[0] == pem_der(pki.classic.server.cert)
    prove_ktls_keys(client, server, client_sock, server_sock)


def test_mutual_tls_client_presents_its_mldsa_certificate(openssl_backend, pki, cleanup) -> None:
    client, server, client_sock, server_sock = hsd_to_hsd(
        openssl_backend, cleanup, server_config(pki, require_client_cert=True), client_config(pki, mutual=True),
        client_auth="x509")
    assert isinstance(leaf_key(server), mldsa.MLDSA65PublicKey)
    assert server.peer_certificates == (pki.client.leaf_der, pki.client.intermediate_der)
    assert isinstance(leaf_key(client), mldsa.MLDSA65PublicKey)
    prove_ktls_keys(client, server, client_sock, server_sock)


def test_client_trusting_only_the_classic_ca_rejects_the_mldsa_chain(openssl_backend, pki, cleanup) -> None:
    """Shows the ML-DSA chain is really verified: without its root in the trust store the handshake fails."""
    with pytest.raises(PeerRejected) as info:
        hsd_to_hsd(openssl_backend, cleanup, server_config(pki), client_config(pki, trust=pki.classic.ca))
    print(f"rejected: {info.value}")
    assert "issuer certificate" in str(info.value)


# ---------------------------------------------------------------- classic-only peers get the classic pair


def test_openssl_3_client_without_mldsa_gets_the_classic_certificate(openssl_backend, pki, cleanup) -> None:
    listener = peers.Listener()
    cleanup.append(listener)
    # trusts only the classic CA and fails on any verification error: only the P-256 chain can pass
    # (classic_signatures: the openssl 3.0 a host may have offers no ML-DSA, Debian's 3.5+ does)
    client = peers.openssl_client(peers.PeerOptions(ca=pki.classic.ca, classic_signatures=True), listener.port)
    cleanup.append(client)
    client.start()
    sock = listener.accept()
    cleanup.append(sock)
    session = handshake(openssl_backend, context(sock, "server", server_config(pki)))
    records = session_records(sock, session)
    records.send(b"hello from hsd\n")
    output = client.wait_for("hello from hsd")
    assert re.search(r"Peer signature type: (ECDSA|ecdsa_)", output)  # openssl 3.0: ECDSA, 3.5+: ecdsa_secp256r1_sha256
    assert re.search(CLASSIC_LEAF, output) and "hsd pq test" not in output
    client.send_line("hello from openssl 3")
    assert records.recv_until(b"\n") == b"hello from openssl 3\n"


def test_gnutls_client_without_mldsa_gets_the_classic_certificate(openssl_backend, pki, cleanup) -> None:
    listener = peers.Listener()
    cleanup.append(listener)
    client = peers.gnutls_client(peers.PeerOptions(ca=pki.classic.ca, classic_signatures=True), listener.port)
    cleanup.append(client)
    client.start()
    sock = listener.accept()
    cleanup.append(sock)
    session = handshake(openssl_backend, context(sock, "server", server_config(pki)))
    records = session_records(sock, session)
    records.send(b"hello from hsd\n")
    output = client.wait_for("hello from hsd")
    assert "O=hsd test" in output and "hsd pq test" not in output
    client.send_line("hello from gnutls")
    assert records.recv_until(b"\n") == b"hello from gnutls\n"


def test_hsd_client_presents_the_classic_certificate_to_an_openssl_3_server(openssl_backend, pki, cleanup) -> None:
    server = peers.openssl_server(peers.PeerOptions(cert=pki.classic.server.cert, key=pki.classic.server.key,
                                                    ca=pki.classic.ca, require_client_cert=True,
                                                    classic_signatures=True))
    cleanup.append(server)
    server.start()
    sock = server.connect()
    cleanup.append(sock)
    session = handshake(openssl_backend, context(sock, "client", client_config(pki, mutual=True)))
    assert isinstance(leaf_key(session), ec.EllipticCurvePublicKey)
    records = session_records(sock, session)
    records.send(b"hello from hsd\n")
    output = server.wait_for("hello from hsd")
    # s_server verified (with -verify_return_error) a client certificate from the classic CA
    assert re.search(r"O ?= ?hsd test, CN ?= ?client\.test", output) and "hsd pq test" not in output
    server.send_line("hello from openssl 3")
    assert records.recv_until(b"\n") == b"hello from openssl 3\n"


# ---------------------------------------------------------------- configuration errors


def load(config: Config, role: str = "server", auth: str = "x509") -> X509Credentials:
    a, b = socket.socketpair()
    try:
        return load_x509(config, request(a, role, auth))
    finally:
        a.close()
        b.close()


def test_pq_certificate_without_pq_key_is_a_credential_error(pki) -> None:
    config = server_config(pki)
    config.server.pq_private_key = None
    with pytest.raises(CredentialError, match=r"configured together \(x509.pq.private_key is missing\)"):
        load(config)


def test_pq_key_without_pq_certificate_is_a_credential_error(pki) -> None:
    config = client_config(pki, mutual=True)
    config.client.pq_certificate = None
    with pytest.raises(CredentialError, match=r"x509.pq.certificate is missing"):
        load(config, "client")


def test_pq_certificate_must_be_mldsa(pki) -> None:
    config = server_config(pki)
    config.server.pq_certificate, config.server.pq_private_key = pki.classic.client.cert, pki.classic.client.key
    with pytest.raises(CredentialError, match="must hold an ML-DSA certificate, its leaf key is EC$"):
        load(config)


def test_pq_key_of_another_certificate_is_a_credential_error(pki) -> None:
    config = server_config(pki)
    config.server.pq_private_key = pki.client.key  # an ML-DSA key, but the client's
    with pytest.raises(CredentialError, match="is not the key of"):
        load(config)


def test_pq_pair_alone_does_not_replace_the_classic_pair(pki) -> None:
    config = server_config(pki)
    config.server.certificate = config.server.private_key = None
    with pytest.raises(CredentialError, match="second identity next to it"):
        load(config)


def test_loaded_pair_and_repr_without_key_material(pki) -> None:
    creds = load(server_config(pki))
    assert [c.public_bytes(Encoding.DER) for c in creds.pq_chain] == [pki.server.leaf_der,
                                                                       pki.server.intermediate_der]
    assert isinstance(creds.pq_key, mldsa.MLDSA65PrivateKey)
    assert repr(creds) == "X509Credentials(chain=1, key=yes, pq_chain=2, pq_key=yes)"


def test_openssl_refuses_a_pq_key_that_does_not_match(openssl_backend, pki, cleanup) -> None:
    """Loading checks the pair; the backend checks again what OpenSSL holds (e.g. hand-built credentials)."""
    creds = load(server_config(pki))
    creds.pq_key = mldsa.MLDSA65PrivateKey.generate()
    _, server_sock = tcp_pair(cleanup)
    ctx = context(server_sock, "server", server_config(pki))
    ctx.x509 = creds
    with pytest.raises(CredentialError, match="x509.pq certificate/private key unusable"):
        handshake(openssl_backend, ctx)


def test_pq_key_file_readable_by_others_is_refused_when_strict(pki, tmp_path) -> None:
    loose = tmp_path / "loose.key"
    with open(pki.server.key, "rb") as handle:
        loose.write_bytes(handle.read())
    os.chmod(loose, 0o644)
    config = server_config(pki)
    config.server.pq_private_key = str(loose)
    config.strict_permissions = True
    with pytest.raises(CredentialError, match="accessible by group and others"):
        load(config)


def test_strict_daemon_refuses_to_start_with_an_open_pq_key(pki, tmp_path, caplog) -> None:
    loose = tmp_path / "open-pq.key"
    with open(pki.server.key, "rb") as handle:
        loose.write_bytes(handle.read())
    os.chmod(loose, 0o604)
    config = server_config(pki)
    config.server.pq_private_key = str(loose)
    config.strict_permissions = True
    stop = threading.Event()
    started: list[bool] = []

    def ready() -> None:  # a daemon that did not refuse: note it and stop it, the test must not hang
        started.append(True)
        stop.set()

    with Simulator() as sim:
        code = serve(sim.channel(), config, backend="openssl", config_path=None, drop_capabilities=False,
                     stop=stop, on_ready=ready)
    assert not started and code == 2  # a configuration error (hsd(8) EXIT STATUS), as hsd check reports it
    assert f"{loose}: private key file is accessible by others" in caplog.text


# ---------------------------------------------------------------- tlslite: no ML-DSA, says so once


def test_tlslite_backend_warns_once_and_uses_the_classic_pair(pki, cleanup, caplog) -> None:
    tlslite_backend = backend(hsd_tlslite)
    tlslite_identity._pq_warned.clear()  # "once per process": start this test as a fresh process would
    caplog.set_level(logging.DEBUG, logger="hsd")
    for attempt in range(2):
        listener = peers.Listener()
        cleanup.append(listener)
        client = peers.openssl_client(peers.PeerOptions(ca=pki.classic.ca), listener.port)  # may offer ML-DSA
        cleanup.append(client)
        client.start()
        sock = listener.accept()
        cleanup.append(sock)
        session = handshake(tlslite_backend, context(sock, "server", server_config(pki), backend_name="tlslite"))
        records = session_records(sock, session)
        records.send(b"hello from hsd\n")
        assert re.search(CLASSIC_LEAF, client.wait_for("hello from hsd"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "x509.pq" in r.getMessage()]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG and "x509.pq" in r.getMessage()]
    assert len(warnings) == 1 and len(debugs) == 1  # the first handshake warns, the second only at debug
    assert "ignored" in warnings[0].getMessage() and "classic" in warnings[0].getMessage()
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- as the daemon runs: capabilities dropped


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping capabilities needs root (CI runs as root)")
def test_both_pairs_install_after_capabilities_are_dropped(pki) -> None:
    """The chain goes through /proc/self/fd/<memfd>: still readable with CAP_NET_ADMIN only."""
    script = textwrap.dedent(f"""
        import socket
        from hsd import privileges
        from hsd.config import Config
        from hsd.credentials import load_x509
        from hsd.protocol import HandshakeRequest, MessageType, AuthMode
        from hsd_openssl.identity import install_identity
        from hsd_openssl.suites import tls13_context
        privileges.drop_all_but()
        assert privileges.capability_sets()["CapEff"] == 1 << privileges.CAP_NET_ADMIN
        config = Config()
        config.server.certificate, config.server.private_key = {pki.classic.server.cert!r}, {pki.classic.server.key!r}
        config.server.pq_certificate, config.server.pq_private_key = {pki.server.chain!r}, {pki.server.key!r}
        a, b = socket.socketpair()
        creds = load_x509(config, HandshakeRequest(sockfd=a.fileno(), message_type=MessageType.SERVERHELLO,
                                                   auth_mode=AuthMode.X509))
        install_identity(tls13_context(), creds, "server")
        print("installed", len(creds.chain), len(creds.pq_chain))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "installed 1 2"
