"""Human-readable reports: the effective configuration and the installed plugins."""

from __future__ import annotations

from dataclasses import fields

from .config import Config, RoleConfig
from .plugins import PluginHost


def print_config(cfg: Config) -> int:
    """`hsd check`: what hsd will actually use, after defaults; secrets are never in here.

    Fails (1) when hsd would refuse to start: a selected backend that cannot load,
    or no mode with a backend that serves it (PluginHost.start_problems)."""
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
    host = PluginHost.discover(cfg)
    print_mode_statuses(host)
    problems = host.start_problems()
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print("configuration FAILED: hsd would not start")
        return 1
    print("configuration OK")
    return 0


def print_mode_statuses(host: PluginHost) -> None:
    """Per mode: the selected backend, and why it cannot serve the mode when it cannot."""
    for status in host.mode_statuses():
        verdict = f"unavailable: {status.problem}" if status.problem else "ok"
        print(f"[mode] {str(status.mode):14} backend={status.backend} {verdict}")
    for problem in host.problems:
        print(f"[plugin] {problem.name} {problem.reason}")


def print_plugins(cfg: Config) -> int:
    """`hsd plugins`: what is installed, what each serves, which one wins per mode.

    Fails (1) when no mode has a backend that serves it: a listing of nothing usable."""
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
    if all(status.problem for status in host.mode_statuses()):
        print("no configured mode has a backend that can serve it")
        return 1
    return 0
