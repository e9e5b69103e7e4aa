"""Certificate path, revocation and peer-name verification for backends whose TLS library does none.

tlslite (and any plugin built on a similar library) hands the peer's chain here
while the handshake is still running, so a bad certificate ends it with an
alert, like OpenSSL's built-in verification.  Path building and the host-name
or IP match are cryptography.x509.verification (RFC 5280 + web PKI profile,
EKU serverAuth/clientAuth enforced); on top of that we enforce CRLs (a CRL from
each certificate's issuer, current and correctly signed, must not list it -
OpenSSL's CRL_CHECK_ALL), the server's allow-list of client names and the
"client certificate required" policy.  Reasons read like OpenSSL's so DONE
logs look the same whichever backend ran.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from .credentials import X509Credentials, parse_certificates
from .errors import CredentialError, PeerRejected

MAX_CHAIN_DEPTH = 10


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """DNS names, IP addresses, e-mail addresses and URIs of a certificate's SAN extension."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    names += ext.get_values_for_type(x509.DNSName)
    names += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    names += ext.get_values_for_type(x509.RFC822Name)
    names += ext.get_values_for_type(x509.UniformResourceIdentifier)
    return names


@functools.lru_cache(maxsize=1)
def system_trust_anchors() -> tuple[x509.Certificate, ...]:
    """The system CA bundle OpenSSL would use (read once; the bundle changes only on package updates)."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if not path:
            continue
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        return tuple(parse_certificates(data, path))
    raise CredentialError("no system CA bundle found; configure x509.truststore")


def trust_store(creds: X509Credentials) -> Store:
    anchors = system_trust_anchors() if creds.trust is None else tuple(creds.trust)
    if not anchors:
        raise CredentialError("the trust store is empty: no peer certificate can be verified")
    return Store(list(anchors))


def peer_subject(peername: str) -> DNSName | IPAddress:
    """The name a server certificate must carry: an IP address SAN for addresses, else a DNS SAN."""
    bare = peername.strip().strip("[]")
    try:
        return IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    try:
        name = bare.rstrip(".").encode("idna").decode("ascii")
        return DNSName(name)
    except (UnicodeError, ValueError):
        raise PeerRejected(f"peer name {peername!r} is not a valid host name") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _validity_problem(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    if now > cert.not_valid_after_utc:
        return "certificate has expired"
    if now < cert.not_valid_before_utc:
        return "certificate is not yet valid"
    return None


def _explain(exc: VerificationError, leaf: x509.Certificate, peer_sent: Sequence[x509.Certificate],
             subject: DNSName | IPAddress | None, now: datetime.datetime) -> str:
    """Turn cryptography's verification error into OpenSSL-style wording."""
    text = str(exc)
    for depth, cert in enumerate(peer_sent):
        problem = _validity_problem(cert, now)
        if problem:
            return problem + (f" (chain depth {depth})" if depth else "")
    if "no matching subjectAltName" in text and subject is not None:
        what = "IP address" if isinstance(subject, IPAddress) else "hostname"
        return f"{what} mismatch (certificate is for {certificate_sans(leaf) or ['(no names)']}, expected {subject.value})"
    if "EKU" in text:
        return f"unsuitable certificate purpose ({text})"
    if "candidates exhausted" in text:
        return "unable to get local issuer certificate (not issued by a trusted CA)"
    return text


def check_revocation(path: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList],
                     now: datetime.datetime | None = None) -> None:
    """Every certificate below the trust anchor needs a current CRL from its issuer that does not list it."""
    if not crls:
        return
    now = now or _now()
    for depth, (cert, issuer) in enumerate(zip(path, path[1:])):
        where = f" (chain depth {depth})" if depth else ""
        candidates = [crl for crl in crls if crl.issuer == issuer.subject]
        signed = [crl for crl in candidates if _signed_by(crl, issuer)]
        if not signed:
            reason = "CRL signature failure" if candidates else "unable to get certificate CRL"
            raise PeerRejected(f"{reason}{where}")
        current = [crl for crl in signed if _crl_is_current(crl, now)]
        if not current:
            stale = any(crl.next_update_utc is not None and now > crl.next_update_utc for crl in signed)
            raise PeerRejected(("CRL has expired" if stale else "CRL is not yet valid") + where)
        for crl in current:
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise PeerRejected(f"certificate revoked{where}")


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError):
        return False


def _crl_is_current(crl: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    if now < crl.last_update_utc:
        return False
    return crl.next_update_utc is None or now <= crl.next_update_utc


def check_allowed_sans(leaf: x509.Certificate, allowed: Sequence[str]) -> None:
    if not allowed:
        return
    sans = certificate_sans(leaf)
    wanted = {name.lower() for name in allowed}
    if not any(san.lower() in wanted for san in sans):
        raise PeerRejected(f"client certificate names {sans or ['(none)']} are not in allowed_client_sans")


def require_peer_name(peername: str | None) -> str:
    """A client that verifies the server needs a name to check it against; hsd never guesses one.

    tlshd falls back to reverse DNS (slow, and spoofable); the kernel consumer
    knows the name it mounted or connected to, so it must pass it."""
    if not peername:
        raise PeerRejected("client handshake without a peer name: the server certificate cannot be "
                           "checked (hsd does no reverse DNS lookup; the kernel consumer must pass one)")
    return peername


def verify_server_certificate(chain: Sequence[x509.Certificate], creds: X509Credentials, peername: str | None,
                              now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """We are the client: the server's chain must lead to a trust anchor and name peername.

    Returns the verified path, leaf first.  Raises PeerRejected with an
    OpenSSL-like reason.  The caller decides whether verification is on.
    """
    name = require_peer_name(peername)
    if not chain:
        raise PeerRejected("server sent no certificate")
    subject = peer_subject(name)
    now = now or _now()
    verifier = (PolicyBuilder().store(trust_store(creds)).time(now).max_chain_depth(MAX_CHAIN_DEPTH)
                .build_server_verifier(subject))
    try:
        path = verifier.verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        raise PeerRejected("server certificate verify failed: " + _explain(exc, chain[0], chain, subject, now)) from None
    _revocation(path, creds, now, "server")
    return list(path)


def verify_client_certificate(chain: Sequence[x509.Certificate], creds: X509Credentials,
                              now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """We are the server: apply require_peer_cert, path validation (if verify_peer) and allowed_sans.

    An empty chain passes unless a certificate is required (or allowed_sans is
    set: an allow-list means nothing if a client can send no certificate).
    Returns the verified path ([] when no certificate or verification is off).
    """
    if not chain:
        if creds.require_peer_cert or creds.allowed_sans:
            raise PeerRejected("client sent no certificate, and one is required")
        return []
    now = now or _now()
    path: list[x509.Certificate] = []
    if creds.verify_peer:
        verifier = (PolicyBuilder().store(trust_store(creds)).time(now).max_chain_depth(MAX_CHAIN_DEPTH)
                    .build_client_verifier())
        try:
            path = list(verifier.verify(chain[0], list(chain[1:])).chain)
        except VerificationError as exc:
            raise PeerRejected("client certificate verify failed: " + _explain(exc, chain[0], chain, None, now)) from None
        _revocation(path, creds, now, "client")
    check_allowed_sans(chain[0], creds.allowed_sans)
    return path


def _revocation(path: Sequence[x509.Certificate], creds: X509Credentials, now: datetime.datetime, role: str) -> None:
    try:
        check_revocation(path, creds.crls, now)
    except PeerRejected as exc:
        raise PeerRejected(f"{role} certificate verify failed: {exc.reason}") from None
