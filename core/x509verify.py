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

Names are hsd's, for every backend: normalize_peer_name is the one rule that
turns the kernel's peer name into a DNS name or IP address (or refuses it), and
SANs are compared as typed values (SanValue), so a URI or e-mail SAN never
satisfies a DNS allow-list entry.  The subject CN is never a name (RFC 9525).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from .credentials import X509Credentials, parse_certificates
from .errors import CredentialError, PeerRejected
from .session import Session

MAX_CHAIN_DEPTH = 10


IPValue = ipaddress.IPv4Address | ipaddress.IPv6Address
SanKind = Literal["dns", "ip", "email", "uri"]
SAN_KINDS: tuple[SanKind, ...] = ("dns", "ip", "email", "uri")
MAX_DNS_NAME = 253  # RFC 1035, without the trailing dot
MAX_DNS_LABEL = 63
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


# ---------------------------------------------------------------- names: one normalisation rule

def _unprintable(text: str) -> str | None:
    """Why text cannot be a name at all (NUL, white space, control characters), or None."""
    if "\0" in text:
        return "it contains a NUL character"
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        return "it contains white space or a control character"
    return None


def _ip_literal(text: str) -> IPValue | None:
    """The address text spells (IPv6 optionally in brackets), None if it is no address; ValueError if misused."""
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        address = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        if bracketed:
            raise ValueError("brackets may only enclose an IPv6 address") from None
        return None
    if bracketed and address.version != 6:
        raise ValueError("brackets may only enclose an IPv6 address")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError("an IPv6 zone index cannot be matched to a certificate")
    return address


def _dns_name(text: str, *, wildcard: bool = False) -> str:
    """text as a DNS name in A-labels, lower case, without its one optional trailing dot; ValueError if invalid.

    wildcard: a leftmost "*" label is allowed (allow-list entries only; it
    matches a certificate carrying that same wildcard name, nothing else)."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("it is empty" + (" after removing the trailing dot" if text else ""))
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("it is not a valid internationalised domain name")
    name = name.lower()
    if len(name) > MAX_DNS_NAME:
        raise ValueError(f"it is longer than {MAX_DNS_NAME} characters")
    labels = name.split(".")
    for index, label in enumerate(labels):
        if not label:
            raise ValueError("it has an empty label")
        if len(label) > MAX_DNS_LABEL:
            raise ValueError(f"it has a label longer than {MAX_DNS_LABEL} characters")
        if wildcard and index == 0 and label == "*" and len(labels) > 1:
            continue
        if not _LDH_LABEL.match(label):
            raise ValueError(f"label {label!r} is not letters, digits and inner hyphens")
    if labels[-1].isdigit():
        raise ValueError("its last label is all digits (an IPv4 address in a short form?)")
    return name


@dataclass(frozen=True)
class PeerName:
    """The name the kernel consumer gave for the server, after hsd's one normalisation rule.

    Exactly one of dns (A-labels, lower case, no trailing dot, never empty)
    and ip is set.  Every backend checks certificates against this and sends
    its SNI, so no backend normalises names on its own."""

    dns: str | None = None
    ip: IPValue | None = None

    def __post_init__(self) -> None:
        if (self.dns is None) == (self.ip is None) or self.dns == "":
            raise ValueError("a PeerName is exactly one non-empty DNS name or one IP address")

    @property
    def text(self) -> str:
        return self.dns if self.dns is not None else str(self.ip)

    @property
    def sni(self) -> str | None:
        """The server_name to send: DNS names only (RFC 6066 forbids addresses)."""
        return self.dns

    def subject(self) -> DNSName | IPAddress:
        """The name for cryptography's verifier: an IP address SAN for addresses, else a DNS SAN."""
        return DNSName(self.dns) if self.dns is not None else IPAddress(self.ip)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=256)  # a pure function of the string, asked once per client request
def normalize_peer_name(name: str) -> PeerName:
    """name as a DNS name or IP address, or PeerRejected (EACCES) saying why it is neither.

    "server.example." and "SERVER.example" are "server.example"; "[::1]" is ::1.
    Refused: "", ".", "..", empty or overlong labels, leading or trailing
    hyphens, NUL, white space, zone indexes, short-form IPv4 ("127.1") - an
    empty name would switch OpenSSL's host check off."""
    try:
        problem = _unprintable(name)
        if problem:
            raise ValueError(problem)
        address = _ip_literal(name)
        return PeerName(ip=address) if address is not None else PeerName(dns=_dns_name(name))
    except ValueError as exc:
        raise PeerRejected(f"peer name {name!r} is not a valid DNS name or IP address: {exc}") from None


def normalize_dns_name(text: str, *, wildcard: bool = False) -> str:
    """text as a DNS name by the same rule as normalize_peer_name (A-labels, lower case, no trailing dot);
    ValueError says why it is none.  wildcard: a leftmost "*" label is allowed."""
    problem = _unprintable(text)
    if problem:
        raise ValueError(problem)
    return _dns_name(text, wildcard=wildcard)


def client_peer_name(peername: str | None, *, verify: bool) -> PeerName | None:
    """The server's normalised name for a client handshake; None only when none was given and none is needed."""
    if not peername:
        if verify:
            require_peer_name(peername)
        return None
    return normalize_peer_name(peername)


# ---------------------------------------------------------------- typed subject alternative names

@dataclass(frozen=True)
class SanValue:
    """One subject alternative name with its type; the type takes part in every comparison.

    value is in comparison form: DNS names lower case without a trailing dot,
    addresses in their canonical text, e-mail with a lower-case domain, URIs as
    written."""

    kind: SanKind
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def _email(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise ValueError("an e-mail address needs a local part, '@' and a domain")
    return f"{local}@{_dns_name(domain)}"


def _uri(text: str) -> str:
    if not _URI_SCHEME.match(text):
        raise ValueError("a URI starts with its scheme, like 'spiffe:' or 'https:'")
    return text


def parse_allowed_san(entry: str) -> SanValue:
    """One allowed_client_sans entry, typed; ValueError says why it is unusable.

    "dns:NAME", "ip:ADDRESS", "email:ADDRESS", "uri:URI" name their type.  An
    untyped entry is an IP literal or a DNS name - never an e-mail address or
    a URI, so a URI SAN reading "host.example" does not satisfy "host.example"."""
    problem = _unprintable(entry)
    if problem:
        raise ValueError(problem)
    prefix, colon, rest = entry.partition(":")
    kind = prefix.lower()
    if colon and kind in SAN_KINDS:
        if not rest:
            raise ValueError(f"nothing after '{prefix}:'")
        if kind == "dns":
            return SanValue("dns", _dns_name(rest, wildcard=True))
        if kind == "ip":
            address = _ip_literal(rest)
            if address is None:
                raise ValueError(f"{rest!r} is not an IP address")
            return SanValue("ip", str(address))
        return SanValue(kind, _email(rest) if kind == "email" else _uri(rest))
    address = _ip_literal(entry)
    if address is not None:
        return SanValue("ip", str(address))
    try:
        return SanValue("dns", _dns_name(entry, wildcard=True))
    except ValueError as exc:
        hint = ("; write email:" + entry + " for an e-mail address" if "@" in entry
                else "; write uri:" + entry + " for a URI" if colon else "")
        raise ValueError(f"it is not a DNS name or an IP address ({exc}){hint}") from None


@functools.lru_cache(maxsize=64)
def allowed_san_values(entries: tuple[str, ...]) -> frozenset[SanValue]:
    """The allow-list in typed form (CredentialError for an entry the config check would have refused)."""
    values: set[SanValue] = set()
    for entry in entries:
        try:
            values.add(parse_allowed_san(entry))
        except ValueError as exc:
            raise CredentialError(f"allowed_client_sans entry {entry!r}: {exc}") from None
    return frozenset(values)


def _cert_dns(name: str) -> str:
    """A certificate's dNSName in comparison form (certificates carry A-labels; one trailing dot is dropped)."""
    lowered = name.lower()
    return lowered[:-1] if lowered.endswith(".") and len(lowered) > 1 else lowered


def _cert_email(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{_cert_dns(domain)}" if at else _cert_dns(address)


def certificate_san_values(cert: x509.Certificate) -> list[SanValue]:
    """The DNS, IP, e-mail and URI names of a certificate's SAN extension, each with its type."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [SanValue("dns", _cert_dns(name)) for name in ext.get_values_for_type(x509.DNSName)]
    names += [SanValue("ip", str(ip)) for ip in ext.get_values_for_type(x509.IPAddress)]
    names += [SanValue("email", _cert_email(name)) for name in ext.get_values_for_type(x509.RFC822Name)]
    names += [SanValue("uri", uri) for uri in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    return names


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """A certificate's SANs as "type:value" text, for log lines."""
    return [str(name) for name in certificate_san_values(cert)]


def match_allowed_sans(leaf: x509.Certificate, allowed: Sequence[str]) -> SanValue | None:
    """The leaf's first SAN on the allow-list (same type and value); None when there is no list.

    PeerRejected when a list is configured and no SAN of the leaf is on it."""
    if not allowed:
        return None
    wanted = allowed_san_values(tuple(allowed))
    names = certificate_san_values(leaf)
    for name in names:
        if name in wanted:
            return name
    raise PeerRejected(f"client certificate names {[str(n) for n in names] or ['(none)']} "
                       "are not in allowed_client_sans")


def record_proven_client_name(session: Session, allowed: Sequence[str]) -> Session:
    """After a server handshake: name in session.details["peer_san"] the allowed SAN the client proved.

    Checked again on the certificate the session reports (the backend's
    in-handshake check decided the handshake; this names what it proved).  A
    session whose certificate proves no allowed name is wiped and refused."""
    if not allowed:
        return session
    try:
        if not session.peer_certificates:
            raise PeerRejected("client sent no certificate, and one is required")
        match = match_allowed_sans(x509.load_der_x509_certificate(session.peer_certificates[0]), allowed)
    except BaseException:
        session.wipe()
        raise
    if match is not None:
        session.details["peer_san"] = str(match)
    return session


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


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _validity_problem(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    if now > cert.not_valid_after_utc:
        return "certificate has expired"
    if now < cert.not_valid_before_utc:
        return "certificate is not yet valid"
    return None


def _explain(exc: VerificationError, leaf: x509.Certificate, peer_sent: Sequence[x509.Certificate],
             subject: PeerName | None, now: datetime.datetime) -> str:
    """Turn cryptography's verification error into OpenSSL-style wording."""
    text = str(exc)
    for depth, cert in enumerate(peer_sent):
        problem = _validity_problem(cert, now)
        if problem:
            return problem + (f" (chain depth {depth})" if depth else "")
    if subject is not None and (not _has_san(leaf) or "no matching subjectAltName" in text):
        return name_mismatch(leaf, subject)
    if "EKU" in text:
        return f"unsuitable certificate purpose ({text})"
    # cryptography 43 (Debian trixie's) words it CandidatesExhausted(Other("...")), later ones "candidates exhausted: ..."
    if "candidates exhausted" in text.lower() or "CandidatesExhausted" in text:
        return "unable to get local issuer certificate (not issued by a trusted CA)"
    return text


def name_mismatch(leaf: x509.Certificate, subject: PeerName) -> str:
    """The reason for a server certificate that does not name the server: the wanted name and the names it has.

    Every backend words it this way, so the operator sees at once whether the
    mount used another name than the certificate carries (fix the mount or
    reissue the certificate)."""
    what = "IP address" if subject.ip is not None else "hostname"
    if not _has_san(leaf):
        return (f"{what} mismatch (wanted {subject}; the certificate has no subjectAltName, "
                "and its subject CN is no name, RFC 9525)")
    names = ", ".join(certificate_sans(leaf)) or "(no DNS name or IP address)"
    return f"{what} mismatch (wanted {subject}; the certificate is for {names})"


def _has_san(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    return True


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


def require_peer_name(peername: str | None) -> str:
    """A client that verifies the server needs a name to check it against; hsd never guesses one.

    tlshd falls back to reverse DNS (slow, and spoofable); the kernel consumer
    knows the name it mounted or connected to, so it must pass it."""
    if not peername:
        raise PeerRejected("client handshake without a peer name: the server certificate cannot be "
                           "checked (hsd does no reverse DNS lookup; the kernel consumer must pass one)")
    return peername


def verify_server_certificate(chain: Sequence[x509.Certificate], creds: X509Credentials,
                              peername: PeerName | str | None,
                              now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """We are the client: the server's chain must lead to a trust anchor and name peername.

    Only subjectAltName counts, never the subject CN (RFC 9525).  Returns the
    verified path, leaf first.  Raises PeerRejected with an OpenSSL-like
    reason.  The caller decides whether verification is on.
    """
    subject = peername if isinstance(peername, PeerName) else normalize_peer_name(require_peer_name(peername))
    if not chain:
        raise PeerRejected("server sent no certificate")
    now = now or _now()
    verifier = (PolicyBuilder().store(trust_store(creds)).time(now).max_chain_depth(MAX_CHAIN_DEPTH)
                .build_server_verifier(subject.subject()))
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
    match_allowed_sans(chain[0], creds.allowed_sans)
    return path


def _revocation(path: Sequence[x509.Certificate], creds: X509Credentials, now: datetime.datetime, role: str) -> None:
    try:
        check_revocation(path, creds.crls, now)
    except PeerRejected as exc:
        raise PeerRejected(f"{role} certificate verify failed: {exc.reason}") from None
