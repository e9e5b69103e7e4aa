"""Running the dispatcher as a service: logging, signals, readiness, reload.

SIGTERM/SIGINT stop accepting; in-flight handshakes finish (or fail at their
deadline), each with its DONE.  SIGHUP/SIGUSR1 re-read the config for new
requests only.  READY=1 goes to systemd once the multicast group is joined.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
from typing import Callable

from . import config as config_mod
from . import privileges
from .channel import Channel
from .credentials import check_private_key_file
from .errors import CredentialError
from .dispatcher import Dispatcher
from .plugins import PluginHost

log = logging.getLogger("hsd")


def setup_logging(to_stderr: bool, level: int, syslog: bool = True) -> None:
    """syslog (LOG_AUTH, with pid) like tlshd, plus stderr with -s."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Debug applies to hsd and its plugins only; libraries (pyroute2, asyncio, stevedore) stay quiet.
    root.setLevel(max(level, logging.INFO))
    for ours in ("hsd", "hsd_openssl", "hsd_tlslite", "hsd_psk"):
        logging.getLogger(ours).setLevel(level)
    if to_stderr or not syslog or not os.path.exists("/dev/log"):
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("%(asctime)s hsd[%(process)d]: %(message)s", "%H:%M:%S"))
        root.addHandler(err)
    if syslog and os.path.exists("/dev/log"):
        try:
            sys_handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_AUTH)
            sys_handler.setFormatter(logging.Formatter(f"hsd[{os.getpid()}]: %(message)s"))
            root.addHandler(sys_handler)
        except OSError:
            pass
    for noisy in ("pyroute2", "stevedore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def _ensure_process_keyring() -> None:
    """Create the process keyring before any worker thread exists.

    The kernel links each request's keyring into the agent's process keyring; a
    thread started before that keyring existed does not see it, so create it first.
    """
    from . import keyring

    try:
        keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=True)
    except OSError as exc:
        log.debug("no process keyring: %s", exc)


def serve(channel: Channel, config: config_mod.Config, *, backend: str | None,
          config_path: str | None, max_inflight: int | None = None, host: PluginHost | None = None,
          stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None,
          drop_capabilities: bool = True) -> int:
    """Run until a stop signal; returns the process exit code.

    The channel is already connected and joined; as root, every capability but
    CAP_NET_ADMIN is dropped here, before any handshake thread exists."""
    stop = stop or threading.Event()
    _ensure_process_keyring()
    host = host or PluginHost.discover(config)
    dispatcher = Dispatcher(channel, host, config, backend=backend, max_inflight=max_inflight)

    def on_stop(signum: int, _frame: object) -> None:
        log.info("received %s: finishing in-flight handshakes and stopping", signal.Signals(signum).name)
        stop.set()

    def on_reload(_signum: int, _frame: object) -> None:
        try:
            fresh = config_mod.load(config_path)
        except config_mod.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        for warning in fresh.warnings:
            log.warning("%s", warning)
        dispatcher.config = fresh  # new requests only; in-flight handshakes keep their context
        host.config = fresh
        log.info("configuration reloaded from %s", fresh.source or "built-in defaults")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
        signal.signal(signal.SIGUSR1, on_reload)

    def ready() -> None:
        log.info("hsd ready: listening for handshake requests (backend %s, up to %d in flight)",
                 backend or config.backend, dispatcher.max_inflight)
        notify_systemd("READY=1")
        if on_ready:
            on_ready()

    roles = (config.client, config.server)
    key_files = [path for rc in roles for path in (rc.private_key, rc.pq_private_key) if path]
    for key_file in key_files:  # warn (or refuse, when strict) at start-up
        try:
            check_private_key_file(key_file, config.strict_permissions)
        except CredentialError as exc:
            log.error("%s", exc)
            channel.close()
            return 1
    if drop_capabilities:
        try:
            privileges.drop_privileges()
        except privileges.PrivilegeError as exc:
            log.error("cannot drop capabilities, refusing to run with all of them: %s", exc.strerror)
            channel.close()
            return 1
    try:
        dispatcher.run(stop, ready=ready)
    except ConnectionError as exc:
        # Decision (docs/reliability.md): no in-process reconnect.  Exit non-zero so the service
        # manager restarts hsd; the new instance drains the kernel's queue at start-up.
        log.error("lost the handshake channel (%s): in-flight handshakes finished; exiting", exc)
        return 1
    finally:
        notify_systemd("STOPPING=1")
        channel.close()
    return 0
