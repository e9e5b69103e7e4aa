"""Certificate verification policy on an OpenSSL context: trust, CRLs, names, SANs.

OpenSSL does the path validation; this module feeds it the trust anchors and
CRLs from hsd's credentials, pins the expected peer name (DNS or IP) on the
connection, and records *why* verification failed so the DONE reason is
readable ("hostname mismatch", "certificate has expired", ...).
"""

from __future__ import annotations

import ipaddress

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from hsd.credentials import X509Credentials
from hsd.errors import CredentialError, PeerRejected
from hsd.x509verify import certificate_sans

X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS = 0x4


class VerifyOutcome:
    """Remembers the first verification failure of one handshake, for its error message."""

    def __init__(self, peer_role: str, allowed_sans: list[str], enforce: bool) -> None:
        self.peer_role = peer_role
        self.allowed_sans = [s.lower() for s in allowed_sans]
        self.enforce = enforce
        self.reason: str | None = None

    def callback(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        try:
            return self._judge(cert, errnum, depth, ok)
        except Exception as exc:  # noqa: BLE001  pyOpenSSL would park it on the (shared) context
            self.reason = self.reason or f"certificate check failed: {type(exc).__name__}"
            return False

    def _judge(self, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            if self.reason is None:
                self.reason = ffi.string(lib.X509_verify_cert_error_string(errnum)).decode()
                if depth:
                    self.reason += f" (chain depth {depth})"
            return not self.enforce
        if depth == 0 and self.allowed_sans:
            sans = certificate_sans(cert.to_cryptography())
            if not any(san.lower() in self.allowed_sans for san in sans):
                self.reason = f"names {sans or ['(none)']} are not in allowed_client_sans"
                return False
        return True

    def rejection(self, detail: str) -> PeerRejected:
        if self.reason:
            return PeerRejected(f"{self.peer_role} certificate verify failed: {self.reason}")
        return PeerRejected(detail)


def routed_verify(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    """The verify callback of a shared context: the connection's own VerifyOutcome judges (none: reject)."""
    outcome = getattr(conn.get_app_data(), "outcome", None)
    if not isinstance(outcome, VerifyOutcome):
        return False
    return outcome.callback(conn, cert, errnum, depth, ok)


def install_trust(context: SSL.Context, creds: X509Credentials) -> None:
    """Trust anchors (configured, or the system store) and CRLs, enforced on the whole chain."""
    if creds.trust is None:
        context.set_default_verify_paths()
    else:
        store = context.get_cert_store()
        for cert in creds.trust:
            try:
                store.add_cert(crypto.X509.from_cryptography(cert))
            except crypto.Error as exc:
                if "already in hash table" not in str(exc):
                    raise CredentialError(f"trust store: cannot use {cert.subject.rfc4514_string()}: {exc}") from None
    if creds.crls:
        store = context.get_cert_store()
        for crl in creds.crls:
            try:
                store.add_crl(crl)
            except crypto.Error as exc:
                raise CredentialError(f"CRL from {crl.issuer.rfc4514_string()} unusable: {exc}") from None
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)


def pin_peer_name(conn: SSL.Connection, peername: str, *, check: bool) -> None:
    """Send SNI for DNS names; with check, make OpenSSL match the server certificate to peername."""
    param = lib.SSL_get0_param(conn._ssl)
    try:
        address = ipaddress.ip_address(peername.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        packed = address.packed
        if check and lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed)) != 1:
            raise PeerRejected(f"cannot check the server certificate against address {peername}")
        return
    try:
        name = peername.rstrip(".").encode("idna")
    except UnicodeError:
        raise PeerRejected(f"peer name {peername!r} is not a valid host name") from None
    if check:
        lib.X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        if lib.X509_VERIFY_PARAM_set1_host(param, name, len(name)) != 1:
            raise PeerRejected(f"cannot check the server certificate against host name {peername!r}")
    conn.set_tlsext_host_name(name)
