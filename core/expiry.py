"""Certificates, chains and CRLs that expire soon, or have: the rule and its words.

Why: an expired certificate or a CRL past its next update makes handshakes
fail (peers refuse our certificate; hsd refuses the peers a stale CRL covers)
with nothing in hsd's log until a mount or a connect fails.  So hsd warns
``[hsd] expiry_warning_days`` ahead (default 14; 0: no early warning) at start,
at reload and once a day while it runs, and an expired certificate or a CRL
past its next update is an error line naming the file.  Neither stops
start-up: the other modes, and peers the CRL does not cover, keep working.

hsd.check.inspect() judges the files it has already read with certificate()
and crl(), so `hsd check`, start and reload say the same; scan() reads the
same files for the daily check (certificates and CRLs only, never a key).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Expiry:
    """One certificate or CRL that has expired (error) or will within the warning window."""

    error: bool
    key: str  # the config key that names the file, e.g. "[authenticate.server] x509.certificate"
    path: str
    what: str  # "the certificate CN=a", "CA CN=b", "the CRL of CN=b"
    when: datetime.datetime  # notAfter, or the CRL's nextUpdate
    days: int  # whole days left from now (negative once past)

    def line(self) -> str:
        at = f"{self.when:%Y-%m-%d %H:%M} UTC"
        if self.error:
            consequence = ("peers it covers are refused until a current CRL is installed" if "CRL" in self.what
                           else "handshakes that need it fail until it is renewed")
            verb = "is past its next update" if "CRL" in self.what else "expired"
            return f"{self.key} = {self.path}: {self.what} {verb} ({at}): {consequence}"
        left = "today" if self.days == 0 else f"in {self.days} day{'s' if self.days != 1 else ''}"
        verb = "needs its next update" if "CRL" in self.what else "expires"
        return f"{self.key} = {self.path}: {self.what} {verb} {left} ({at})"


def _judge(when: datetime.datetime, now: datetime.datetime, window_days: int) -> tuple[bool, int] | None:
    """(error, days left) when `when` is past or within the window, else None."""
    left = when - now
    if left <= datetime.timedelta(0):
        return True, -int(-left / DAY)
    if window_days and left <= window_days * DAY:
        return False, int(left / DAY)
    return None


def certificate(cert: x509.Certificate, key: str, path: str, what: str, now: datetime.datetime,
                window_days: int) -> Expiry | None:
    verdict = _judge(cert.not_valid_after_utc, now, window_days)
    if verdict is None:
        return None
    return Expiry(verdict[0], key, path, f"{what} {cert.subject.rfc4514_string()}", cert.not_valid_after_utc,
                  verdict[1])


def crl(revocations: x509.CertificateRevocationList, key: str, path: str, now: datetime.datetime,
        window_days: int) -> Expiry | None:
    if revocations.next_update_utc is None:  # a CRL without a next update never goes stale
        return None
    verdict = _judge(revocations.next_update_utc, now, window_days)
    if verdict is None:
        return None
    return Expiry(verdict[0], key, path, f"the CRL of {revocations.issuer.rfc4514_string()}",
                  revocations.next_update_utc, verdict[1])


def chain(certs: list[x509.Certificate], key: str, path: str, now: datetime.datetime,
          window_days: int) -> list[Expiry]:
    """Our certificate file: the leaf first, then each chain certificate sent with it."""
    found = [certificate(cert, key, path, "the certificate" if index == 0 else "the chain certificate", now,
                         window_days) for index, cert in enumerate(certs)]
    return [item for item in found if item is not None]


def trust_store(cas: list[x509.Certificate], key: str, path: str, now: datetime.datetime,
                window_days: int) -> list[Expiry]:
    found = [certificate(ca, key, path, "CA", now, window_days) for ca in cas]
    return [item for item in found if item is not None]


def crls(revocations: list[x509.CertificateRevocationList], key: str, path: str, now: datetime.datetime,
         window_days: int) -> list[Expiry]:
    found = [crl(item, key, path, now, window_days) for item in revocations]
    return [item for item in found if item is not None]


_JUDGES = (("truststore", trust_store, "certificates"), ("crl", crls, "crls"), ("certificate", chain, "certificates"),
           ("pq_certificate", chain, "certificates"))


EVERYTHING = 10 ** 6  # days: a window that takes in every file (hsd status lists them all)


def scan(cfg, now: datetime.datetime | None = None, *, every_file: bool = False) -> list[Expiry]:
    """Every configured certificate, chain, trust store and CRL judged now (every_file: listed whatever its date);
    unreadable files are skipped (start-up and reload report those, in hsd.check's words).  cfg: hsd.config.Config"""
    from . import credentials
    from .errors import CredentialError

    now = now or datetime.datetime.now(datetime.timezone.utc)
    window = EVERYTHING if every_file else cfg.expiry_warning_days
    files = [(key_name(role, attr), getattr(cfg.role(role), attr), judge, kind)
             for role in ("client", "server") for attr, judge, kind in _JUDGES]
    files += [(sni_key(pair), pair.certificate, chain, "certificates") for pair in cfg.sni]
    found: list[Expiry] = []
    for key, path, judge, kind in files:
        if not path or path.startswith(("pkcs11:", "tpmkey:")):
            continue
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            parsed = (credentials.parse_crls if kind == "crls" else credentials.parse_certificates)(data, path)
        except (OSError, CredentialError):
            continue
        found += judge(parsed, key, path, now, window)
    return found


def sni_key(pair) -> str:
    """How messages name an [hsd.server.sni] line: its file and line, section and name.  pair: hsd.config.SniPair"""
    return f"{pair.where}: {pair.key}"


def key_name(role: str, attr: str) -> str:
    """The config key of a role's file attribute, as messages name it."""
    return f"[authenticate.{role}] x509.{attr.replace('pq_', 'pq.')}"
