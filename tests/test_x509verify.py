"""hsd.x509verify on its own: path, names, time, CRLs, client policy - with the real test PKI."""

from __future__ import annotations

import datetime
import errno

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsd import x509verify
from hsd.credentials import X509Credentials
from hsd.errors import CredentialError, PeerRejected
from hsd_kit.handshakes import expect_handshake_error
from hsd_kit.pki import TestPki, load_certificates as load, load_crls, x509_credentials as trusting


@pytest.fixture(name="pki")
def _pki(hsd_pki: TestPki) -> TestPki:
    """The test kit's PKI (one per session)."""
    return hsd_pki


def crls(pki: TestPki) -> list[x509.CertificateRevocationList]:
    return load_crls(pki.crl)


def rejected(fragment: str, call, *args) -> None:
    expect_handshake_error(errno.EACCES, fragment, call, *args, error=PeerRejected)


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST.", "127.0.0.1"])
def test_server_chain_verifies_for_its_names(pki, name: str) -> None:
    path = x509verify.verify_server_certificate(load(pki.server.chain), trusting(pki), name)
    assert path[0] == load(pki.server.cert)[0] and path[-1] == load(pki.ca)[0]


def test_server_leaf_alone_verifies_against_trusted_issuer(pki) -> None:
    assert len(x509verify.verify_server_certificate(load(pki.server.cert), trusting(pki), "localhost")) == 2


@pytest.mark.parametrize("name,fragment", [("other.example", "hostname mismatch"), ("127.0.0.2", "IP address mismatch"),
                                           ("::1", "IP address mismatch")])
def test_server_name_mismatch(pki, name: str, fragment: str) -> None:
    rejected(fragment, x509verify.verify_server_certificate, load(pki.server.chain), trusting(pki), name)


def test_no_peer_name_is_refused_without_lookup(pki) -> None:
    rejected("no reverse DNS", x509verify.verify_server_certificate, load(pki.server.chain), trusting(pki), None)


def test_untrusted_expired_and_wrong_purpose(pki) -> None:
    rejected("unable to get local issuer", x509verify.verify_server_certificate,
             load(pki.untrusted_server.chain), trusting(pki), "localhost")
    rejected("certificate has expired", x509verify.verify_server_certificate,
             load(pki.expired_server.chain), trusting(pki), "localhost")
    rejected("purpose", x509verify.verify_client_certificate, load(pki.server.chain), trusting(pki))


def test_system_store_does_not_trust_the_test_ca(pki) -> None:
    assert x509verify.system_trust_anchors()  # the machine's bundle was found and parsed
    rejected("unable to get local issuer", x509verify.verify_server_certificate,
             load(pki.server.chain), X509Credentials(trust=None), "localhost")


def test_revoked_certificate_is_rejected_and_good_one_passes(pki) -> None:
    creds = trusting(pki, crls=crls(pki))
    rejected("certificate revoked", x509verify.verify_server_certificate, load(pki.revoked_server.chain), creds,
             "localhost")
    x509verify.verify_server_certificate(load(pki.server.chain), creds, "localhost")


def test_expired_crl_and_missing_crl(pki) -> None:
    path = x509verify.verify_server_certificate(load(pki.server.chain), trusting(pki), "localhost")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=31)
    rejected("CRL has expired", x509verify.check_revocation, path, crls(pki), later)
    key = ec.generate_private_key(ec.SECP256R1())  # a CRL for another issuer name does not count
    now = datetime.datetime.now(datetime.timezone.utc)
    stranger = (x509.CertificateRevocationListBuilder()
                .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "someone")]))
                .last_update(now).next_update(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    rejected("unable to get certificate CRL", x509verify.check_revocation, path, [stranger])


def test_forged_crl_signature_is_rejected(pki) -> None:
    path = x509verify.verify_server_certificate(load(pki.server.chain), trusting(pki), "localhost")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    forged = (x509.CertificateRevocationListBuilder().issuer_name(path[1].subject)
              .last_update(now).next_update(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    rejected("CRL signature failure", x509verify.check_revocation, path, [forged])


def test_client_policy(pki) -> None:
    client = load(pki.client.chain)
    assert x509verify.verify_client_certificate(client, trusting(pki))
    assert x509verify.verify_client_certificate(client, trusting(pki, allowed_sans=["CLIENT.test"]))
    rejected("allowed_client_sans", x509verify.verify_client_certificate, client,
             trusting(pki, allowed_sans=["someone.test"]))
    assert x509verify.verify_client_certificate([], trusting(pki)) == []
    rejected("no certificate", x509verify.verify_client_certificate, [], trusting(pki, require_peer_cert=True))
    rejected("no certificate", x509verify.verify_client_certificate, [], trusting(pki, allowed_sans=["client.test"]))
    untrusted = load(pki.untrusted_server.chain)
    rejected("verify failed", x509verify.verify_client_certificate, untrusted, trusting(pki))
    assert x509verify.verify_client_certificate(untrusted, trusting(pki, verify_peer=False)) == []


def test_client_policy_compares_typed_sans(pki) -> None:
    """The kit's client certificate has DNS:client.test and URI:hsd://client; each matches its own type only."""
    client = load(pki.client.chain)
    for allowed in (["uri:hsd://client"], ["dns:client.test."], ["ip:192.0.2.1", "client.test"]):
        assert x509verify.verify_client_certificate(client, trusting(pki, allowed_sans=allowed)), allowed
    for allowed in (["email:client@client.test"], ["uri:https://client.test"], ["ip:127.0.0.1"]):
        rejected("not in allowed_client_sans", x509verify.verify_client_certificate, client,
                 trusting(pki, allowed_sans=allowed))
    # an untyped URI is no DNS name: a plugin that hands one in gets a clear credential error, not a match
    with pytest.raises(CredentialError, match="write uri:hsd://client"):
        x509verify.verify_client_certificate(client, trusting(pki, allowed_sans=["hsd://client"]))


def test_rejections_name_the_sans_with_their_types(pki) -> None:
    client = load(pki.client.chain)
    with pytest.raises(PeerRejected) as info:
        x509verify.verify_client_certificate(client, trusting(pki, allowed_sans=["someone.test"]))
    assert "['dns:client.test', 'uri:hsd://client']" in info.value.reason
