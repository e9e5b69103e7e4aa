"""The OpenSSL backend against real, independent peers (openssl and gnutls tools on loopback).

Every successful handshake is followed by application data in both directions
through hsd_kit.records, keyed only by the crypto_info hsd would install:
that is the proof the kTLS keys and sequence numbers are right.  Negative
cases check the typed error, its DONE status and that the reason is readable.
"""

from __future__ import annotations

import errno
import socket
import time

import pluggy
import pytest

import hsd_openssl
from hsd.config import Config
from hsd.context import Auth, HandshakeContext
from hsd.credentials import X509Credentials, load_x509
from hsd.errors import CredentialError, HandshakeError, HandshakeTimeout, PeerClosed, PeerRejected
from hsd.hookspecs import Mode
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd_kit import peers
from hsd_kit.handshakes import expect_handshake_error, handshake_context, plugin_manager, run_handshake
from hsd_kit.harness import assert_records_roundtrip
from hsd_kit.pki import TestPki, certificate_der, load_certificates, make_pki, x509_credentials
from hsd_kit.records import NEW_SESSION_TICKET, KtlsRecordChecker, TlsAlert, session_records

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
          "TLS_AES_128_CCM_SHA256"]
PEERS = ["openssl", "gnutls"]
CERTIFICATE_REQUIRED = 116  # TLS 1.3 alert
SERVER_PEERS = {"openssl": peers.openssl_server, "gnutls": peers.gnutls_server}
CLIENT_PEERS = {"openssl": peers.openssl_client, "gnutls": peers.gnutls_client}

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-serv")),
                                reason="needs the openssl and gnutls-bin command-line tools")


@pytest.fixture(name="pki")
def _pki(hsd_pki: TestPki) -> TestPki:
    """The test kit's PKI (one per session)."""
    return hsd_pki


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_openssl)


def client_config(pki: TestPki, *, mutual: bool = False, crl: bool = False) -> Config:
    config = Config()
    config.client.truststore = pki.ca
    if mutual:
        config.client.certificate, config.client.private_key = pki.client.cert, pki.client.key
    if crl:
        config.client.crl = pki.crl
    return config


def server_config(pki: TestPki, *, require: bool = False, allowed: list[str] | None = None) -> Config:
    config = Config()
    config.server.truststore = pki.ca
    config.server.certificate, config.server.private_key = pki.server.cert, pki.server.key
    config.require_client_certificate = require
    config.allowed_client_sans = allowed or []
    return config


def context(sock: socket.socket, role: str, auth: str, config: Config, *, peername: str | None = "localhost",
            timeout: float = 10.0, x509: X509Credentials | None = None) -> HandshakeContext:
    """The dispatcher's context for the openssl backend; credentials from config as the daemon loads them."""
    ctx = handshake_context(sock, role, auth, backend="openssl", config=config, timeout=timeout,
                            peername=peername if role == "client" else None)
    ctx.x509 = x509 if x509 is not None else load_x509(config, ctx.request)
    return ctx


def handshake(plugins: pluggy.PluginManager, ctx: HandshakeContext) -> Session:
    return run_handshake(plugins, ctx)


def checker(sock: socket.socket, session: Session) -> KtlsRecordChecker:
    return session_records(sock, session)


def exchange_with_server(peer_kind: str, server: peers.PeerProcess, records: KtlsRecordChecker) -> None:
    """hsd (client) -> peer and peer -> hsd, through the record checker (gnutls-serv --echo answers itself)."""
    assert_records_roundtrip(records, server, echo=peer_kind == "gnutls")


def exchange_with_client(client: peers.PeerProcess, records: KtlsRecordChecker) -> None:
    """hsd (server) -> peer and peer -> hsd, through the record checker."""
    assert_records_roundtrip(records, client)


def started(peer, cleanup: list):
    """peer (a tool or a scripted peer) running, and stopped after the test."""
    cleanup.append(peer)
    return peer.start()


def start_server(kind: str, pki: TestPki, cleanup: list, *, pair=None, **options) -> peers.ServerPeer:
    pair = pair or pki.server
    return started(SERVER_PEERS[kind](peers.PeerOptions(cert=pair.cert, key=pair.key, ca=pki.ca, **options)), cleanup)


def dial(peer: peers.LoopbackPort, cleanup: list) -> socket.socket:
    """A connected, non-blocking socket to peer (what the kernel hands over), closed after the test."""
    sock = peer.connect()
    cleanup.append(sock)
    return sock


# ---------------------------------------------------------------- plugin contract


def test_backend_info_lists_exactly_the_certificate_modes(plugins: pluggy.PluginManager) -> None:
    infos = [info for info in plugins.hook.hsd_backend_info() if info.name == "openssl"]
    assert len(infos) == 1
    assert {Mode("client", "unauth"), Mode("client", "x509"), Mode("server", "x509")} <= set(infos[0].modes)
    assert not any(mode.auth is Auth.PSK for mode in hsd_openssl.CERT_MODES)


def test_the_host_never_routes_another_backends_request_or_psk_without_a_policy(plugins, pki: TestPki) -> None:
    """The host (not the backend) decides: a request for a backend that is not loaded, or a PSK request
    with no policy plugin, is EOPNOTSUPP naming why, and the openssl backend sends nothing."""
    a, b = socket.socketpair()
    try:
        ctx = context(a, "client", "unauth", client_config(pki))
        ctx.backend = "tlslite"
        expect_handshake_error(errno.EOPNOTSUPP, "'tlslite' is not installed", run_handshake, plugins, ctx)
        ctx.backend = "openssl"
        ctx.request = HandshakeRequest(sockfd=a.fileno(), message_type=MessageType.CLIENTHELLO,
                                       auth_mode=AuthMode.PSK, peername="localhost")
        expect_handshake_error(errno.EOPNOTSUPP, "no PSK policy plugin serves client/psk", run_handshake,
                               plugins, ctx)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing was sent for a request the host refused
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- hsd as the client


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kind", PEERS)
def test_client_unauth(plugins, pki, cleanup, kind: str, suite: str) -> None:
    server = start_server(kind, pki, cleanup, suites=[suite])
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "unauth", client_config(pki)))
    assert session.cipher == suite
    assert (session.tx_seq, session.rx_seq) == (0, 0)
    assert session.peer_certificates[0] == certificate_der(pki.server.cert)
    assert session.group
    records = checker(sock, session)
    exchange_with_server(kind, server, records)
    assert NEW_SESSION_TICKET in records.handshake_messages  # the peer's tickets came first, and were skipped


@pytest.mark.parametrize("kind", PEERS)
def test_client_x509_presents_certificate_to_a_requiring_server(plugins, pki, cleanup, kind: str) -> None:
    server = start_server(kind, pki, cleanup, require_client_cert=True)
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "x509", client_config(pki, mutual=True)))
    exchange_with_server(kind, server, checker(sock, session))


@pytest.mark.parametrize("kind", PEERS)
def test_client_unauth_sends_no_certificate_to_a_requiring_server(plugins, pki, cleanup, kind: str) -> None:
    server = start_server(kind, pki, cleanup, require_client_cert=True)
    sock = dial(server, cleanup)
    # TLS 1.3: our Finished (with an empty Certificate) goes out before the server's verdict,
    # so the server's certificate_required alert (116) arrives as the first record under kTLS keys
    session = handshake(plugins, context(sock, "client", "unauth", client_config(pki, mutual=True)))
    records = checker(sock, session)
    with pytest.raises(TlsAlert) as info:
        records.recv_data()
    assert info.value.description == CERTIFICATE_REQUIRED


def test_client_checks_ip_address_peer_names(plugins, pki, cleanup) -> None:
    server = start_server("openssl", pki, cleanup)
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "unauth", client_config(pki), peername="127.0.0.1"))
    exchange_with_server("openssl", server, checker(sock, session))


def test_client_with_crl_accepts_a_good_certificate(plugins, pki, cleanup) -> None:
    server = start_server("gnutls", pki, cleanup)
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "unauth", client_config(pki, crl=True)))
    exchange_with_server("gnutls", server, checker(sock, session))


def test_client_verification_can_be_disabled_explicitly(plugins, pki, cleanup) -> None:
    server = start_server("openssl", pki, cleanup, pair=pki.untrusted_server)
    sock = dial(server, cleanup)
    config = client_config(pki)
    config.verify_server = False
    session = handshake(plugins, context(sock, "client", "unauth", config, peername=None))
    exchange_with_server("openssl", server, checker(sock, session))


# Groups the host's openssl, cryptography's wheel and Debian's system OpenSSL all know.  The peer
# allows exactly one, so the expected name comes from the test, not from hsd or its library;
# secp384r1 and x448 are not in the client's first key shares, so those take a HelloRetryRequest.
ONE_GROUP = ("x25519", "secp256r1", "secp384r1", "x448")


@pytest.mark.parametrize("group", ONE_GROUP)
def test_client_reports_the_one_group_the_server_allows(plugins, pki, cleanup, group: str) -> None:
    """Where the bindings cannot name the group (cryptography 43) hsd reads it from the ServerHello."""
    server = start_server("openssl", pki, cleanup, extra=["-groups", group])
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "unauth", client_config(pki)))
    assert session.group == group
    exchange_with_server("openssl", server, checker(sock, session))


# ---------------------------------------------------------------- hsd as the server


def serve_one(plugins, pki, cleanup, kind: str, config: Config, **client_options):
    listener = peers.Listener()
    cleanup.append(listener)
    opts = peers.PeerOptions(ca=pki.ca, **client_options)
    client = CLIENT_PEERS[kind](opts, listener.port)
    started(client, cleanup)
    sock = listener.accept()
    cleanup.append(sock)
    return client, sock, (lambda: handshake(plugins, context(sock, "server", "x509", config)))


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kind", PEERS)
def test_server_x509_without_client_certificate(plugins, pki, cleanup, kind: str, suite: str) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, kind, server_config(pki), suites=[suite])
    session = run()
    assert session.cipher == suite
    assert (session.tx_seq, session.rx_seq) == (0, 0)
    assert session.peer_certificates == ()
    exchange_with_client(client, checker(sock, session))


@pytest.mark.parametrize("group", ONE_GROUP)
def test_server_reports_the_one_group_the_client_allows(plugins, pki, cleanup, group: str) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, "openssl", server_config(pki), extra=["-groups", group])
    session = run()
    assert session.group == group
    exchange_with_client(client, checker(sock, session))


@pytest.mark.parametrize("kind", PEERS)
def test_server_x509_with_required_client_certificate(plugins, pki, cleanup, kind: str) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, kind, server_config(pki, require=True),
                                  cert=pki.client.cert, key=pki.client.key)
    session = run()
    assert session.peer_certificates[0] == certificate_der(pki.client.cert)
    exchange_with_client(client, checker(sock, session))


def test_server_accepts_client_san_on_the_allow_list(plugins, pki, cleanup) -> None:
    """A URI SAN is allowed by a typed uri: entry (an untyped entry is a DNS name or address only)."""
    client, sock, run = serve_one(plugins, pki, cleanup, "openssl", server_config(pki, allowed=["uri:hsd://client"]),
                                  cert=pki.client.cert, key=pki.client.key)
    session = run()
    assert session.details["peer_san"] == "uri:hsd://client"
    exchange_with_client(client, checker(sock, session))


def test_server_sends_no_session_tickets_on_the_wire(plugins, pki, cleanup) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, "openssl", server_config(pki), extra=["-msg"])
    session = run()
    assert int(session.details["dropped_post_handshake_bytes"]) > 0  # OpenSSL did queue tickets ...
    exchange_with_client(client, checker(sock, session))
    transcript = client.output
    assert "<<< TLS 1.3, Handshake [length" in transcript and "Finished" in transcript  # -msg really traced
    assert "NewSessionTicket" not in transcript  # ... and none of them reached the client


# ---------------------------------------------------------------- failures


def expect_failure(plugins, ctx: HandshakeContext, error: type[HandshakeError], status: int, reason: str) -> HandshakeError:
    failure = expect_handshake_error(status, reason, handshake, plugins, ctx, error=error)
    assert ctx.sock.fileno() != -1  # the backend never closes the handed-over socket
    return failure


@pytest.mark.parametrize("kind", PEERS)
def test_wrong_host_name_is_rejected(plugins, pki, cleanup, kind: str) -> None:
    server = start_server(kind, pki, cleanup)
    sock = dial(server, cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki), peername="nfs.example.org"),
                   PeerRejected, errno.EACCES, "server certificate verify failed: hostname mismatch")


def test_wrong_ip_address_is_rejected(plugins, pki, cleanup) -> None:
    server = start_server("openssl", pki, cleanup)
    sock = dial(server, cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki), peername="127.0.0.2"),
                   PeerRejected, errno.EACCES, "IP address mismatch")


@pytest.mark.parametrize("pair_name,reason", [
    ("untrusted_server", "unable to get local issuer certificate"),
    ("expired_server", "certificate has expired"),
])
def test_bad_server_certificate_is_rejected(plugins, pki, cleanup, pair_name: str, reason: str) -> None:
    server = start_server("gnutls", pki, cleanup, pair=getattr(pki, pair_name))
    sock = dial(server, cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki)), PeerRejected, errno.EACCES,
                   f"server certificate verify failed: {reason}")


def test_revoked_server_certificate_is_rejected_with_a_crl(plugins, pki, cleanup) -> None:
    server = start_server("openssl", pki, cleanup, pair=pki.revoked_server)
    sock = dial(server, cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki, crl=True)), PeerRejected,
                   errno.EACCES, "server certificate verify failed: certificate revoked")


def test_client_without_peer_name_fails_clearly(plugins, pki, cleanup) -> None:
    a, b = socket.socketpair()
    cleanup += [a, b]
    expect_failure(plugins, context(a, "client", "unauth", client_config(pki), peername=None),
                   PeerRejected, errno.EACCES, "without a peer name")


@pytest.mark.parametrize("kind", PEERS)
def test_required_client_certificate_missing(plugins, pki, cleanup, kind: str) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, kind, server_config(pki, require=True))
    with pytest.raises(PeerRejected) as info:
        run()
    assert info.value.status == errno.EACCES
    assert "client sent no certificate" in info.value.reason


def test_client_san_outside_the_allow_list_is_rejected(plugins, pki, cleanup) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, "gnutls", server_config(pki, allowed=["nfs.example.org"]),
                                  cert=pki.client.cert, key=pki.client.key)
    with pytest.raises(PeerRejected, match="not in allowed_client_sans") as info:
        run()
    assert info.value.status == errno.EACCES


def test_client_certificate_from_an_untrusted_ca_is_rejected(plugins, pki, cleanup) -> None:
    client, sock, run = serve_one(plugins, pki, cleanup, "openssl", server_config(pki),
                                  cert=pki.untrusted_server.cert, key=pki.untrusted_server.key)
    with pytest.raises(PeerRejected, match="client certificate verify failed"):
        run()


def test_peer_closing_mid_handshake(plugins, pki, cleanup) -> None:
    sock = dial(started(peers.closing_peer(), cleanup), cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki)), PeerClosed, errno.ETIMEDOUT,
                   "peer closed the connection")


def test_silent_peer_times_out_at_the_deadline(plugins, pki, cleanup) -> None:
    sock = dial(started(peers.silent_peer(), cleanup), cleanup)
    ctx = context(sock, "client", "unauth", client_config(pki), timeout=0.5)
    expect_failure(plugins, ctx, HandshakeTimeout, errno.ETIMEDOUT, "timed out")
    assert time.monotonic() >= ctx.deadline  # it waited for the deadline, not less


def test_garbage_instead_of_server_hello(plugins, pki, cleanup) -> None:
    sock = dial(started(peers.garbage_peer(), cleanup), cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki)), PeerRejected, errno.EACCES,
                   "not TLS")


def test_tls12_only_server_is_rejected(plugins, pki, cleanup) -> None:
    server = peers.openssl_server(peers.PeerOptions(cert=pki.server.cert, key=pki.server.key,
                                                    extra=["-no_tls1_3"]))
    server.argv.remove("-tls1_3")
    started(server, cleanup)
    sock = dial(server, cleanup)
    expect_failure(plugins, context(sock, "client", "unauth", client_config(pki)), PeerRejected, errno.EACCES,
                   "does not speak TLS 1.3")


def test_mismatched_server_key_is_a_credential_error(plugins, pki, cleanup) -> None:
    a, b = socket.socketpair()
    cleanup += [a, b]
    creds = x509_credentials(pki, pki.client)
    creds.chain = load_certificates(pki.server.cert)  # the server's certificate with the client's key
    error = expect_failure(plugins, context(a, "server", "x509", server_config(pki), x509=creds), CredentialError,
                           errno.EIO, "server certificate/private key unusable: the private key does not match "
                                      "the certificate")
    assert "[(" not in error.reason, error.reason  # words, not OpenSSL's error tuples


# ---------------------------------------------------------------- key types and debug logging


def test_rsa_pki_client_and_server(plugins, cleanup, tmp_path) -> None:
    rsa_pki = make_pki(str(tmp_path / "rsa"), key_type="rsa")
    server = start_server("gnutls", rsa_pki, cleanup)
    sock = dial(server, cleanup)
    session = handshake(plugins, context(sock, "client", "x509", client_config(rsa_pki, mutual=True)))
    exchange_with_server("gnutls", server, checker(sock, session))
    client, sock2, run = serve_one(plugins, rsa_pki, cleanup, "openssl", server_config(rsa_pki, require=True),
                                   cert=rsa_pki.client.cert, key=rsa_pki.client.key)
    exchange_with_client(client, checker(sock2, run()))


def test_tls_debug_traces_handshake_messages_but_never_secrets(plugins, pki, cleanup, caplog) -> None:
    server = start_server("openssl", pki, cleanup)
    sock = dial(server, cleanup)
    config = client_config(pki)
    config.tls_debug = 4
    with caplog.at_level("DEBUG"):
        session = handshake(plugins, context(sock, "client", "unauth", config))
    text = caplog.text
    assert "-> ClientHello" in text and "<- ServerHello" in text and "<- Finished" in text, text
    assert f"cipher {session.cipher}" in text, text
    for secret in (session.tx_secret, session.rx_secret):
        assert bytes(secret).hex() not in text.lower()
    exchange_with_server("openssl", server, checker(sock, session))


def test_no_debug_lines_without_tls_debug(plugins, pki, cleanup, caplog) -> None:
    server = start_server("openssl", pki, cleanup)
    sock = dial(server, cleanup)
    with caplog.at_level("DEBUG"):
        handshake(plugins, context(sock, "client", "unauth", client_config(pki)))
    assert "ClientHello" not in caplog.text and "negotiated" not in caplog.text


# ---------------------------------------------------------------- failures with hsd as the server


def accepted_pair(cleanup: list) -> tuple[socket.socket, socket.socket]:
    """(peer end, hsd end) of a loopback TCP connection."""
    listener = peers.Listener()
    cleanup.append(listener)
    peer = socket.create_connection(("127.0.0.1", listener.port))
    cleanup.append(peer)
    ours = listener.accept()
    cleanup.append(ours)
    return peer, ours


def test_server_times_out_on_a_silent_client(plugins, pki, cleanup) -> None:
    _, ours = accepted_pair(cleanup)
    expect_failure(plugins, context(ours, "server", "x509", server_config(pki), timeout=0.5),
                   HandshakeTimeout, errno.ETIMEDOUT, "timed out")


def test_server_rejects_a_client_speaking_http(plugins, pki, cleanup) -> None:
    peer, ours = accepted_pair(cleanup)
    peer.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    expect_failure(plugins, context(ours, "server", "x509", server_config(pki)), PeerRejected, errno.EACCES,
                   "not TLS")


def test_server_sees_a_client_that_hangs_up(plugins, pki, cleanup) -> None:
    peer, ours = accepted_pair(cleanup)
    peer.sendall(b"\x16\x03\x01\x00\xc8\x01\x00")  # the start of a ClientHello record, then EOF
    peer.shutdown(socket.SHUT_WR)
    expect_failure(plugins, context(ours, "server", "x509", server_config(pki)), PeerClosed, errno.ETIMEDOUT,
                   "peer closed the connection")


@pytest.mark.parametrize("kind", PEERS)
def test_server_rejects_a_tls12_only_client(plugins, pki, cleanup, kind: str) -> None:
    listener = peers.Listener()
    cleanup.append(listener)
    client = CLIENT_PEERS[kind](peers.PeerOptions(ca=pki.ca), listener.port)
    if kind == "openssl":
        client.argv[client.argv.index("-tls1_3")] = "-tls1_2"
    else:
        client.argv[client.argv.index("--priority") + 1] = "NORMAL:-VERS-ALL:+VERS-TLS1.2"
    started(client, cleanup)
    sock = listener.accept()
    cleanup.append(sock)
    expect_failure(plugins, context(sock, "server", "x509", server_config(pki)), PeerRejected, errno.EACCES,
                   "does not speak TLS 1.3")
