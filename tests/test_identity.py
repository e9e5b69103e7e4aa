"""remote-auth identities: peer-certificate keys (client), the sentinel (server), nothing for unauth peers."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsd import keyring
from hsd.identity import SERVER_X509_SENTINEL, remote_auth_for
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session
from hsd.testing.pki import TestPki


def ders(path: str) -> tuple[bytes, ...]:
    with open(path, "rb") as handle:
        return tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(handle.read()))


def session(certs: tuple[bytes, ...]) -> Session:
    return Session("TLS_AES_128_GCM_SHA256", bytearray(32), bytearray(32), peer_certificates=certs)


def request(message_type: MessageType, peername: str | None = "ident.test") -> HandshakeRequest:
    return HandshakeRequest(sockfd=3, message_type=message_type, auth_mode=AuthMode.X509, peername=peername)


def test_client_reports_one_key_per_peer_certificate_and_reuses_them(hsd_pki: TestPki):
    chain = ders(hsd_pki.server.chain)
    assert len(chain) == 2
    first = remote_auth_for(request(MessageType.CLIENTHELLO), session(chain))
    assert len(first) == 2 and len(set(first)) == 2 and all(first)
    assert [keyring.describe_key(s)[4] for s in first] == ["TLS x509 ident.test", "TLS x509 ident.test #1"]
    again = remote_auth_for(request(MessageType.CLIENTHELLO), session(chain))
    assert again == first  # the live keys are re-used, not re-added
    user = keyring.keyring_id(keyring.KEY_SPEC_USER_KEYRING)
    keyring.unlink(first[0], user)  # gone from the keyring: the next handshake must store it again
    renewed = remote_auth_for(request(MessageType.CLIENTHELLO), session(chain))
    assert renewed[0] != first[0] and keyring.describe_key(renewed[0])[4] == "TLS x509 ident.test"
    assert renewed[1] == first[1]
    for serial in set(renewed):
        keyring.unlink(serial, user)


def test_server_reports_the_sentinel_per_client_certificate(hsd_pki: TestPki):
    chain = ders(hsd_pki.client.chain)
    assert remote_auth_for(request(MessageType.SERVERHELLO, None), session(chain)) == (SERVER_X509_SENTINEL,) * 2


def test_no_peer_certificate_no_identity():
    assert remote_auth_for(request(MessageType.CLIENTHELLO), session(())) == ()
    assert remote_auth_for(request(MessageType.SERVERHELLO), session(())) == ()
