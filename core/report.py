"""Human-readable reports: the effective configuration and the installed plugins."""

from __future__ import annotations

import sys
from dataclasses import fields

from . import pkcs11
from .check import inspect
from .config import Config, RoleConfig
from .plugins import PluginHost

EXIT_USAGE = 2  # hsd(8): a configuration the daemon refuses


def print_config(cfg: Config, *, strict: bool = False, backend_option: bool = False) -> int:
    """`hsd check`: every setting hsd will use, after defaults, then what hsd.check.inspect found.

    Exit 2 when the daemon would refuse to start (the same inspect() decides at its
    start), or with strict=True when there is a warning; 0 otherwise.  Warnings go
    to stderr once; secrets are never printed."""
    host = PluginHost.discover(cfg)
    found = inspect(cfg, host, backend_option=backend_option)
    print(f"config file: {cfg.source or '(none found: built-in defaults)'}")
    print(f"[debug] loglevel={cfg.loglevel} tls={cfg.tls_debug} nl={cfg.nl_debug}")
    print(f"[authenticate] keyrings={';'.join(cfg.keyrings) or '(none)'} (always: .nvme;.nfs;.nfsd)")
    for role in ("client", "server"):
        rc: RoleConfig = cfg.role(role)
        for f in fields(rc):
            value = getattr(rc, f.name)
            if f.name == "truststore" and value is None:
                value = "(system trust store)"
            elif value is not None:
                value = pkcs11.redact(value)  # a pkcs11: URI's pin-value is a secret
            print(f"[authenticate.{role}] x509.{f.name.replace('pq_', 'pq.')}={value if value is not None else '(unset)'}")
    print(f"[hsd] backend={cfg.backend}{' (--backend)' if backend_option else ''} max_inflight={cfg.max_inflight} "
          f"handshake_timeout={cfg.handshake_timeout_ms}ms workers={cfg.workers} isolation={cfg.isolation}")
    print(f"[hsd] strict_permissions={str(cfg.strict_permissions).lower()} "
          f"expiry_warning_days={cfg.expiry_warning_days} "
          f"control_socket={(cfg.control_socket or 'none') if cfg.control_socket is not None else '/run/hsd/control'} "
          f"metrics_file={cfg.metrics_file or 'none'} metrics_interval={cfg.metrics_interval}s "
          f"enable_plugins={';'.join(cfg.enable_plugins) or '(all installed)'} "
          f"disable_plugins={';'.join(cfg.disable_plugins) or '(none)'}")
    for mode, backend in sorted(cfg.backends.items()):
        print(f"[hsd.backends] {mode}={backend}")
    print(f"[hsd.client] verify_server={str(cfg.verify_server).lower()}")
    print(f"[hsd.server] require_client_certificate={str(cfg.require_client_certificate).lower()} "
          f"allowed_client_sans={';'.join(cfg.allowed_client_sans) or '(any)'}")
    print(f"[hsd.psk] modes={';'.join(cfg.psk_modes)}")
    for pair in cfg.sni:
        print(f"[hsd.server.sni] {pair.name}={pkcs11.redact(pair.certificate)};{pkcs11.redact(pair.private_key)}")
    print_mode_statuses(host)
    for note in found.notes:
        print(f"[loaded] {note}")
    for warning in found.warnings:
        print(f"hsd: warning: {warning}", file=sys.stderr)
    for item in found.expiring:  # the daemon logs the same lines at start, reload and daily
        print(f"hsd: {'error' if item.error else 'warning'}: {item.line()}", file=sys.stderr)
    for error in found.errors:
        print(f"error: {error}")
    if found.errors:
        print("configuration FAILED: hsd would not start")
        return EXIT_USAGE
    warned = len(found.warnings) + len(found.expiring)
    if strict and warned:
        print(f"configuration FAILED (--strict): {warned} warning(s)")
        return EXIT_USAGE
    expired = sum(item.error for item in found.expiring)
    if expired:
        print(f"configuration OK, but {expired} certificate(s) or CRL(s) have expired: hsd starts, and the "
              "handshakes that need them fail")
        return 0
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

    Fails (2, a configuration error) when no mode has a backend that serves it: a listing of nothing usable."""
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
        return EXIT_USAGE
    return 0
