"""The accept/done cycle: READY -> ACCEPT -> plugin handshake -> kTLS -> DONE.

The dispatcher owns the one-DONE guarantee: every accepted request gets exactly
one DONE, whatever the plugin does (raises, hangs, returns garbage).  Handshakes
run on a bounded pool of worker threads, so a silent peer only ties up its own
worker until its deadline; a watchdog answers for a plugin that overstays it.
It never imports a TLS library.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from . import identity
from .channel import OVERRUN, Channel
from .config import Config
from .context import HandshakeContext
from .credentials import load_x509
from .errors import HandshakeError, HandshakeTimeout, Unsupported
from .hookspecs import Mode
from .isolation import run_isolated
from .ktls import install_session
from .plugins import PluginHost
from .protocol import AuthMode, Done, HandshakeRequest, MessageType, ProtocolError, errno_name
from .session import Session

log = logging.getLogger("hsd")

WATCHDOG_GRACE = 2.0  # seconds past a request's deadline before the watchdog answers for it


@dataclass
class Outcome:
    """One finished request, as logged and as handed to observers."""

    request: HandshakeRequest
    status: int
    backend: str = "-"
    peer: str = "-"
    local: str = "-"  # our end of the connection; with peer it names the connection
    cipher: str | None = None
    group: str | None = None
    duration: float = 0.0
    reason: str = ""
    done_error: int = 0  # errno the kernel answered to our DONE (0 = accepted)
    details: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        req = self.request
        status = "ok" if self.status == 0 else errno_name(self.status)
        text = (f"handshake peer={self.peer} role={req.role} auth={req.auth} backend={self.backend} "
                f"suite={self.cipher or '-'} group={self.group or '-'} "
                f"duration={self.duration * 1000:.1f}ms status={self.status} ({status})")
        if self.reason:
            text += f": {self.reason}"
        return text


class _DoneOnce:
    """Sends DONE for one request at most once, from whichever thread gets there first."""

    def __init__(self, channel: Channel, sockfd: int) -> None:
        self.channel = channel
        self.sockfd = sockfd
        self._lock = threading.Lock()
        self.sent = False
        self.error = 0

    def send(self, status: int, remote_auth: tuple[int, ...] = ()) -> bool:
        with self._lock:
            if self.sent:
                return False
            self.sent = True
            try:
                self.error = self.channel.done(Done(self.sockfd, status, remote_auth if status == 0 else ()))
            except OSError as exc:
                self.error = exc.errno or errno.EIO
            except Exception as exc:  # a garbled reply (ProtocolError): must not skip the caller's cleanup
                log.error("DONE for fd %d failed: %s", self.sockfd, exc)
                self.error = errno.EIO
            if self.error:
                log.warning("kernel rejected DONE for fd %d: %s", self.sockfd, errno_name(self.error))
            return True


class Dispatcher:
    def __init__(self, channel: Channel, host: PluginHost, config: Config, *,
                 backend: str | None = None, max_inflight: int | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None) -> None:
        self.channel = channel
        self.host = host
        self.config = config
        self.default_backend = backend
        self.max_inflight = max_inflight or config.max_inflight
        self.on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(self.max_inflight, thread_name_prefix="hsd-handshake")
        self._slots = threading.Semaphore(self.max_inflight)
        self._inflight: dict[int, tuple[float, _DoneOnce]] = {}
        self._inflight_lock = threading.Lock()
        self._slot_freed = threading.Event()
        self.stats = {"accepted": 0, "done": 0, "ok": 0, "failed": 0, "watchdog": 0}

    # ------------------------------------------------------------ loop

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None) -> None:
        """Serve until stop is set; then let in-flight handshakes finish (each still gets its DONE).

        A broken channel (ConnectionError from wait_ready/accept) ends the loop
        the same way, then propagates: the caller decides (serve() exits non-zero)."""
        finished = threading.Event()  # run() is over, whatever the reason: the watchdog may go
        watchdog = threading.Thread(target=self._watchdog, args=(stop, finished), name="hsd-watchdog",
                                    daemon=True)
        watchdog.start()
        if ready:
            ready()
        backlog = OVERRUN  # at start-up, drain whatever was queued before we ran
        try:
            while not stop.is_set():
                if backlog:
                    backlog = self._accept_some(backlog)
                if backlog and self._full():
                    self._slot_freed.wait(0.2)
                    self._slot_freed.clear()
                    continue
                got = self.channel.wait_ready(0.2 if not backlog else 0)
                if got == OVERRUN:
                    backlog = OVERRUN
                elif got and backlog != OVERRUN:
                    backlog += got
        finally:
            self._pool.shutdown(wait=True)
            finished.set()
            watchdog.join()

    def _full(self) -> bool:
        with self._inflight_lock:
            return len(self._inflight) >= self.max_inflight

    def _accept_some(self, backlog: int) -> int:
        """ACCEPT while there is work and room; returns the remaining backlog (0 = queue empty)."""
        while backlog and not self._full():
            try:
                request = self.channel.accept()
            except PermissionError:
                raise  # no CAP_NET_ADMIN: nothing will ever work, the daemon must say so and stop
            except ConnectionError:
                raise  # the channel itself is gone (not this request): retrying would spin forever
            except OSError as exc:
                # the kernel could not hand this request over (e.g. its keyring could not be linked);
                # it has already failed the request itself, so log and go on with the queue
                log.error("ACCEPT failed: %s", exc.strerror or exc)
                backlog = backlog - 1 if backlog > 0 else backlog
                time.sleep(0.05)  # never spin on a failing ACCEPT
                return backlog  # back to the loop, which checks the stop flag
            except ProtocolError as exc:
                log.error("malformed ACCEPT reply: %s", exc)
                if exc.sockfd is not None and exc.sockfd >= 0:
                    self._fail_unparsed(exc.sockfd, str(exc))
                backlog = backlog - 1 if backlog > 0 else backlog
                continue
            if request is None:
                return 0
            self.stats["accepted"] += 1
            self._start(request)
            if backlog > 0:
                backlog -= 1
        return backlog

    def _fail_unparsed(self, sockfd: int, reason: str) -> None:
        once = _DoneOnce(self.channel, sockfd)
        once.send(errno.EIO)
        try:
            socket.socket(fileno=sockfd).close()
        except OSError:
            pass
        self.stats["done"] += 1
        self.stats["failed"] += 1

    def _start(self, request: HandshakeRequest) -> None:
        once = _DoneOnce(self.channel, request.sockfd)
        timeout_ms = request.timeout_ms or self.config.handshake_timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        with self._inflight_lock:
            self._inflight[request.sockfd] = (deadline, once)
        self._pool.submit(self._serve, request, once, deadline)

    def _watchdog(self, stop: threading.Event, finished: threading.Event) -> None:
        while not (stop.wait(0.5) or finished.is_set()) or self._inflight:
            now = time.monotonic()
            with self._inflight_lock:
                late = [(fd, once) for fd, (deadline, once) in self._inflight.items()
                        if now > deadline + WATCHDOG_GRACE and not once.sent]
            for fd, once in late:
                if once.send(errno.ETIMEDOUT):
                    self.stats["watchdog"] += 1
                    log.error("handshake on fd %d overran its deadline in the plugin; sent DONE ETIMEDOUT", fd)
            if (stop.is_set() or finished.is_set()) and not self._inflight:
                return

    # ------------------------------------------------------------ one handshake

    def _serve(self, request: HandshakeRequest, once: _DoneOnce, deadline: float) -> None:
        started = time.monotonic()
        outcome = Outcome(request, errno.EIO)
        session: Session | None = None
        ctx: HandshakeContext | None = None
        sock: socket.socket | None = None
        remote_auth: tuple[int, ...] = ()
        try:
            try:
                sock = socket.socket(fileno=request.sockfd)
            except OSError as exc:
                raise HandshakeError(f"fd {request.sockfd} from ACCEPT is not a usable socket: {exc.strerror}") from None
            outcome.peer, outcome.local = address_of(sock.getpeername), address_of(sock.getsockname)
            ctx = self._context(request, sock, deadline)
            outcome.backend = ctx.backend
            session = (run_isolated(ctx) if self.config.isolation == "process"
                       else ctx.hook.hsd_handshake(ctx=ctx))
            if session is None:
                raise Unsupported(f"backend {ctx.backend!r} did not handle {ctx.mode}")
            outcome.cipher, outcome.group = session.cipher, session.group
            if once.sent:
                raise HandshakeTimeout("the watchdog already failed this request")
            if not session.ktls_installed:
                install_session(self.channel.ktls, sock, session)
            remote_auth = session.remote_auth or identity.remote_auth_for(request, session, _verified(ctx))
            outcome.status = 0
        except HandshakeError as exc:
            outcome.status, outcome.reason = exc.status, exc.reason
        except Exception as exc:  # a plugin bug must cost one request, never the daemon
            log.exception("internal error during handshake")
            outcome.status, outcome.reason = errno.EIO, f"internal error: {exc!r}"
        finally:
            if session is not None:
                session.wipe()
            once.send(outcome.status, remote_auth)
            outcome.done_error = once.error
            if sock is not None:
                sock.close()
            else:
                _close_fd(request.sockfd)
            with self._inflight_lock:
                self._inflight.pop(request.sockfd, None)
            self._slot_freed.set()
            outcome.duration = time.monotonic() - started
            self.stats["done"] += 1
            self.stats["ok" if outcome.status == 0 else "failed"] += 1
            self._report(outcome, ctx, session)

    def _context(self, request: HandshakeRequest, sock: socket.socket, deadline: float) -> HandshakeContext:
        if request.message_type not in (MessageType.CLIENTHELLO, MessageType.SERVERHELLO):
            raise Unsupported(f"unknown message type {int(request.message_type)}")
        if request.auth_mode not in (AuthMode.UNAUTH, AuthMode.PSK, AuthMode.X509):
            raise Unsupported(f"unknown auth mode {int(request.auth_mode)}")
        mode = Mode(request.role, request.auth)
        if mode == Mode("server", "unauth"):
            raise Unsupported("a TLS 1.3 server cannot run without authentication (server unauth)")
        if sock.type != socket.SOCK_STREAM:
            raise Unsupported("only stream (TCP) sockets are supported")
        backend = self.host.backend_for(mode, self.default_backend)
        ctx = HandshakeContext(request=request, sock=sock, deadline=deadline, backend=backend,
                               config=self.config, hook=self.host.hook)
        if request.auth_mode in (AuthMode.UNAUTH, AuthMode.X509):
            ctx.x509 = load_x509(self.config, request)
        return ctx

    def _report(self, outcome: Outcome, ctx: HandshakeContext | None, session: Session | None) -> None:
        level = logging.INFO if outcome.status == 0 else logging.WARNING
        log.log(level, outcome.line())
        if ctx is not None:
            try:
                ctx.hook.hsd_handshake_done(ctx=ctx, status=outcome.status, session=session)
            except Exception:
                log.exception("a plugin's hsd_handshake_done hook failed")
        if self.on_outcome:
            self.on_outcome(outcome)


def address_of(get_address: Callable[[], Any]) -> str:
    """"host:port" ("[v6]:port") of a socket's getpeername/getsockname, "-" when it has none."""
    try:
        addr = get_address()
    except OSError:
        return "-"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "-"


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


def _verified(ctx: HandshakeContext | None) -> bool:
    """Did the backend verify the peer's certificate?  (The contract: with verify_peer it must.)"""
    return ctx is not None and ctx.x509 is not None and ctx.x509.verify_peer
