"""`hsd`: the daemon's command line (tlshd's flags plus hsd's own, and a few subcommands).

    hsd [-c FILE] [-s] [--backend NAME]           serve the kernel (like tlshd)
    hsd --simulator SOCKET ...                    serve a kernel simulator instead
    hsd check [-c FILE] [--strict]                load and cross-check the config, print effective settings
    hsd plugins [-c FILE]                         installed plugins, their modes, who wins
    hsd status [-c FILE] [--json]                 the running daemon: counters, latency, config, expiry
    hsd demo                                      watch hsd serve simulated requests against real peers
    hsd bench [--quick]                           handshakes/s and latency: hsd vs bare library vs C
    hsd bench startup [--runs N]                  start to join, first handshake and ready (median)

Expected failures print one line each and exit non-zero; no tracebacks.  Exit
statuses (hsd(8), EXIT STATUS): 0 success; 1 the kernel or the system cannot
serve hsd (no handshake family, no CAP_NET_ADMIN, no simulator socket, a demo
scenario failed); 2 bad usage or configuration - whatever `hsd check` reports
as an error, which the daemon refuses at start in the same words.
"""

from __future__ import annotations

import argparse
import sys

from typing import TYPE_CHECKING, Any

from . import __version__

# Serving imports nothing more before it has joined the tlshd group (hsd.startup says why):
# the configuration, logging and everything else are imported where they are used.
if TYPE_CHECKING:
    from . import config as config_mod
    from .plugins import PluginHost
    from .signals import SignalRelay
    from .startup import EarlyJoin

EXIT_OK = 0
EXIT_FAILURE = 1  # the kernel or the system cannot serve: nothing in the configuration to fix
EXIT_USAGE = 2  # bad usage or configuration (argparse uses 2 too)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsd", description="TLS handshake daemon for the Linux kernel (a drop-in replacement for tlshd).")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file (default: /etc/tlshd/config, then /etc/tlshd.conf)")
    parser.add_argument("-s", "--stderr", action="store_true", help="log to stderr as well as syslog")
    parser.add_argument("-v", "--version", action="version", version=f"hsd {__version__}")
    parser.add_argument("--backend", metavar="NAME", help="default TLS backend (openssl, tlslite, ...)")
    parser.add_argument("--max-inflight", type=int, metavar="N", help="handshakes in flight at most")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="daemon processes serving the queue (default: [hsd] workers, 1)")
    parser.add_argument("--simulator", metavar="SOCKET", help="serve the kernel simulator at SOCKET (hsd-sim)")
    parser.add_argument("--control-socket", metavar="PATH",
                        help="the control socket `hsd status` reads, or 'none' (overrides [hsd] control_socket; "
                             "hsd@.service gives each network namespace its own)")
    parser.add_argument("--debug", action="store_true", help="debug logging (like [debug] loglevel=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="load and cross-check the config, print the effective settings")
    check.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="config file to check (same as hsd -c FILE check)")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    plugins = sub.add_parser("plugins", help="list installed plugins, the modes they serve and which one wins")
    plugins.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                         help="config file whose plugin settings apply (same as hsd -c FILE plugins)")
    status = sub.add_parser("status", help="what the running daemon has done: counters, latency, config, expiry")
    status.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="config file naming [hsd] control_socket (same as hsd -c FILE status)")
    status.add_argument("--socket", metavar="PATH", help="the control socket (default: [hsd] control_socket, "
                        "else /run/hsd/control)")
    status.add_argument("--json", action="store_true", help="the raw document")
    demo = sub.add_parser("demo", help="serve simulated kernel requests against real openssl/gnutls peers")
    demo.add_argument("--rounds", type=int, default=1, help="how many times to run the scenario list")
    # listed for --help only: `hsd bench ...` is routed in main() so the daemon never imports the benchmark
    sub.add_parser("bench", help="measure hsd against the bare TLS library and openssl s_time (hsd bench -h)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "startup"]:
        return _kit("startbench").main(argv[2:])
    if argv[:1] == ["bench"]:
        return _kit("bench").main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        return _serve(args, argv)  # joins the group first, then reads the configuration
    cfg = configure(args)
    if isinstance(cfg, int):
        return cfg
    import logging

    if args.command in ("check", "plugins"):
        # their report prints every plugin problem itself: no second copy from the log on stderr
        logging.getLogger("hsd").addHandler(logging.NullHandler())
    if args.command == "check":
        from .report import print_config

        return print_config(cfg, strict=args.strict, backend_option=bool(args.backend))
    if args.command == "plugins":
        from .report import print_plugins

        _print_warnings(cfg.warnings)
        return print_plugins(cfg)
    if args.command == "status":
        return print_status(cfg, args)
    if args.command == "demo":
        demo = _kit("demo")
        _print_warnings(cfg.warnings)
        return demo.run_demo(cfg, rounds=args.rounds)
    raise AssertionError(f"unhandled command {args.command!r}")


def _kit(module: str) -> Any:
    """A module of hsd_kit (the test kit, benchmark and demo), imported only for the command that needs it.

    The daemon never imports the kit; a packager may ship it apart, so its absence is one clear line."""
    from importlib import import_module

    try:
        return import_module(f"hsd_kit.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("hsd_kit", f"hsd_kit.{module}"):
            raise
        print(f"hsd: this command needs hsd's kit (the Python package hsd_kit), which is not installed",
              file=sys.stderr)
        raise SystemExit(2) from None


def configure(args: argparse.Namespace) -> "config_mod.Config | int":
    """The configuration with the command line's overrides (the effective settings), or exit 2 in one line."""
    from . import config as config_mod

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"hsd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.backend:
        cfg.backend = args.backend
    if args.max_inflight is not None:  # the effective settings, as `hsd check` prints them
        cfg.max_inflight = args.max_inflight
    if args.control_socket is not None:
        if args.control_socket != "none" and not args.control_socket.startswith("/"):
            print(f"hsd: --control-socket must be an absolute path or 'none', got {args.control_socket!r}",
                  file=sys.stderr)
            return EXIT_USAGE
        cfg.control_socket = "" if args.control_socket == "none" else args.control_socket
    if args.workers is not None:
        if args.workers < 1:
            print("hsd: --workers must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        cfg.workers = args.workers
    return cfg


def control_path(cfg: "config_mod.Config", *, serving_simulator: bool = False) -> str | None:
    """[hsd] control_socket; unset: the default path when serving the kernel, none for a simulator (tests)."""
    if cfg.control_socket is not None:
        return cfg.control_socket or None
    if serving_simulator:
        return None
    from .status import DEFAULT_SOCKET

    return DEFAULT_SOCKET


def print_status(cfg: "config_mod.Config", args: argparse.Namespace) -> int:
    """`hsd status`: what the running daemon reports on its control socket."""
    import json

    from .status import DEFAULT_SOCKET, query, render

    path = args.socket or control_path(cfg) or DEFAULT_SOCKET
    try:
        doc = query(path)
    except PermissionError:
        print(f"hsd: only root can read hsd's status ({path})", file=sys.stderr)
        return EXIT_FAILURE
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"hsd: hsd is not running here: nothing answers at {path}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        print(f"hsd: cannot read hsd's status at {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(doc, indent=2) if args.json else "\n".join(render(doc)))
    return EXIT_OK


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"hsd: warning: {warning}", file=sys.stderr)


def preflight(cfg: "config_mod.Config", host: "PluginHost", *, backend_option: bool) -> int:
    """The daemon's start: refuse (exit 2) exactly what `hsd check` reports as an error, in its words."""
    from .check import inspect

    found = inspect(cfg, host, backend_option=backend_option)
    _print_warnings(found.warnings)
    from .daemon import is_worker_child, log_expiry

    if not found.errors and not is_worker_child():  # a restarted worker: its parent reports them
        log_expiry(found.expiring)  # to the log (syslog, and stderr with -s): an operator's alert, not a usage note
    for error in found.errors:
        print(f"hsd: {error}", file=sys.stderr)
    return EXIT_USAGE if found.errors else EXIT_OK


def _join(args: argparse.Namespace) -> "EarlyJoin":
    """Join the tlshd group before anything heavy is imported (hsd.startup says why)."""
    from .startup import EarlyJoin

    return EarlyJoin.simulator_at(args.simulator) if args.simulator else EarlyJoin.kernel()


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .signals import SignalRelay
    from .startup import EarlyJoin, JoinError

    signals = SignalRelay()  # a stop or reload signal while loading is queued, not the default action
    signals.install()
    try:
        try:
            early = _join(args)
        except (JoinError, OSError) as exc:
            # still judge the configuration first: what `hsd check` refuses is exit 2 on any kernel
            early, failure = EarlyJoin(), exc
        else:
            failure = None
        # joined: from here on the kernel queues requests, and the dispatcher's first pass ACCEPTs them
        try:
            cfg = configure(args)
            if isinstance(cfg, int):
                return cfg
            return _load_and_serve(args, cfg, argv, early, signals, failure)
        finally:
            early.discard()
    finally:
        signals.close()


def _load_and_serve(args: argparse.Namespace, cfg: "config_mod.Config", argv: list[str], early: "EarlyJoin",
                    signals: "SignalRelay", failure: BaseException | None) -> int:
    """Everything after the join: logging, plugins, the start-up checks, then serving."""
    import logging
    import os

    from .channel import Channel
    from .daemon import serve_workers, setup_logging
    from .plugins import PluginHost

    workers = cfg.workers  # [hsd] workers, or --workers (checked in main)
    level = logging.DEBUG if (args.debug or cfg.loglevel > 0) else logging.INFO
    setup_logging(args.stderr, level, syslog=args.simulator is None)
    if early.joined:
        logging.getLogger("hsd").debug("joined the tlshd group (pid %d); loading plugins", os.getpid())
    host = PluginHost.discover(cfg)
    code = preflight(cfg, host, backend_option=bool(args.backend))
    if code:
        return code
    if isinstance(failure, OSError):
        return _channel_failure(args, failure)
    if failure is not None:
        print(f"hsd: {failure}", file=sys.stderr)
        return EXIT_FAILURE

    def open_channel() -> Channel:
        """Called in every worker process after the fork: each has its own socket to the kernel."""
        joined = early.take()  # the parent's: the membership held since start; None in a forked worker
        if joined is not None:
            return joined
        if args.simulator:
            from .sim_channel import SimChannel

            return SimChannel.connect(args.simulator)
        from .netlink_channel import NetlinkChannel

        return NetlinkChannel(early.family)

    try:
        return serve_workers(open_channel, cfg, workers=workers, respawn_argv=argv, backend=cfg.backend,
                             config_path=args.config, max_inflight=args.max_inflight, host=host, checked=True,
                             signals=signals, control_socket=control_path(cfg, serving_simulator=bool(args.simulator)))
    except OSError as exc:
        return _channel_failure(args, exc)
    except RuntimeError as exc:
        from .netlink_channel import KernelUnsupported

        if not isinstance(exc, KernelUnsupported):
            raise
        print(f"hsd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0


def _channel_failure(args: argparse.Namespace, exc: OSError) -> int:
    """One line for a channel that cannot be opened or served; exit 1."""
    if isinstance(exc, FileNotFoundError) and args.simulator:
        print(f"hsd: cannot connect to the simulator at {args.simulator}: {exc.strerror} "
              f"(start it first: hsd-sim --socket {args.simulator})", file=sys.stderr)
    elif isinstance(exc, FileNotFoundError):
        print(f"hsd: cannot serve the kernel's handshake family: {exc.strerror or exc}", file=sys.stderr)
    elif isinstance(exc, PermissionError):
        print("hsd: the kernel refused ACCEPT: hsd needs CAP_NET_ADMIN (run as root or grant the capability)",
              file=sys.stderr)
    else:
        where = f"the simulator at {args.simulator}" if args.simulator else "the kernel's handshake family"
        print(f"hsd: cannot serve {where}: {exc.strerror or exc}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
