"""The configuration file: tlshd.conf(5) keys, plus hsd's own sections.

The format is the GLib key file the reference daemon reads (``[section]``,
``key=value``, ``#`` comments, lists separated by ``;``), so an existing
/etc/tlshd.conf works unchanged.  hsd-only settings live in ``[hsd...]``
sections, which tlshd ignores.  An unknown key in tlshd's own sections warns
with file and line (files written for a newer tlshd still load); an unknown
section or key under ``[hsd*]`` and every invalid value raise ConfigError with
file, line and the nearest valid name: a typo there would silently switch a
control off.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from . import filetrust

DEFAULT_PATHS = ("/etc/tlshd/config", "/etc/tlshd.conf")
MODES = ("client.unauth", "client.x509", "client.psk", "server.x509", "server.psk")
_ROLE_KEYS = {
    "x509.truststore": "truststore", "x509.crl": "crl", "x509.certificate": "certificate",
    "x509.private_key": "private_key", "x509.pq.certificate": "pq_certificate",
    "x509.pq.private_key": "pq_private_key",
}
# Every key of every section hsd reads: tlshd's sections (unknown keys there warn) and hsd's (unknown: error).
TLSHD_SECTIONS: dict[str, tuple[str, ...]] = {
    "debug": ("loglevel", "tls", "nl"),
    "authenticate": ("keyrings",),
    "authenticate.client": tuple(_ROLE_KEYS),
    "authenticate.server": tuple(_ROLE_KEYS),
}
HSD_SECTIONS: dict[str, tuple[str, ...]] = {
    "hsd": ("backend", "max_inflight", "handshake_timeout", "workers", "isolation", "strict_permissions",
            "enable_plugins", "disable_plugins", "expiry_warning_days", "control_socket", "metrics_file",
            "metrics_interval"),
    "hsd.backends": MODES,
    "hsd.client": ("verify_server",),
    "hsd.server": ("require_client_certificate", "allowed_client_sans"),
    "hsd.psk": ("modes",),
    "hsd.server.sni": (),  # keys are server names (hsd.sni), each = certificate;private_key
}


def is_hsd_section(name: str) -> bool:
    """hsd's namespace: every section whose name starts with "hsd" (tlshd ignores them all)."""
    return name.lower().startswith("hsd")


def nearest(word: str, candidates: "tuple[str, ...] | list[str]") -> str:
    """' (did you mean X?)' for the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class ConfigError(Exception):
    """A configuration that must stop start-up; the message names file and line."""


@dataclass
class RoleConfig:
    truststore: str | None = None  # None: the system trust store
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    pq_certificate: str | None = None
    pq_private_key: str | None = None


@dataclass(frozen=True)
class SniPair:
    """One [hsd.server.sni] line: the server name (normalised; "*.example.org" for one label) and its pair."""

    name: str
    certificate: str
    private_key: str
    where: str  # "file:line" of the line, for `hsd check` and start-up errors

    @property
    def key(self) -> str:
        """The config key as messages name it: "[hsd.server.sni] nfs1.example.org"."""
        return f"[hsd.server.sni] {self.name}"


@dataclass
class Config:
    source: str | None = None
    loglevel: int = 0
    tls_debug: int = 0
    nl_debug: int = 0
    keyrings: list[str] = field(default_factory=list)
    client: RoleConfig = field(default_factory=RoleConfig)
    server: RoleConfig = field(default_factory=RoleConfig)
    # hsd-only
    backend: str = "openssl"
    backends: dict[str, str] = field(default_factory=dict)  # "client.psk" -> backend name
    max_inflight: int = 64
    workers: int = 1  # daemon processes serving the queue (the kernel gives each request to one)
    isolation: str = "none"  # "process": each handshake runs in a child process (crash isolation)
    handshake_timeout_ms: int = 10000  # when ACCEPT carries no timeout
    require_client_certificate: bool = False
    strict_permissions: bool = False  # refuse private key files readable by group/others (else warn)
    expiry_warning_days: int = 14  # warn this many days before a certificate or CRL expires (0: only once expired)
    control_socket: str | None = None  # `hsd status`'s socket; None: /run/hsd/control serving the kernel; "": off
    metrics_file: str | None = None  # OpenMetrics text file for node_exporter's textfile collector; None: off
    metrics_interval: int = 15  # seconds between two rewrites of metrics_file
    allowed_client_sans: list[str] = field(default_factory=list)
    verify_server: bool = True
    sni: list[SniPair] = field(default_factory=list)  # server role: pairs chosen by the ClientHello's server_name
    psk_modes: list[str] = field(default_factory=lambda: ["psk_dhe_ke"])
    enable_plugins: list[str] = field(default_factory=list)  # empty: all
    disable_plugins: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def role(self, role: str) -> RoleConfig:
        return self.server if role == "server" else self.client

    def backend_for(self, role: str, auth: str) -> str:
        return self.backends.get(f"{role}.{auth}", self.backend)


def _int(value: str, where: str, lo: int = 0, hi: int = 1 << 31) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"{where}: '{value}' is not an integer") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{where}: {n} is outside {lo}..{hi}")
    return n


def _bool(value: str, where: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{where}: '{value}' is not a boolean (true/false)")


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.replace(",", ";").split(";") if item.strip()]


def _allowed_sans(value: str, where: str) -> list[str]:
    """The entries as written, each checked by the rule the handshake applies (typed: dns:, ip:, email:, uri:)."""
    # imported here: x509verify needs credentials, which needs this module
    from .x509verify import parse_allowed_san

    entries = _list(value)
    for entry in entries:
        try:
            parse_allowed_san(entry)
        except ValueError as exc:
            raise ConfigError(f"{where}: allowed_client_sans entry {entry!r}: {exc}") from None
    return entries


def _sni_pair(seen: list[SniPair], key: str, value: str, where: str) -> SniPair:
    """name = certificate;private_key, the name by hsd's one DNS-name rule and not already listed."""
    from .sni import normalize_sni_name  # imported here: sni needs x509verify, which needs credentials

    try:
        name = normalize_sni_name(key)
    except ValueError as exc:
        raise ConfigError(f"{where}: [hsd.server.sni] {key!r} is not a server name: {exc}") from None
    paths = [part.strip() for part in value.split(";")]
    if paths and not paths[-1]:
        paths.pop()  # GLib lists may end with ';'
    if len(paths) != 2 or not all(paths):
        raise ConfigError(f"{where}: [hsd.server.sni] {key} must be 'certificate;private_key' (two paths), "
                          f"got {value!r}")
    for other in seen:
        if other.name == name:
            raise ConfigError(f"{where}: [hsd.server.sni] {name} is already configured at {other.where}")
    return SniPair(name, paths[0], paths[1], where)


def _path(value: str, where: str) -> str:
    if not value:
        raise ConfigError(f"{where}: empty path")
    return value


def parse(text: str, source: str = "<config>") -> Config:
    """Parse config text; never raises anything but ConfigError."""
    cfg = Config(source=source)
    section: str | None = None
    # GLib splits key files on \n only; str.splitlines() would also split on
    # \f, \x1c, U+0085, U+2028 ... and misnumber every later line.
    for lineno, raw in enumerate(text.split("\n"), 1):
        where = f"{source}:{lineno}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"{where}: malformed section header {line!r}")
            section = line[1:-1].strip()
            if is_hsd_section(section) and section not in HSD_SECTIONS:
                raise ConfigError(f"{where}: unknown section [{section}]{_nearest_section(section)}; "
                                  f"hsd's sections are {', '.join(f'[{s}]' for s in HSD_SECTIONS)}")
            if not is_hsd_section(section) and section not in TLSHD_SECTIONS:
                cfg.warnings.append(f"{where}: unknown section [{section}] ignored (neither tlshd's nor hsd's)")
            continue
        if "=" not in line:
            raise ConfigError(f"{where}: expected key=value, got {line!r}")
        if section is None:
            raise ConfigError(f"{where}: key outside any [section]")
        key, value = (part.strip() for part in line.split("=", 1))
        if _apply(cfg, section, key, value, where):
            continue
        if section in HSD_SECTIONS:
            raise ConfigError(f"{where}: unknown key '{key}' in [{section}]{nearest(key, HSD_SECTIONS[section])}; "
                              f"valid keys: {', '.join(HSD_SECTIONS[section])}")
        if section in TLSHD_SECTIONS:
            cfg.warnings.append(f"{where}: unknown key '{key}' in [{section}] ignored"
                                f"{nearest(key, TLSHD_SECTIONS[section])}")
    return cfg


def _nearest_section(section: str) -> str:
    close = difflib.get_close_matches(section, list(HSD_SECTIONS), n=1, cutoff=0.6)
    return f" (did you mean [{close[0]}]?)" if close else ""


def _apply(cfg: Config, section: str, key: str, value: str, where: str) -> bool:
    if section == "debug":
        if key == "loglevel":
            cfg.loglevel = _int(value, where, 0, 10)
        elif key == "tls":
            cfg.tls_debug = _int(value, where, 0, 10)
        elif key == "nl":
            cfg.nl_debug = _int(value, where, 0, 10)
        else:
            return False
        return True
    if section == "authenticate":
        if key == "keyrings":
            cfg.keyrings = _list(value)
            return True
        return False
    if section in ("authenticate.client", "authenticate.server"):
        attr = _ROLE_KEYS.get(key)
        if attr is None:
            return False
        setattr(cfg.role(section.split(".")[1]), attr, _path(value, where))
        return True
    if section == "hsd":
        if key == "backend":
            cfg.backend = value
        elif key == "max_inflight":
            cfg.max_inflight = _int(value, where, 1, 100000)
        elif key == "workers":
            cfg.workers = _int(value, where, 1, 256)
        elif key == "isolation":
            if value not in ("none", "process"):
                raise ConfigError(f"{where}: isolation must be 'none' or 'process', got {value!r}")
            cfg.isolation = value
        elif key == "handshake_timeout":
            cfg.handshake_timeout_ms = _int(value, where, 1, 3600_000)
        elif key == "enable_plugins":
            cfg.enable_plugins = _list(value)
        elif key == "disable_plugins":
            cfg.disable_plugins = _list(value)
        elif key == "strict_permissions":
            cfg.strict_permissions = _bool(value, where)
        elif key == "expiry_warning_days":
            cfg.expiry_warning_days = _int(value, where, 0, 3650)
        elif key == "control_socket":
            if value != "none" and not value.startswith("/"):
                raise ConfigError(f"{where}: control_socket must be an absolute path or 'none', got {value!r}")
            cfg.control_socket = "" if value == "none" else value
        elif key == "metrics_file":
            if value != "none" and not value.startswith("/"):
                raise ConfigError(f"{where}: metrics_file must be an absolute path or 'none', got {value!r}")
            cfg.metrics_file = None if value == "none" else value
        elif key == "metrics_interval":
            cfg.metrics_interval = _int(value, where, 1, 86400)
        else:
            return False
        return True
    if section == "hsd.backends":
        if key not in MODES:
            raise ConfigError(f"{where}: '{key}' is not a mode{nearest(key, MODES)} in [hsd.backends] "
                              f"(one of {', '.join(MODES)})")
        cfg.backends[key] = value
        return True
    if section == "hsd.client":
        if key == "verify_server":
            cfg.verify_server = _bool(value, where)
            return True
        return False
    if section == "hsd.server":
        if key == "require_client_certificate":
            cfg.require_client_certificate = _bool(value, where)
        elif key == "allowed_client_sans":
            cfg.allowed_client_sans = _allowed_sans(value, where)
        else:
            return False
        return True
    if section == "hsd.server.sni":
        cfg.sni.append(_sni_pair(cfg.sni, key, value, where))
        return True
    if section == "hsd.psk":
        if key == "modes":
            modes = _list(value)
            bad = [m for m in modes if m not in ("psk_dhe_ke", "psk_ke")]
            if bad or not modes:
                raise ConfigError(f"{where}: psk modes must be psk_dhe_ke and/or psk_ke, got {value!r}")
            cfg.psk_modes = modes
            return True
        return False
    return False


def load(path: str | None) -> Config:
    """Read the given file, or the first default that exists, or built-in defaults."""
    candidates = [path] if path else [p for p in DEFAULT_PATHS if os.path.exists(p)][:1]
    if not candidates:
        return Config()
    chosen = candidates[0]
    try:
        with open(chosen, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{chosen}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{chosen}: not a UTF-8 text file") from None
    cfg = parse(text, chosen)
    warning = filetrust.enforce(chosen, "config", cfg.strict_permissions, refuse=ConfigError)
    if warning:  # once per file and problem (not again at every reload)
        cfg.warnings.append(warning)
    return cfg
