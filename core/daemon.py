"""Running the dispatcher as a service: logging, signals, readiness, reload, worker processes.

SIGTERM/SIGINT stop accepting; in-flight handshakes finish (or fail at their
deadline), each with its DONE.  SIGHUP/SIGUSR1 re-read the config for new
requests only.  READY=1 goes to systemd once the multicast group is joined.

With `[hsd] workers = N` (or --workers N) N processes serve the queue: one
Python process is GIL-bound, and the kernel hands each request to exactly one
ACCEPT caller (the others get EAGAIN), so processes share the work without any
coordination of ours.  The parent forks N-1 children while it is still single
threaded; each opens its own channel after the fork and runs its own
dispatcher.  The parent serves too, forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1 to
the children, restarts a child that dies while running, and exits after all
of them when stopping.  A restarted child is a fresh interpreter
(posix_spawn of `python -m hsd.cli` with the same arguments), because the
parent has handshake threads by then and forking a threaded process could
copy a lock some thread holds.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

from . import config as config_mod
from . import privileges
from .channel import Channel
from .dispatcher import Dispatcher
from .plugins import PluginHost
from .signals import SignalRelay

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
    # [debug] tls and nl trace at debug priority whatever loglevel says (as tlshd's library traces do);
    # their tracers exist only while those levels are above 0 (hsd.tlstrace, hsd.nltrace)
    logging.getLogger("hsd.trace").setLevel(logging.DEBUG)
    if to_stderr or not syslog or not os.path.exists("/dev/log"):
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("%(asctime)s hsd[%(process)d]: %(message)s", "%H:%M:%S"))
        root.addHandler(err)
    if syslog and os.path.exists("/dev/log"):
        try:
            sys_handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_AUTH)
            sys_handler.setFormatter(logging.Formatter("hsd[%(process)d]: %(message)s"))  # a worker's own pid
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


EXIT_CONFIG = 2  # hsd(8): a configuration hsd refuses (the same decision as `hsd check`)


EXPIRY_INTERVAL = 24 * 3600.0  # seconds between two expiry checks while running (hsd.expiry)


def refusals(config: config_mod.Config, host: PluginHost, *, report_expiry: bool = True) -> list[str]:
    """What stops start-up or a reload (hsd.check.inspect, as `hsd check` runs it); its warnings are logged once,
    and (report_expiry) the certificates and CRLs expired or expiring soon."""
    from .check import inspect

    found = inspect(config, host)
    for warning in found.warnings:
        log.warning("%s", warning)
    if report_expiry:
        log_expiry(found.expiring)
    return found.errors


def log_expiry(items: list) -> None:
    """Expired: an error line naming the file; expiring within the window: a warning (hsd.expiry.Expiry)."""
    for item in items:
        log.log(logging.ERROR if item.error else logging.WARNING, "%s", item.line())


def open_control(status, control_socket: str | None, get_config: Callable[[], config_mod.Config]):
    """The control socket `hsd status` reads (when configured); one that cannot be made is one warning line,
    not a reason to stop serving.  Returns the ControlServer or None."""
    from .status import ControlServer

    if not control_socket:
        return None
    try:
        return ControlServer(control_socket, lambda: status.snapshot(get_config()))
    except OSError as exc:
        log.warning("no control socket at %s (hsd status cannot read this instance): %s", control_socket,
                    exc.strerror or exc)
        return None


def watch_expiry(get_config: Callable[[], config_mod.Config], stop: threading.Event,
                 interval: float | None = None) -> threading.Thread:
    """The daily check while running: every interval, the configured certificates and CRLs judged again."""
    from . import expiry

    def run() -> None:
        while not stop.wait(EXPIRY_INTERVAL if interval is None else interval):
            try:
                log_expiry(expiry.scan(get_config()))
            except Exception:  # noqa: BLE001  a failed check must not end the daily checks
                log.exception("the daily certificate and CRL expiry check failed")

    thread = threading.Thread(target=run, name="hsd-expiry", daemon=True)
    thread.start()
    return thread


def serve(channel: Channel, config: config_mod.Config, *, backend: str | None,
          config_path: str | None, max_inflight: int | None = None, host: PluginHost | None = None,
          stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None,
          drop_capabilities: bool = True, on_signal: Callable[[int], None] | None = None,
          hardened: bool = False, signals: SignalRelay | None = None, checked: bool = False,
          expiry_checks: bool = True, control_socket: str | None = None) -> int:
    """Run until a stop signal; returns the process exit code.

    The channel is already connected and joined.  First, while this process has
    one thread: no core dumps and, as root, every capability but CAP_NET_ADMIN
    dropped (hardened=True: the caller - serve_workers - did that already;
    drop_capabilities=False, for serve() inside a test process: neither).
    on_signal(signum) is called for every stop/reload signal (worker processes
    forward them to their children); signals is the caller's installed
    SignalRelay (serve_workers keeps it past serve()), else serve() makes its own
    when it runs in the main thread.  checked=True: the caller (the command line)
    already refused what hsd.check.inspect reports; otherwise serve() does, exit 2.
    expiry_checks: this process reports expiring certificates and CRLs at reload and
    daily (the supervising parent does, worker processes do not: one line, not N);
    the same process sends sd_notify STATUS= and, given control_socket, answers
    `hsd status` there (hsd.status), and writes [hsd] metrics_file (hsd.metrics)."""
    if drop_capabilities and not hardened:
        try:
            privileges.harden_process()
        except privileges.PrivilegeError as exc:
            log.error("cannot drop privileges, refusing to run with them: %s", exc.strerror)
            channel.close()
            return 1
    host = host or PluginHost.discover(config)
    if not checked:
        errors = refusals(config, host)  # the same decision as `hsd check`: nothing left for the first handshake
        if errors:
            for error in errors:
                log.error("not starting: %s", error)
            channel.close()
            return EXIT_CONFIG
    stop = stop or threading.Event()
    _ensure_process_keyring()
    from .status import Status, notify_loop

    status = Status()
    dispatcher = Dispatcher(channel, host, config, backend=backend, max_inflight=max_inflight,
                            on_outcome=status.record)
    status.inflight = dispatcher.inflight
    control = None
    metrics = None

    def on_stop(signum: int) -> None:
        log.info("received %s: finishing in-flight handshakes and stopping", signal.Signals(signum).name)
        stop.set()
        if on_signal:
            on_signal(signum)

    def on_reload(signum: int) -> None:
        if on_signal:
            on_signal(signum)
        try:
            fresh = config_mod.load(config_path)
        except config_mod.ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        view = copy.copy(host)  # the installed plugins judged under the fresh configuration
        view.config = fresh
        errors = refusals(fresh, view, report_expiry=expiry_checks)
        if errors:
            log.error("reload failed, keeping the running configuration: %s", "; ".join(errors))
            return
        dispatcher.config = fresh  # new requests only; in-flight handshakes keep their context
        host.config = fresh
        log.info("configuration reloaded from %s", fresh.source or "built-in defaults")

    def act(signum: int) -> None:  # in the hsd-signals thread, never in a signal handler
        (on_stop if signum in (signal.SIGTERM, signal.SIGINT) else on_reload)(signum)

    own_signals = None
    if signals is None and threading.current_thread() is threading.main_thread():
        signals = own_signals = SignalRelay()
        signals.install()
    if signals is not None:
        signals.start(act)  # the first thread serve() starts: after the capability drop

    def ready() -> None:
        nonlocal control, metrics
        log.info("hsd ready: listening for handshake requests (backend %s, up to %d in flight)",
                 backend or config.backend, dispatcher.max_inflight)
        if expiry_checks:  # `hsd status` answers once systemd hears READY=1
            control = open_control(status, control_socket, lambda: dispatcher.config)
        notify_systemd("READY=1")
        if expiry_checks:
            watch_expiry(lambda: dispatcher.config, stop)
            if config.metrics_file:  # the path and interval of the start; a reload does not move the file
                from .metrics import MetricsFile

                metrics = MetricsFile(config.metrics_file, config.metrics_interval,
                                      lambda: status.snapshot(dispatcher.config))
                metrics.start()
            if os.environ.get("NOTIFY_SOCKET"):
                notify_loop(status, stop, notify_systemd)
        if on_ready:
            on_ready()

    try:
        dispatcher.run(stop, ready=ready)
    except ConnectionError as exc:
        # Decision (docs/reliability.md): no in-process reconnect.  Exit non-zero so the service
        # manager restarts hsd; the new instance drains the kernel's queue at start-up.
        log.error("lost the handshake channel (%s): in-flight handshakes finished; exiting", exc)
        return 1
    finally:
        notify_systemd("STOPPING=1")
        if control is not None:
            control.close()
        if metrics is not None:
            metrics.close()  # the last word: every handshake this process finished
        channel.close()
        if own_signals is not None:
            own_signals.close()
    return 0


# ---------------------------------------------------------------- worker processes

WORKER_ENV = "HSD_WORKER_OF"  # set in a worker child: the supervising parent's pid
PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = 1.0  # a child that dies younger than this waits this long before its replacement starts
REAP_INTERVAL = 0.1


def is_worker_child() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def become_worker_child() -> None:
    """In a child: never notify systemd (the parent does), and die with the parent."""
    os.environ.pop("NOTIFY_SOCKET", None)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    parent = os.environ.get(WORKER_ENV, "")
    if parent.isdigit() and os.getppid() != int(parent):
        log.error("worker: the parent %s is gone; exiting", parent)
        os._exit(1)


class WorkerPool:
    """The parent's children: forked at start, restarted (spawned fresh) when one dies while running."""

    def __init__(self, respawn_argv: list[str]) -> None:
        self.respawn_argv = respawn_argv
        self.children: dict[int, float] = {}  # pid -> start time
        self.stopping = False
        self.failed_on_stop = False
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None

    def fork_child(self, child_main: Callable[[], int]) -> None:
        """Fork one worker; the child runs child_main() and never returns here."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ[WORKER_ENV] = str(os.getppid())
                become_worker_child()
                code = child_main()
            except BaseException:  # noqa: BLE001  a child must never fall back into the parent's code
                log.exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = time.monotonic()
        log.info("worker %d started", pid)

    def _spawn_child(self) -> int:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env[WORKER_ENV] = str(os.getpid())
        argv = [sys.executable, "-m", "hsd.cli", *self.respawn_argv]
        return os.posix_spawn(sys.executable, argv, env)

    def signal_all(self, signum: int) -> None:
        """Forward a signal; a stop signal also means: do not restart anyone any more."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        with self._lock:
            pids = list(self.children)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def start_reaping(self) -> None:
        self._reaper = threading.Thread(target=self._reap, name="hsd-workers", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while True:
            with self._lock:
                if self.stopping and not self.children:
                    return
                pids = list(self.children)
            for pid in pids:
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done:
                    self._exited(pid, status)
            time.sleep(REAP_INTERVAL)

    def _exited(self, pid: int, status: int) -> None:
        with self._lock:
            started = self.children.pop(pid)
        how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"status {os.waitstatus_to_exitcode(status)}")
        if self.stopping:
            stopped_by_us = os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGINT)
            if status and not stopped_by_us:
                self.failed_on_stop = True
            log.info("worker %d stopped (%s)", pid, how)
            return
        log.error("worker %d exited unexpectedly (%s); starting a new one", pid, how)
        if time.monotonic() - started < RESTART_BACKOFF:
            time.sleep(RESTART_BACKOFF)
        if self.stopping:
            return
        try:
            fresh = self._spawn_child()
        except OSError as exc:
            log.error("cannot start a new worker: %s", exc.strerror)
            return
        with self._lock:
            self.children[fresh] = time.monotonic()
            late = self.stopping  # a stop that came while it was spawned did not reach it
        log.info("worker %d started (replacing %d)", fresh, pid)
        if late:
            os.kill(fresh, signal.SIGTERM)

    def wait(self) -> None:
        """Until every child has exited (call after stop())."""
        if self._reaper is not None:
            self._reaper.join()


def serve_workers(open_channel: Callable[[], Channel], config: config_mod.Config, *, workers: int,
                  respawn_argv: list[str], backend: str | None, config_path: str | None,
                  max_inflight: int | None = None, host: PluginHost | None = None, checked: bool = False,
                  signals: SignalRelay | None = None, control_socket: str | None = None) -> int:
    """serve() in `workers` processes; the channel is opened in each process after the fork.

    signals: the caller's installed SignalRelay (the command line installs one
    right after joining the group, so a signal during loading is queued, not fatal).

    Must be called before any thread exists: the process is hardened (capabilities,
    core dumps) here, before the children are forked and before the reaper and
    signal threads start, so every thread of every worker holds only CAP_NET_ADMIN."""
    if is_worker_child():
        become_worker_child()
        workers = 1
    if workers > 1 and threading.active_count() > 1:
        raise RuntimeError("serve_workers() must fork before any thread is started")
    if not checked:  # once, before any child is forked: every worker serves the configuration checked here
        host = host or PluginHost.discover(config)
        errors = refusals(config, host)
        if errors:
            for error in errors:
                log.error("not starting: %s", error)
            return EXIT_CONFIG
        checked = True
    try:
        privileges.harden_process()
    except privileges.PrivilegeError as exc:
        log.error("cannot drop privileges, refusing to run with them: %s", exc.strerror)
        return 1
    if workers <= 1:
        return serve(open_channel(), config, backend=backend, config_path=config_path,
                     max_inflight=max_inflight, host=host, hardened=True, checked=checked, signals=signals,
                     expiry_checks=not is_worker_child(), control_socket=control_socket)
    pool = WorkerPool(respawn_argv)

    def child_main() -> int:
        try:
            channel = open_channel()
        except (OSError, RuntimeError) as exc:
            log.error("worker %d: cannot open the handshake channel: %s", os.getpid(), exc)
            return 1
        return serve(channel, config, backend=backend, config_path=config_path,
                     max_inflight=max_inflight, host=host, hardened=True, checked=True, expiry_checks=False)

    for _ in range(workers - 1):
        pool.fork_child(child_main)
    # the parent's relay outlives serve(): a stop signal while the children are waited for is still handled
    own_signals = signals is None
    if signals is None:
        signals = SignalRelay()
        signals.install()
    pool.start_reaping()
    code = 1
    try:
        code = serve(open_channel(), config, backend=backend, config_path=config_path,
                     max_inflight=max_inflight, host=host, on_signal=pool.signal_all, hardened=True,
                     signals=signals, checked=checked, control_socket=control_socket)
    finally:
        pool.stop()
        pool.wait()
        if own_signals:
            signals.close()
    return code or (1 if pool.failed_on_stop else 0)
