"""Human-readable reports: the effective configuration and the installed plugins."""

from __future__ import annotations

from dataclasses import fields

from .config import Config, RoleConfig
from .plugins import PluginHost


def print_config(cfg: Config) -> int:
    """`hsd check`: what hsd will actually use, after defaults; secrets are never in here."""
    print(f"config file: {cfg.source or '(none found: built-in defaults)'}")
    print(f"[debug] loglevel={cfg.loglevel} tls={cfg.tls_debug} nl={cfg.nl_debug}")
    print(f"[authenticate] keyrings={';'.join(cfg.keyrings) or '(none)'} (always: .nvme;.nfs;.nfsd)")
    for role in ("client", "server"):
        rc: RoleConfig = cfg.role(role)
        for f in fields(rc):
            value = getattr(rc, f.name)
            if f.name == "truststore" and value is None:
                value = "(system trust store)"
            print(f"[authenticate.{role}] x509.{f.name.replace('pq_', 'pq.')}={value if value is not None else '(unset)'}")
    print(f"[hsd] backend={cfg.backend} max_inflight={cfg.max_inflight} handshake_timeout={cfg.handshake_timeout_ms}ms")
    for mode, backend in sorted(cfg.backends.items()):
        print(f"[hsd.backends] {mode}={backend}")
    print(f"[hsd.client] verify_server={str(cfg.verify_server).lower()}")
    print(f"[hsd.server] require_client_certificate={str(cfg.require_client_certificate).lower()} "
          f"allowed_client_sans={';'.join(cfg.allowed_client_sans) or '(any)'}")
    print(f"[hsd.psk] modes={';'.join(cfg.psk_modes)}")
    for warning in cfg.warnings:
        print(f"warning: {warning}")
    print("configuration OK")
    return 0


def print_plugins(cfg: Config) -> int:
    """`hsd plugins`: what is installed, what each serves, which one wins per mode."""
    host = PluginHost.discover(cfg)
    print("installed plugins:")
    for name, info in sorted(host.infos.items()):
        modes = ", ".join(sorted(str(m) for m in info.modes))
        print(f"  {name:10} {info.version:10} {info.kind:8} API {info.api_version}  modes: {modes}")
        if info.description:
            print(f"  {'':10} {info.description}")
    for name in host.disabled:
        print(f"  {name:10} (disabled by configuration)")
    for problem in host.problems:
        print(f"  {problem.name:10} SKIPPED: {problem.reason}")
    print(f"mode -> backend (default backend: {cfg.backend}):")
    for mode, winner in host.winners().items():
        print(f"  {str(mode):14} {winner}")
    return 0
