"""Peer names and SANs, attacked through real handshakes on both backends (security issue 16, points 3-5).

- One normalisation rule (hsd.x509verify.normalize_peer_name) for every
  backend: a name that is empty or no DNS name / IP address after it ("." and
  ".." once switched OpenSSL's host check off) ends in EACCES with no
  remote-auth, even against a server whose certificate is trusted - for
  another name.
- The subject CN is never a name (RFC 9525): a SAN-less certificate whose CN
  is the peer name is refused by both backends.
- SANs are compared as typed values: a URI or e-mail SAN spelling an allowed
  DNS name does not get a client in; the identity reported is the SAN proved.

The peers are real openssl s_server / s_client and gnutls-cli processes; the
client-role cases go through the kernel simulator and the dispatcher, so the
DONE the consumer reads is what is asserted.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
from dataclasses import dataclass
from typing import Iterator

import pluggy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import hsd_openssl
import hsd_tlslite
from hsd import x509verify
from hsd.config import Config, ConfigError, parse
from hsd.credentials import X509Credentials, load_x509
from hsd.errors import PeerRejected
from hsd.identity import SERVER_X509_SENTINEL
from hsd_kit import peers
from hsd_kit.handshakes import expect_handshake_error, handshake_context, plugin_manager, run_handshake
from hsd_kit.harness import DaemonHarness, Finished, assert_ktls_roundtrip
from hsd_kit.pki import certificate_der, load_certificates

BACKENDS = ("openssl", "tlslite")
TIMEOUT_MS = 5000
INVALID = "is not a valid DNS name or IP address"

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-cli")),
                                reason="needs the openssl and gnutls-bin command-line tools")


# ---------------------------------------------------------------- a PKI with the hostile certificates

@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class NamesPki:
    """A trusted CA and the certificates these tests need (the kit's PKI has none of them)."""

    ca: str
    server: Pair  # SAN DNS:localhost, IP:127.0.0.1
    cn_only: Pair  # no SAN at all, subject CN=localhost
    ipv6: Pair  # SAN IP:::1 only
    clients: dict[str, Pair]  # allow-list probes, by what their one SAN is


CLIENT_SANS: dict[str, x509.GeneralName] = {
    "dns": x509.DNSName("client.example.com"),
    "uri-lookalike": x509.UniformResourceIdentifier("client.example.com"),
    "email-lookalike": x509.RFC822Name("client.example.com"),
    "uri": x509.UniformResourceIdentifier("spiffe://example.org/client"),
    "email": x509.RFC822Name("host@client.example.com"),
    "ip": x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
}


def _write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _issue(directory: str, stem: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
           sans: list[x509.GeneralName] | None, usage: x509.ObjectIdentifier) -> Pair:
    """A leaf from our CA; sans=None: no subjectAltName extension at all."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Pair(_write(directory, f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                _write(directory, f"{stem}.key", pem_key))


@pytest.fixture(scope="module")
def names_pki(tmp_path_factory: pytest.TempPathFactory) -> NamesPki:
    directory = str(tmp_path_factory.mktemp("names-pki"))
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsd names test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    localhost = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return NamesPki(
        ca=_write(directory, "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        server=_issue(directory, "server", ca, ca_key, "localhost", localhost, server_auth),
        cn_only=_issue(directory, "cn-only", ca, ca_key, "localhost", None, server_auth),
        ipv6=_issue(directory, "ipv6", ca, ca_key, "ipv6 server", [x509.IPAddress(ipaddress.ip_address("::1"))],
                    server_auth),
        clients={kind: _issue(directory, f"client-{kind}", ca, ca_key, "client.example.com", [san], client_auth)
                 for kind, san in CLIENT_SANS.items()},
    )


# ---------------------------------------------------------------- the daemon and its peers

@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonHarness]:
    with DaemonHarness() as harness:
        yield harness


@pytest.fixture(scope="module")
def plugins() -> pluggy.PluginManager:
    return plugin_manager(hsd_openssl, hsd_tlslite)


def trusting(pki: NamesPki) -> X509Credentials:
    """Client credentials that trust our CA and present nothing."""
    return X509Credentials(trust=load_certificates(pki.ca))


def client_config(truststore: str) -> Config:
    config = Config()
    config.client.truststore = truststore
    return config


def server_config(pki: NamesPki, allowed: list[str]) -> Config:
    config = Config()
    config.server.truststore = pki.ca
    config.server.certificate, config.server.private_key = pki.server.cert, pki.server.key
    config.require_client_certificate = True
    config.allowed_client_sans = allowed
    return config


def s_server(cert: str, key: str, cleanup: list) -> peers.ServerPeer:
    """A real openssl s_server presenting this certificate (prints what it decrypts, sends its stdin)."""
    server = peers.openssl_server(peers.PeerOptions(cert=cert, key=key))
    cleanup.append(server)
    return server.start()


def client_request(daemon: DaemonHarness, backend: str, truststore: str, server: peers.ServerPeer,
                   peername: str | None, cleanup: list) -> tuple[Finished, object]:
    """One client unauth request through the simulated kernel for peername; its DONE and the request."""
    daemon.reconfigure(client_config(truststore), backend)
    sock = server.connect()
    cleanup.append(sock)
    request = daemon.client_hello_anon(sock, peername=peername, timeout_ms=TIMEOUT_MS)
    return daemon.finish(request), request


def refused(finished: Finished, fragment: str) -> None:
    """EACCES, exactly one DONE, no identity reported, and the one log line says why."""
    finished.expect(errno.EACCES)
    assert finished.remote_auth == (), finished.describe()
    assert fragment in finished.outcome.reason, finished.describe()


# ---------------------------------------------------------------- point 3: one rule, refused names

REFUSED_NAMES = {
    ".": "empty after removing the trailing dot",
    "..": "empty label",
    "a..b": "empty label",
    "localhost..": "empty label",
    ".localhost": "empty label",
    "-x.example": "not letters, digits and inner hyphens",
    "x-.example": "not letters, digits and inner hyphens",
    "local host": "white space",
    " localhost": "white space",
    "localhost\t": "white space",
    "a" * 64 + ".example": "longer than 63",
    ("a" * 60 + ".") * 5 + "example": "longer than 253",
    "*.localhost": "not letters, digits and inner hyphens",
    "under_score.example": "not letters, digits and inner hyphens",
    "127.1": "all digits",
    "[127.0.0.1]": "brackets may only enclose an IPv6 address",
    "fe80::1%lo": "zone index",
    "local\x7fhost": "control character",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(REFUSED_NAMES), ids=repr)
def test_invalid_peer_name_is_refused_against_a_trusted_server(daemon, names_pki, cleanup, backend: str,
                                                               name: str) -> None:
    """The server's certificate is from a trusted CA for localhost; "." once matched it (OpenSSL host check off)."""
    server = s_server(names_pki.server.cert, names_pki.server.key, cleanup)
    finished, _ = client_request(daemon, backend, names_pki.ca, server, name, cleanup)
    refused(finished, INVALID)
    assert REFUSED_NAMES[name] in finished.outcome.reason
    assert finished.outcome.reason.count("\n") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_x509_client_with_dot_peer_name_is_refused(daemon, names_pki, cleanup, backend: str) -> None:
    """client x509 takes the same path: the name is checked before our certificate is offered."""
    config = client_config(names_pki.ca)
    config.client.certificate, config.client.private_key = (names_pki.clients["dns"].cert,
                                                            names_pki.clients["dns"].key)
    daemon.reconfigure(config, backend)
    server = s_server(names_pki.server.cert, names_pki.server.key, cleanup)
    sock = server.connect()
    cleanup.append(sock)
    refused(daemon.finish(daemon.client_hello_x509(sock, peername=".", timeout_ms=TIMEOUT_MS)), INVALID)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_peer_name_is_no_peer_name(daemon, names_pki, cleanup, backend: str) -> None:
    """The kernel's empty string is "no name": refused without any lookup, like a missing attribute."""
    server = s_server(names_pki.server.cert, names_pki.server.key, cleanup)
    finished, _ = client_request(daemon, backend, names_pki.ca, server, "", cleanup)
    refused(finished, "without a peer name")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["localhost\x00", "localhost\x00.evil.example", "\x00localhost"], ids=repr)
def test_peer_name_with_nul_is_refused(plugins, names_pki, cleanup, backend: str, name: str) -> None:
    """A NUL cannot come through netlink (strings end at it) but a plugin or caller may pass one: refused."""
    server = s_server(names_pki.server.cert, names_pki.server.key, cleanup)
    sock = server.connect()
    cleanup.append(sock)
    ctx = handshake_context(sock, "client", "unauth", backend=backend, config=client_config(names_pki.ca),
                            x509=trusting(names_pki), peername=name, timeout=5)
    expect_handshake_error(errno.EACCES, "NUL", run_handshake, plugins, ctx, error=PeerRejected)


VALID_NAMES = {
    "localhost.": ("server", "localhost"),  # the trailing dot of a fully qualified name is no other name
    "LocalHost": ("server", "localhost"),
    "127.0.0.1": ("server", "127.0.0.1"),
    "::1": ("ipv6", "::1"),
    "[::1]": ("ipv6", "::1"),
    "0:0:0:0:0:0:0:1": ("ipv6", "::1"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VALID_NAMES), ids=repr)
def test_valid_peer_names_still_work(daemon, names_pki, cleanup, backend: str, name: str) -> None:
    """Normalisation must not cost a legitimate name: the handshake completes and the keys carry data."""
    pair = getattr(names_pki, VALID_NAMES[name][0])
    server = s_server(pair.cert, pair.key, cleanup)
    finished, request = client_request(daemon, backend, names_pki.ca, server, name, cleanup)
    finished.expect(0)
    assert finished.remote_auth, "the verified server certificate is reported"
    assert_ktls_roundtrip(request, server)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fragment", [("::2", "IP address mismatch"), ("[::1]", "IP address mismatch"),
                                           ("127.0.0.2", "IP address mismatch"),
                                           ("server.example.", "hostname mismatch")], ids=repr)
def test_valid_but_other_names_are_mismatches(daemon, names_pki, cleanup, backend: str, name: str,
                                              fragment: str) -> None:
    """Valid names the trusted localhost certificate does not carry (::1 is in the ipv6 one only)."""
    server = s_server(names_pki.server.cert, names_pki.server.key, cleanup)
    finished, _ = client_request(daemon, backend, names_pki.ca, server, name, cleanup)
    refused(finished, fragment)


# ---------------------------------------------------------------- point 4: no CN fallback

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["localhost", "localhost."])
def test_san_less_certificate_with_matching_cn_is_refused(daemon, names_pki, cleanup, backend: str,
                                                          name: str) -> None:
    """RFC 9525: the subject CN is no identity; OpenSSL used to fall back to it when no DNS SAN was there."""
    server = s_server(names_pki.cn_only.cert, names_pki.cn_only.key, cleanup)
    finished, _ = client_request(daemon, backend, names_pki.ca, server, name, cleanup)
    refused(finished, "server certificate verify failed: hostname mismatch")


# ---------------------------------------------------------------- point 5: typed SAN allow-list (server role)

CLIENT_TOOLS = {"openssl": peers.openssl_client, "gnutls": peers.gnutls_client}
ALLOW_CASES = [
    # (allow-list, client certificate's SAN kind, proven identity or None for refused)
    (["client.example.com"], "dns", "dns:client.example.com"),
    (["client.example.com"], "uri-lookalike", None),
    (["client.example.com"], "email-lookalike", None),
    (["dns:CLIENT.example.com."], "dns", "dns:client.example.com"),
    (["dns:client.example.com"], "uri-lookalike", None),
    (["uri:spiffe://example.org/client"], "uri", "uri:spiffe://example.org/client"),
    (["uri:spiffe://example.org/client"], "dns", None),
    (["email:host@CLIENT.example.com"], "email", "email:host@client.example.com"),
    (["email:host@client.example.com"], "dns", None),
    (["192.0.2.1"], "ip", "ip:192.0.2.1"),
    (["ip:192.0.2.1"], "dns", None),
    (["dns:other.example", "uri:spiffe://example.org/client"], "uri", "uri:spiffe://example.org/client"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tool", list(CLIENT_TOOLS))
@pytest.mark.parametrize("allowed,kind,proven", ALLOW_CASES,
                         ids=[f"{';'.join(a)}-{k}" for a, k, _ in ALLOW_CASES])
def test_allowed_client_sans_compare_typed_values(plugins, names_pki, cleanup, backend: str, tool: str,
                                                  allowed: list[str], kind: str, proven: str | None) -> None:
    """Only a SAN of the entry's type gets in, and the session names the SAN that did."""
    config = server_config(names_pki, parse_allowed(allowed))
    pair = names_pki.clients[kind]
    options = peers.PeerOptions(ca=names_pki.ca, cert=pair.cert, key=pair.key)
    with peers.Listener() as listener, CLIENT_TOOLS[tool](options, listener.port):
        with listener.accept(10) as sock:
            ctx = handshake_context(sock, "server", "x509", backend=backend, config=config, peername=None,
                                    timeout=5)
            ctx.x509 = load_x509(config, ctx.request)
            if proven is None:
                expect_handshake_error(errno.EACCES, "not in allowed_client_sans", run_handshake, plugins, ctx,
                                       error=PeerRejected)
                return
            session = run_handshake(plugins, ctx)
            try:
                assert session.details["peer_san"] == proven
                assert session.peer_certificates[0] == certificate_der(pair.cert)
            finally:
                session.wipe()


def parse_allowed(entries: list[str]) -> list[str]:
    """The entries through the config parser, as the daemon reads them."""
    return parse("[hsd.server]\nallowed_client_sans=" + ";".join(entries) + "\n").allowed_client_sans


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,status", [("uri-lookalike", errno.EACCES), ("email-lookalike", errno.EACCES),
                                         ("dns", 0)])
def test_lookalike_san_gets_no_identity_in_done(daemon, names_pki, cleanup, backend: str, kind: str,
                                                status: int) -> None:
    """Through the kernel path: a look-alike SAN ends in EACCES with no remote-auth; the DNS SAN is authenticated."""
    daemon.reconfigure(server_config(names_pki, ["client.example.com"]), backend)
    pair = names_pki.clients[kind]
    options = peers.PeerOptions(ca=names_pki.ca, cert=pair.cert, key=pair.key)
    with peers.Listener() as listener, peers.openssl_client(options, listener.port) as client:
        sock = listener.accept(10)
        cleanup.append(sock)
        finished = daemon.finish(daemon.server_hello_x509(sock, timeout_ms=TIMEOUT_MS)).expect(status)
        if status:
            assert finished.remote_auth == ()
            assert "not in allowed_client_sans" in finished.outcome.reason
        else:
            assert finished.remote_auth and set(finished.remote_auth) == {SERVER_X509_SENTINEL}
            assert_ktls_roundtrip(finished.request, client)


# ---------------------------------------------------------------- the rule itself, and the config syntax

@pytest.mark.parametrize("name", [*REFUSED_NAMES, "", "localhost\x00", "\u00a0localhost", "bad\u2028name"],
                         ids=repr)
def test_normalize_refuses(name: str) -> None:
    with pytest.raises(PeerRejected, match=INVALID) as info:
        x509verify.normalize_peer_name(name)
    assert info.value.status == errno.EACCES


@pytest.mark.parametrize("name,dns,ip", [
    ("server.example.", "server.example", None), ("SERVER.Example", "server.example", None),
    ("b\u00fccher.example", "xn--bcher-kva.example", None), ("localhost", "localhost", None),
    ("192.0.2.1", None, "192.0.2.1"), ("2001:DB8::1", None, "2001:db8::1"), ("[2001:db8::1]", None, "2001:db8::1"),
])
def test_normalize_accepts(name: str, dns: str | None, ip: str | None) -> None:
    peer = x509verify.normalize_peer_name(name)
    assert peer.dns == dns
    assert (str(peer.ip) if peer.ip is not None else None) == ip
    assert peer.sni == dns  # SNI carries DNS names only, never an address or a trailing dot
    assert peer.text


def test_peer_name_cannot_be_built_empty() -> None:
    """The type itself refuses the value that switched the OpenSSL check off."""
    with pytest.raises(ValueError):
        x509verify.PeerName(dns="")
    with pytest.raises(ValueError):
        x509verify.PeerName()


@pytest.mark.parametrize("entry,fragment", [
    (".", "empty"), ("a..b", "empty label"), ("-x.example", "inner hyphens"), ("dns:", "nothing after"),
    ("ip:client.example.com", "not an IP address"), ("hsd://client", "write uri:hsd://client"),
    ("host@client.example.com", "write email:host@client.example.com"), ("uri:client.example.com", "scheme"),
    ("email:client.example.com", "local part"), ("email:@example.com", "local part"), ("ip:fe80::1%eth0", "zone"),
])
def test_config_refuses_unusable_allowed_sans(entry: str, fragment: str) -> None:
    """The daemon stops at start-up, naming file and line, instead of an entry that can never match."""
    with pytest.raises(ConfigError, match=r"^hsd.conf:3: allowed_client_sans entry") as info:
        parse("# x\n[hsd.server]\nallowed_client_sans=good.example;" + entry + "\n", "hsd.conf")
    assert fragment in str(info.value)


def test_config_keeps_entries_as_written() -> None:
    cfg = parse("[hsd.server]\nallowed_client_sans=Host.example.;uri:spiffe://x/y;email:a@B.example;::1\n")
    assert cfg.allowed_client_sans == ["Host.example.", "uri:spiffe://x/y", "email:a@B.example", "::1"]
    assert {str(x509verify.parse_allowed_san(e)) for e in cfg.allowed_client_sans} == {
        "dns:host.example", "uri:spiffe://x/y", "email:a@b.example", "ip:::1"}


def test_untyped_wildcard_entry_matches_only_the_same_wildcard() -> None:
    """"*.lab.example" is kept literal: it is no pattern that lets every name under lab.example in."""
    assert x509verify.parse_allowed_san("*.lab.example") == x509verify.SanValue("dns", "*.lab.example")
    assert x509verify.parse_allowed_san("dns:*.lab.example") != x509verify.SanValue("dns", "a.lab.example")
    with pytest.raises(ValueError):
        x509verify.parse_allowed_san("a.*.example")


def test_server_verifier_never_uses_the_cn(names_pki) -> None:
    """The core verifier (tlslite's) on the SAN-less certificate whose CN is the peer name."""
    creds = trusting(names_pki)
    with pytest.raises(PeerRejected, match="hostname mismatch .*no subjectAltName"):
        x509verify.verify_server_certificate(load_certificates(names_pki.cn_only.cert), creds, "localhost")


def test_lookalike_sans_are_not_dns_names(names_pki) -> None:
    for kind in ("uri-lookalike", "email-lookalike"):
        leaf = load_certificates(names_pki.clients[kind].cert)[0]
        with pytest.raises(PeerRejected, match="not in allowed_client_sans"):
            x509verify.match_allowed_sans(leaf, ["client.example.com"])
    leaf = load_certificates(names_pki.clients["dns"].cert)[0]
    assert str(x509verify.match_allowed_sans(leaf, ["client.example.com"])) == "dns:client.example.com"
