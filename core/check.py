"""What hsd refuses to start with, and what it warns about: one decision for `hsd check` and the daemon.

Why one function: an operator runs `hsd check`, reads "configuration OK" and
starts the daemon; if the two disagreed, the daemon would find a missing file
or a key that does not match its certificate only when a handshake needs it
(a DONE with EIO on a mount at 3 a.m.).  So `hsd check`, the daemon's start
and its reload all call inspect(): every error it returns stops start-up
(exit 2) or a reload, every warning is printed once.

inspect() loads what a handshake would load - each configured file read and
parsed, private keys matched to their certificates, permissions judged under
the configured policy, CRLs checked for being current and signed by a trust
store CA - and resolves the backend and plugins of every mode.  Key material
is read into buffers that are zeroed once parsed, and never reported.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from . import credentials, expiry, filetrust, pkcs11, sni, x509verify
from .config import MODES, Config, RoleConfig, nearest
from .errors import CredentialError
from .plugins import PluginHost
from .secret import wipe


@dataclass
class Findings:
    """Errors stop start-up (and `hsd check`); warnings are printed once and, with --strict, fail the check."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was verified, for `hsd check`'s report
    # certificates and CRLs expired (error lines) or expiring within [hsd] expiry_warning_days (warnings):
    # reported at start, reload and daily, and by `hsd check`; they do not stop start-up (hsd.expiry says why)
    expiring: list[expiry.Expiry] = field(default_factory=list)


class _Refused(Exception):
    """filetrust's refusal under strict_permissions, turned into an error finding."""


def inspect(cfg: Config, host: PluginHost, *, backend_option: bool = False) -> Findings:
    """Everything the daemon would refuse or fail on with this configuration, and what it would warn about.

    backend_option: cfg.backend came from --backend (the messages name the option, not [hsd] backend)."""
    found = Findings(warnings=list(cfg.warnings))
    _backends(cfg, host, found, backend_option)
    pkcs11.forget()  # start and reload open token keys afresh (a key replaced in the token is seen)
    _token_backends(cfg, found)
    now = datetime.datetime.now(datetime.timezone.utc)
    for role in ("client", "server"):
        _role_files(cfg, role, found, now)
    _sni_pairs(cfg, found, now)
    _metrics_file(cfg, found)
    return found


def _metrics_file(cfg: Config, found: Findings) -> None:
    """[hsd] metrics_file: a warning, not an error, when it cannot work (hsd serves handshakes without metrics)."""
    if not cfg.metrics_file:
        return
    directory = os.path.dirname(cfg.metrics_file) or "/"
    if not os.path.isdir(directory):
        found.warnings.append(f"[hsd] metrics_file = {cfg.metrics_file}: the directory {directory} does not exist; "
                              "hsd serves handshakes but writes no metrics until it does")
    if not cfg.metrics_file.endswith(".prom"):
        found.warnings.append(f"[hsd] metrics_file = {cfg.metrics_file}: node_exporter's textfile collector reads "
                              "only files whose names end in .prom")


# ---------------------------------------------------------------- backends and plugins

def _backends(cfg: Config, host: PluginHost, found: Findings, backend_option: bool) -> None:
    installed = sorted(host.backends())
    known = sorted({*host.infos, *host.disabled, *(problem.name for problem in host.problems)})
    for key, names in (("enable_plugins", cfg.enable_plugins), ("disable_plugins", cfg.disable_plugins)):
        for name in names:
            if name not in known:
                found.warnings.append(f"[hsd] {key} names {name!r}, which is not installed{nearest(name, known)} "
                                      f"(installed: {', '.join(known) or 'none'})")
    default_key = "--backend" if backend_option else "[hsd] backend"
    names = {cfg.backend: default_key}
    for mode in MODES:
        if mode in cfg.backends:
            names.setdefault(cfg.backends[mode], f"[hsd.backends] {mode}")
    for name, key in names.items():
        if name in host.backends():
            continue
        modes = [str(status.mode) for status in host.mode_statuses() if status.backend == name]
        if not modes:
            continue
        hint = nearest(name, installed) if name not in host.disabled else ""
        found.errors.append(f"{key} = {name}: {host.why_unavailable(name)}{hint} (selected for {', '.join(modes)})")
    if found.errors:
        return
    statuses = host.mode_statuses()
    for status in statuses:
        mode = str(status.mode).replace("/", ".")  # Mode prints "client/psk"; [hsd.backends] keys read client.psk
        if status.problem is None:
            continue
        if mode in cfg.backends:  # configured explicitly: the operator wants this mode served
            found.errors.append(f"[hsd.backends] {mode} = {status.backend}: {status.problem} "
                                "(hsd plugins shows which backends and plugins serve each mode)")
        else:
            found.warnings.append(f"{mode} requests will fail with EOPNOTSUPP: {status.problem}")
    if all(status.problem for status in statuses):
        found.errors.append("no mode has a backend that can serve it (hsd plugins shows why)")


def _token_backends(cfg: Config, found: Findings) -> None:
    """A key in a token works through OpenSSL alone: a mode it serves on another backend is refused."""
    for role in ("client", "server"):
        rc = cfg.role(role)
        uris = [(_key_name(role, attr), getattr(rc, attr)) for attr in ("private_key", "certificate")]
        if role == "server":
            uris += [(expiry.sni_key(pair), pair.private_key) for pair in cfg.sni]
        backend = cfg.backend_for(role, "x509")
        uri = next(((key, value) for key, value in uris if pkcs11.is_uri(value)), None)
        if uri and backend != "openssl":
            found.errors.append(f"{uri[0]} = {pkcs11.redact(uri[1])}: the {backend} backend (selected for "
                                f"{role}/x509) cannot use a key or certificate in a token, only the openssl "
                                f"backend can: set [hsd.backends] {role}.x509 = openssl")


# ---------------------------------------------------------------- credential files

_WHAT = {"truststore": "trust store", "crl": "CRL", "certificate": "certificate", "private_key": "private key",
         "pq_certificate": "certificate", "pq_private_key": "private key"}


_key_name = expiry.key_name


def _read(cfg: Config, role: str, attr: str, found: Findings) -> bytes | bytearray | None:
    """The file's bytes (a private key's in a bytearray the caller wipes), or None with an error recorded."""
    return _read_file(cfg, _key_name(role, attr), getattr(cfg.role(role), attr), _WHAT[attr], found)


def _read_file(cfg: Config, key: str, path: str, what: str, found: Findings) -> bytes | bytearray | None:
    """_read for any configured file: key names it in messages, what says what it is ("private key": secret)."""
    secret = what == "private key"
    if path.startswith("pkcs11:"):  # only x509.certificate / x509.private_key (and SNI pairs) reach a token
        found.errors.append(f"{key} = {pkcs11.redact(path)}: only x509.certificate and x509.private_key may name "
                            "a token object; this key takes a PEM or DER file")
        return None
    if path.startswith("tpmkey:"):  # tlshd 1.x takes these URLs for private keys; hsd does not
        found.errors.append(f"{key} = {path}: hsd reads keys from PEM or DER files or pkcs11: URIs, not from "
                            "tpmkey: URLs; export the key to a file (mode 0600)")
        return None
    try:
        warning = filetrust.enforce(path, what, cfg.strict_permissions, refuse=_Refused, secret=secret)
    except _Refused as exc:
        found.errors.append(f"{key}: {exc}")
        return None
    if warning:
        found.warnings.append(warning)
    try:
        if secret:
            return credentials._read_secret_file(path)
        with open(path, "rb") as handle:
            return handle.read()
    except IsADirectoryError:
        found.errors.append(f"{key} = {path}: is a directory, not a file")
    except OSError as exc:
        fix = " (run hsd check as the user hsd runs as, root)" if exc.errno == 13 and os.geteuid() else ""
        found.errors.append(f"{key} = {path}: cannot read it: {exc.strerror}{fix}")
    return None


def _parse(parse, data: bytes | bytearray | None, cfg: Config, role: str, attr: str, found: Findings):
    """parse(data, path), the buffer wiped afterwards; None with an error recorded when it is no such file."""
    return _parse_file(parse, data, _key_name(role, attr), getattr(cfg.role(role), attr), found)


def _parse_file(parse, data: bytes | bytearray | None, key: str, path: str, found: Findings):
    """_parse for any configured file, named key in messages."""
    if data is None:
        return None
    try:
        return parse(data, path)
    except CredentialError as exc:
        found.errors.append(f"{key}: {exc}")
        return None
    finally:
        wipe(data)


def _role_files(cfg: Config, role: str, found: Findings, now: datetime.datetime) -> None:
    rc: RoleConfig = cfg.role(role)
    trust = _parse(credentials.parse_certificates, _read(cfg, role, "truststore", found), cfg, role,
                   "truststore", found) if rc.truststore else None
    crls = _parse(credentials.parse_crls, _read(cfg, role, "crl", found), cfg, role, "crl", found) if rc.crl else None
    if rc.truststore and trust is not None:
        found.notes.append(f"{_key_name(role, 'truststore')}: {len(trust)} CA certificate(s)")
        for cert in trust:
            problem = _validity(cert, now)
            if problem:
                found.warnings.append(f"{_key_name(role, 'truststore')} = {rc.truststore}: CA "
                                      f"{cert.subject.rfc4514_string()} {problem}")
        found.expiring += expiry.trust_store(trust, _key_name(role, "truststore"), rc.truststore, now,
                                           cfg.expiry_warning_days)
    if role == "client" and rc.truststore is None and cfg.verify_server:
        try:
            with warnings.catch_warnings():  # the system bundle's own quirks (a CA with a zero serial) are no finding
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                anchors = x509verify.system_trust_anchors()
            found.notes.append(f"{_key_name(role, 'truststore')}: the system trust store, "
                               f"{len(anchors)} CA certificate(s)")
        except CredentialError:
            found.warnings.append(f"{_key_name(role, 'truststore')} is unset and this system has no CA bundle: "
                                  "client handshakes fail with EIO; set it (or install ca-certificates)")
    if crls is not None:
        _check_crls(cfg, role, crls, trust, found, now)
    _pair(cfg, role, "certificate", "private_key", found, now)
    _pair(cfg, role, "pq_certificate", "pq_private_key", found, now)


def _check_crls(cfg: Config, role: str, crls: list, trust: list | None, found: Findings,
                now: datetime.datetime) -> None:
    key = f"{_key_name(role, 'crl')} = {cfg.role(role).crl}"
    found.notes.append(f"{_key_name(role, 'crl')}: {len(crls)} CRL(s)")
    found.expiring += expiry.crls(crls, _key_name(role, "crl"), cfg.role(role).crl, now, cfg.expiry_warning_days)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        if now < crl.last_update_utc:
            found.warnings.append(f"{key}: the CRL of {issuer} is not valid before "
                                  f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC; peers it covers are refused until then")
        if trust is not None and not any(ca.subject == crl.issuer and _crl_signed_by(crl, ca) for ca in trust):
            found.warnings.append(f"{key}: the CRL of {issuer} is signed by no CA in x509.truststore; "
                                  "a peer chain through a CA without a CRL signed by it is refused")


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError):
        return False


def _validity(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    """Not valid yet (expired and expiring soon: hsd.expiry)."""
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d} (peers refuse it until then)"
    return None


def _pair(cfg: Config, role: str, cert_attr: str, key_attr: str, found: Findings, now: datetime.datetime) -> None:
    """A certificate and its key: both or neither, each readable and parsed, the key that of the leaf."""
    rc = cfg.role(role)
    cert_path, key_path = getattr(rc, cert_attr), getattr(rc, key_attr)
    if not cert_path and not key_path:
        return
    if not (cert_path and key_path):
        missing = key_attr if cert_path else cert_attr
        found.errors.append(f"{_key_name(role, cert_attr)} and {_key_name(role, key_attr).split('] ')[1]} must be "
                            f"configured together: set {_key_name(role, missing)} too")
    _check_pair(cfg, (_key_name(role, cert_attr), cert_path), (_key_name(role, key_attr), key_path), found, now,
                pq=cert_attr == "pq_certificate")


def _sni_pairs(cfg: Config, found: Findings, now: datetime.datetime) -> None:
    """Each [hsd.server.sni] pair, checked as [authenticate.server]'s is; messages name the file and line."""
    for pair in cfg.sni:
        key = expiry.sni_key(pair)
        _check_pair(cfg, (key, pair.certificate), (f"{key} (its private key)", pair.private_key), found, now)
        try:  # the file again (public, small): _check_pair has reported whatever is wrong with it
            with open(pair.certificate, "rb") as handle:
                leaf = credentials.parse_certificates(handle.read(), pair.certificate)[0]
        except (OSError, CredentialError):
            continue
        if not sni.certificate_names(leaf, pair.name):
            found.warnings.append(f"{key} = {pair.certificate}: the certificate does not name {pair.name} in its "
                                  "subjectAltName; clients that verify the server's name refuse it")


def _check_pair(cfg: Config, cert: tuple[str, str | None], key_file: tuple[str, str | None], found: Findings,
                now: datetime.datetime, *, pq: bool = False) -> None:
    """The certificate file and key file (config key, path) of one identity: each read, parsed and matched."""
    (name, cert_path), (key_name, key_path) = cert, key_file
    if not pq and (pkcs11.is_uri(cert_path) or pkcs11.is_uri(key_path)):
        chain, key = _token_pair(cfg, cert, key_file, found)
    else:
        chain = _parse_file(credentials.parse_certificates, _read_file(cfg, name, cert_path, "certificate", found),
                            name, cert_path, found) if cert_path else None
        key = _parse_file(credentials.parse_private_key, _read_file(cfg, key_name, key_path, "private key", found),
                          key_name, key_path, found) if key_path else None
    cert_path, key_path = pkcs11.redact(cert_path or ""), pkcs11.redact(key_path or "")  # no PIN in messages
    if chain:
        if len(chain) > credentials.MAX_CHAIN:
            found.errors.append(f"{name} = {cert_path}: {len(chain)} certificates, at most {credentials.MAX_CHAIN}")
        problem = _validity(chain[0], now)
        if problem:
            found.warnings.append(f"{name} = {cert_path}: the certificate {problem}")
        found.expiring += expiry.chain(chain, name, cert_path, now, cfg.expiry_warning_days)
        if pq and not isinstance(chain[0].public_key(), credentials.MLDSA_PUBLIC_KEYS):
            kind = type(chain[0].public_key()).__name__.removesuffix("PublicKey")
            support = "" if credentials.MLDSA_PUBLIC_KEYS else " (this cryptography has no ML-DSA at all)"
            found.errors.append(f"{name} = {cert_path}: must hold an ML-DSA certificate, its leaf key is "
                                f"{kind}{support}")
        else:
            found.notes.append(f"{name}: {chain[0].subject.rfc4514_string()}, {len(chain)} certificate(s), "
                               f"valid until {chain[0].not_valid_after_utc:%Y-%m-%d}")
    if chain and key is not None and not credentials.key_belongs_to(key, chain[0]):
        found.errors.append(f"{key_name} = {key_path} is not the private key of {name} = {cert_path} "
                            "(their public keys differ): configure the key the certificate was issued for")


def _token_pair(cfg: Config, cert: tuple[str, str | None], key_file: tuple[str, str | None],
                found: Findings) -> tuple[list | None, object | None]:
    """An identity with its key (or certificate) in a PKCS#11 token, opened as a handshake would open it;
    the other half, if a file, read as usual.  Where this OpenSSL cannot load pkcs11-provider, one line
    says so (not one per URI)."""
    why = pkcs11.unavailable()
    loaded: list = []
    for (name, path), what, parse, load in ((key_file, "private key", credentials.parse_private_key, pkcs11.load_key),
                                            (cert, "certificate", credentials.parse_certificates,
                                             pkcs11.load_certificates)):  # the key first: its line is the one
        if not path:
            loaded.append(None)
        elif not pkcs11.is_uri(path):
            loaded.append(_parse_file(parse, _read_file(cfg, name, path, what, found), name, path, found))
        elif why:
            if not any(why in error for error in found.errors):
                found.errors.append(f"{name} = {pkcs11.redact(path)}: {why}")
            loaded.append(None)
        else:
            try:
                loaded.append(load(path))
            except CredentialError as exc:
                found.errors.append(f"{name}: {exc}")
                loaded.append(None)
    key, chain = loaded
    if key is not None and pkcs11.is_uri(key_file[1]):
        found.notes.append(f"{key_file[0]}: a key in a token ({pkcs11.redact(key_file[1] or '')}), "
                           "used through pkcs11-provider")
    return chain, key
