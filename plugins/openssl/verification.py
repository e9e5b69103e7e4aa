"""Certificate verification policy on an OpenSSL context: trust, CRLs, names, SANs.

OpenSSL does the path validation; this module feeds it the trust anchors and
CRLs from hsd's credentials, pins the expected peer name (DNS or IP, already
normalised by hsd.x509verify.normalize_peer_name) on the connection, and
records *why* verification failed so the DONE reason is readable ("hostname
mismatch", "certificate has expired", ...).  Allowed client SANs are matched
by hsd.x509verify as typed values, as in every backend.
"""

from __future__ import annotations

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from hsd.credentials import X509Credentials
from hsd.errors import CredentialError, PeerRejected
from hsd.x509verify import PeerName, allowed_san_values, match_allowed_sans, name_mismatch

# pyOpenSSL has no public API for host flags; these are OpenSSL's X509_CHECK_FLAG_* values.
# NEVER_CHECK_SUBJECT: only subjectAltName names the server, never the subject CN (RFC 9525).
HOST_FLAGS = lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: worded by hsd.x509verify


class VerifyOutcome:
    """Remembers the first verification failure of one handshake, for its error message."""

    def __init__(self, peer_role: str, allowed_sans: list[str], enforce: bool) -> None:
        self.peer_role = peer_role
        allowed_san_values(tuple(allowed_sans))  # an unusable entry fails before anything is sent
        self.allowed_sans = list(allowed_sans)
        self.enforce = enforce
        self.reason: str | None = None
        self.expected_name: PeerName | None = None  # set by pin_peer_name: the name a mismatch names

    def callback(self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        try:
            return self._judge(cert, errnum, depth, ok)
        except Exception as exc:  # noqa: BLE001  pyOpenSSL would park it on the (shared) context
            self.reason = self.reason or f"certificate check failed: {type(exc).__name__}"
            return False

    def _judge(self, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            if self.reason is None and errnum in NAME_MISMATCH and self.expected_name is not None:
                self.reason = name_mismatch(cert.to_cryptography(), self.expected_name)
            if self.reason is None:
                self.reason = ffi.string(lib.X509_verify_cert_error_string(errnum)).decode()
                if depth:
                    self.reason += f" (chain depth {depth})"
            return not self.enforce
        if depth == 0 and self.allowed_sans:
            try:
                match_allowed_sans(cert.to_cryptography(), self.allowed_sans)
            except PeerRejected as exc:
                self.reason = exc.reason.removeprefix("client certificate ")
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


def pin_peer_name(conn: SSL.Connection, name: PeerName, *, check: bool) -> None:
    """Send SNI for DNS names; with check, make OpenSSL match the server certificate's SANs to name."""
    param = lib.SSL_get0_param(conn._ssl)
    outcome = getattr(conn.get_app_data(), "outcome", None)
    if check and isinstance(outcome, VerifyOutcome):
        outcome.expected_name = name
    if check:
        lib.X509_VERIFY_PARAM_set_hostflags(param, HOST_FLAGS)
        if name.ip is not None:
            packed = name.ip.packed
            if lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed)) != 1:
                raise PeerRejected(f"cannot check the server certificate against address {name}")
        else:
            host = name.text.encode("ascii")
            # set1_host with an empty name clears the check: PeerName never is empty, and this says so twice
            if not host or lib.X509_VERIFY_PARAM_set1_host(param, host, len(host)) != 1:
                raise PeerRejected(f"cannot check the server certificate against host name {name.text!r}")
    if name.sni is not None:
        conn.set_tlsext_host_name(name.sni.encode("ascii"))
