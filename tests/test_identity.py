"""remote-auth identities: the verified server leaf (client), the sentinel (server), nothing for unverified peers.

The end-to-end tests use a real `openssl s_server` that sends a three-certificate
chain (leaf + two intermediates) to hsd's client role on each backend, and look in
root's real user keyring afterwards: exactly one key may name the server, and
it must hold the leaf - never an intermediate, never an unverified certificate.
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsd import keyring
from hsd.config import Config
from hsd.hookspecs import BackendInfo, hookimpl
from hsd.identity import SERVER_X509_SENTINEL, remote_auth_for
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd_kit.harness import DaemonHarness
from hsd_kit.peers import PeerOptions, openssl_server
from hsd_kit.pki import TestPki

BACKENDS = ("openssl", "tlslite")  # the rule is the core's; each backend says what it verified


def ders(path: str) -> tuple[bytes, ...]:
    with open(path, "rb") as handle:
        return tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(handle.read()))


def session(certs: tuple[bytes, ...]) -> Session:
    return Session("TLS_AES_128_GCM_SHA256", bytearray(32), bytearray(32), peer_certificates=certs)


def request(message_type: MessageType, peername: str | None = "ident.test") -> HandshakeRequest:
    return HandshakeRequest(sockfd=3, message_type=message_type, auth_mode=AuthMode.X509, peername=peername)


@pytest.fixture(autouse=True)
def production_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check the daemon's behaviour towards the kernel: peer keys in root's user keyring (an
    agent serving the simulator keeps them in its own keyring instead; each test here drops what it adds)."""
    from hsd import identity

    monkeypatch.setattr(identity, "_peer_ring", keyring.KEY_SPEC_USER_KEYRING)
    monkeypatch.setattr(identity, "keep_peer_keys_private", lambda: None)  # the harness joins a simulator


def user_keyring() -> int:
    return keyring.keyring_id(keyring.KEY_SPEC_USER_KEYRING)


def keys_naming(peername: str) -> list[int]:
    """Serials of the user keyring's keys whose description mentions peername (any key type)."""
    raw = keyring.read_key(user_keyring())  # a keyring's payload: its keys' serials
    serials = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
    found = []
    for serial in serials:
        try:
            description = keyring.describe_key(serial)[4]
        except keyring.KeyringError:
            continue  # went away meanwhile (another test's key)
        if peername in description:
            found.append(serial)
    return found


def holds_certificate(serial: int, cert: x509.Certificate) -> bool:
    """Does key `serial` hold this certificate?  asymmetric: /proc/keys shows its SKID's last 4 bytes;
    user (the kernel could not parse the key algorithm): the payload is the DER."""
    key_type = keyring.describe_key(serial)[0]
    if key_type == "user":
        return bytes(keyring.read_key(serial)) == cert.public_bytes(Encoding.DER)
    skid = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    with open("/proc/keys") as handle:
        line = next(line for line in handle if int(line.split()[0], 16) == serial)
    return f" {skid[-4:].hex()} " in line


def drop(serials: list[int]) -> None:
    for serial in serials:
        try:
            keyring.unlink(serial, user_keyring())
        except keyring.KeyringError:
            pass


# ---------------------------------------------------------------- the rules, on their own


def test_client_reports_only_the_leaf_and_reuses_its_key(hsd_pki: TestPki):
    chain = ders(hsd_pki.server.chain)
    assert len(chain) == 2
    peer = f"leaf-{uuid.uuid4().hex[:12]}.test"
    first = remote_auth_for(request(MessageType.CLIENTHELLO, peer), session(chain), verified=True)
    assert len(first) == 1 and first[0]
    assert keyring.describe_key(first[0])[4] == f"TLS x509 {peer}"
    assert keys_naming(peer) == [first[0]]  # the intermediate got no key
    again = remote_auth_for(request(MessageType.CLIENTHELLO, peer), session(chain), verified=True)
    assert again == first  # the live key is re-used, not re-added
    keyring.unlink(first[0], user_keyring())  # gone from the keyring: the next handshake must store it again
    renewed = remote_auth_for(request(MessageType.CLIENTHELLO, peer), session(chain), verified=True)
    assert renewed[0] != first[0] and keys_naming(peer) == [renewed[0]]
    drop(list(renewed))


def test_unverified_server_certificates_are_neither_stored_nor_reported(hsd_pki: TestPki):
    peer = f"unverified-{uuid.uuid4().hex[:12]}.test"
    chain = ders(hsd_pki.server.chain)
    assert remote_auth_for(request(MessageType.CLIENTHELLO, peer), session(chain), verified=False) == ()
    assert keys_naming(peer) == []


def test_server_reports_the_sentinel_per_client_certificate(hsd_pki: TestPki):
    chain = ders(hsd_pki.client.chain)
    assert remote_auth_for(request(MessageType.SERVERHELLO, None), session(chain), verified=True) == \
        (SERVER_X509_SENTINEL,) * 2


def test_no_peer_certificate_no_identity():
    assert remote_auth_for(request(MessageType.CLIENTHELLO), session(()), verified=True) == ()
    assert remote_auth_for(request(MessageType.SERVERHELLO), session(()), verified=True) == ()


# ---------------------------------------------------------------- a real server sending three certificates


@dataclass
class Chain:
    peername: str
    leaf: str  # PEM
    intermediates: str  # PEM: intermediate 2, intermediate 1 (the server sends them after the leaf)
    key: str
    root: str
    certs: list[x509.Certificate]  # as sent, leaf first


def _cert(subject: str, issuer: x509.Name, key, issuer_key, ca: bool, sans: list[str] | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))  # the core verifier (tlslite's) requires it (RFC 5280 4.2.1.1)
    if ca:  # a CA's key usage, as RFC 5280's path validation (the core verifier's) wants it
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def three_cert_chain(tmp_path) -> Chain:
    """leaf <- intermediate 2 <- intermediate 1 <- root, for a server name no other test uses."""
    peername = f"chain3-{uuid.uuid4().hex[:12]}.test"
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("identity root", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "identity root")]),
                 root_key, root_key, True)
    issuer, issuer_key, sent = root, root_key, []
    for depth in (1, 2):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"identity intermediate {depth}", issuer.subject, key, issuer_key, True)
        sent.insert(0, cert)
        issuer, issuer_key = cert, key
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sent.insert(0, _cert(peername, issuer.subject, leaf_key, issuer_key, False, [peername]))
    (tmp_path / "leaf.pem").write_bytes(sent[0].public_bytes(Encoding.PEM))
    (tmp_path / "intermediates.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in sent[1:]))
    (tmp_path / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
    fd = os.open(tmp_path / "leaf.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(leaf_key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return Chain(peername, str(tmp_path / "leaf.pem"), str(tmp_path / "intermediates.pem"), str(tmp_path / "leaf.key"),
                 str(tmp_path / "root.pem"), sent)


class ChainWitness:
    """An observer plugin: how many certificates the backend saw from the server (hsd_handshake_done)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo("chain-witness", "1.0", frozenset(), kind="observer")

    @hookimpl
    def hsd_handshake_done(self, ctx, status, session) -> None:
        self.seen.append(len(session.peer_certificates) if session is not None else -1)


def handshake_with_chain_server(chain: Chain, verify: bool, backend: str) -> tuple[int, ...]:
    """hsd (this backend, client unauth) against s_server sending all three certificates; the remote-auth."""
    config = Config(handshake_timeout_ms=10000)
    config.client.truststore = chain.root
    config.verify_server = verify
    opts = PeerOptions(cert=chain.leaf, key=chain.key, extra=["-cert_chain", chain.intermediates])
    witness = ChainWitness()
    with DaemonHarness(backend, config, extra_plugins={"chain-witness": witness}) as harness, \
            openssl_server(opts).start() as server:
        mine = socket.create_connection(server.address)
        try:
            finished = harness.finish(harness.client_hello_anon(mine, peername=chain.peername,
                                                                timeout_ms=10000)).expect(0)
        finally:
            mine.close()
    assert witness.seen == [3]  # the server really sent leaf + two intermediates
    return finished.remote_auth


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_certificate_chain_from_a_real_server_stores_exactly_the_leaf(three_cert_chain: Chain, backend: str):
    chain = three_cert_chain
    remote_auth = handshake_with_chain_server(chain, verify=True, backend=backend)
    stored = keys_naming(chain.peername)
    try:
        assert len(stored) == 1, f"{len(stored)} keys name the server: {stored}"
        assert remote_auth == (stored[0],)  # the consumer's peerid is that key
        assert keyring.describe_key(stored[0])[4] == f"TLS x509 {chain.peername}"
        assert holds_certificate(stored[0], chain.certs[0])  # the leaf ...
        assert not any(holds_certificate(stored[0], c) for c in chain.certs[1:])  # ... not an intermediate
    finally:
        drop(stored)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unverified_chain_from_a_real_server_leaves_no_key(three_cert_chain: Chain, backend: str):
    """verify_server = false: the server's certificates are claims, not identities (tlshd stores keys
    only after verification): no key in the keyring, no remote-auth in DONE."""
    chain = three_cert_chain
    remote_auth = handshake_with_chain_server(chain, verify=False, backend=backend)
    stored = keys_naming(chain.peername)
    drop(stored)
    assert remote_auth == ()
    assert stored == []
