"""The accept/done cycle: READY -> ACCEPT -> plugin handshake -> kTLS -> DONE.

The dispatcher owns the one-DONE guarantee: every accepted request gets exactly
one DONE, whatever the plugin does (raises, hangs, returns garbage).  Handshakes
run on a bounded pool of worker threads, so a silent peer only ties up its own
worker until its deadline; a watchdog answers for a plugin that overstays it.
It never imports a TLS library.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from . import identity, sni, tls13
from .channel import OVERRUN, Channel
from .config import Config, SniPair
from .context import Auth, HandshakeContext, Mode, Role, Settings
from .credentials import X509Credentials, load_x509
from .errors import CredentialError, HandshakeError, HandshakeTimeout, Unsupported
from .isolation import run_isolated
from .ktls import install_session
from .nltrace import TracedChannel
from .plugins import PluginHost
from .peerlog import truncate
from .pkcs11 import redact
from .protocol import AuthMode, Done, HandshakeRequest, MessageType, ProtocolError, errno_name
from .session import Session
from .tls13 import refuse_handshake
from .validate import check_session, scrub
from .wire import RecordSocket

log = logging.getLogger("hsd")

WATCHDOG_GRACE = 2.0  # seconds past a request's deadline before the watchdog answers for it
WATCHDOG_INTERVAL = 0.5  # the watchdog looks this often (and sleeps in between, always)
SHUTDOWN_GRACE = 1.0  # after the last deadline + WATCHDOG_GRACE, stopping waits this much longer at most


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
    remote_auth: tuple[int, ...] = ()  # the serials DONE reported
    details: dict[str, str] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (context, handshake, ktls, ...)

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


@dataclass(eq=False)
class _InFlight:
    """One accepted request until its worker has cleaned up.

    Keyed by request_id, never by fd: the fd number is free for the next ACCEPT
    the moment the worker closes it, before or after its entry is gone."""

    request_id: int
    sockfd: int
    deadline: float
    once: _DoneOnce


class _HandshakeThreads:
    """Up to `size` reusable daemon threads running handshakes.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one
    plugin call that never returns would keep hsd from ever exiting.  These are
    daemon threads, and shutdown() waits for them only until a given time."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the handshake threads are shut down")
            self._jobs.put((job, args))
            if self._idle.acquire(timeout=0) or len(self._threads) >= self._size:
                return  # an idle thread takes it (or the next one to finish does)
            thread = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, args = item
            try:
                job(*args)
            except BaseException:  # noqa: BLE001  a job must never take its thread down with it
                log.exception("a handshake thread's job failed")
            self._idle.release()

    def shutdown(self, until: float) -> list[threading.Thread]:
        """No new jobs; let each thread finish its job until `until`; the ones still busy are abandoned."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join(max(0.0, until - time.monotonic()))
        return [thread for thread in threads if thread.is_alive()]


class Dispatcher:
    def __init__(self, channel: Channel, host: PluginHost, config: Config, *,
                 backend: str | None = None, max_inflight: int | None = None,
                 on_outcome: Callable[[Outcome], None] | None = None) -> None:
        self.host = host
        self.config = config
        self.default_backend = backend
        self.channel = TracedChannel(channel, lambda: self.config.nl_debug)  # [debug] nl, as reloaded
        self.max_inflight = max_inflight or config.max_inflight
        self.on_outcome = on_outcome
        self._pool = _HandshakeThreads(self.max_inflight, "hsd-handshake")
        self._request_ids = itertools.count(1)
        self._inflight: dict[int, _InFlight] = {}  # request_id -> entry
        self._inflight_lock = threading.Lock()
        self._inflight_changed = threading.Condition(self._inflight_lock)
        self._slot_freed = threading.Event()
        self.stats = {"accepted": 0, "done": 0, "ok": 0, "failed": 0, "watchdog": 0}

    def inflight(self) -> int:
        """How many accepted requests have not finished their clean-up (what max_inflight bounds)."""
        with self._inflight_lock:
            return len(self._inflight)

    # ------------------------------------------------------------ loop

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None) -> None:
        """Serve until stop is set; then let in-flight handshakes finish (each still gets its DONE).

        Stopping is bounded: it waits for the latest in-flight deadline plus the
        watchdog's grace plus SHUTDOWN_GRACE at most; a plugin thread still busy
        then is abandoned (its request already has its DONE).  A broken channel
        (ConnectionError from wait_ready/accept) ends the loop the same way, then
        propagates: the caller decides (serve() exits non-zero)."""
        watchdog_over = threading.Event()
        watchdog = threading.Thread(target=self._watchdog, args=(watchdog_over,), name="hsd-watchdog",
                                    daemon=True)
        watchdog.start()
        try:
            if ready:
                ready()
            self._serve_queue(stop)
        finally:
            try:
                self._drain()
            finally:
                watchdog_over.set()
                watchdog.join()

    def _serve_queue(self, stop: threading.Event) -> None:
        backlog = OVERRUN  # at start-up, drain whatever was queued before we ran
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

    def _drain(self) -> None:
        """Wait (bounded) for in-flight requests; any left get their DONE now and are forgotten."""
        with self._inflight_changed:
            last = max((entry.deadline for entry in self._inflight.values()), default=time.monotonic())
            bound = max(last + WATCHDOG_GRACE, time.monotonic()) + SHUTDOWN_GRACE
            while self._inflight and (left := bound - time.monotonic()) > 0:
                self._inflight_changed.wait(left)
            abandoned = list(self._inflight.values())
            self._inflight.clear()
        for entry in abandoned:
            if entry.once.send(errno.ETIMEDOUT):
                self.stats["watchdog"] += 1
            log.error("handshake on fd %d still in its plugin when stopping: abandoned (DONE sent)", entry.sockfd)
        stuck = self._pool.shutdown(until=bound)
        if stuck:
            log.error("stopping with %d handshake thread(s) stuck in a plugin", len(stuck))

    def _full(self) -> bool:
        return self.inflight() >= self.max_inflight

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
        _close_fd(sockfd)
        self.stats["done"] += 1
        self.stats["failed"] += 1

    def _start(self, request: HandshakeRequest) -> None:
        timeout_ms = request.timeout_ms or self.config.handshake_timeout_ms
        entry = _InFlight(next(self._request_ids), request.sockfd, time.monotonic() + timeout_ms / 1000,
                          _DoneOnce(self.channel, request.sockfd))
        with self._inflight_lock:
            self._inflight[entry.request_id] = entry
        try:
            self._pool.submit(self._serve, request, entry)
        except RuntimeError as exc:  # no thread could be started (or the pool is shut down)
            log.error("cannot start the handshake on fd %d: %s", request.sockfd, exc)
            _each_step(("DONE", lambda: entry.once.send(errno.EIO)),
                       ("in-flight removal", lambda: self._forget(entry)),
                       ("close", lambda: _close_fd(request.sockfd)))
            self.stats["done"] += 1
            self.stats["failed"] += 1

    def _forget(self, entry: _InFlight) -> None:
        with self._inflight_changed:
            self._inflight.pop(entry.request_id, None)
            self._inflight_changed.notify_all()
        self._slot_freed.set()

    def _watchdog(self, over: threading.Event) -> None:
        """Answer (ETIMEDOUT) for plugins that overstay a deadline; sleeps between every look."""
        while not over.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            with self._inflight_lock:
                late = [entry for entry in self._inflight.values()
                        if now > entry.deadline + WATCHDOG_GRACE and not entry.once.sent]
            for entry in late:
                if entry.once.send(errno.ETIMEDOUT):
                    self.stats["watchdog"] += 1
                    log.error("handshake on fd %d overran its deadline in the plugin; sent DONE ETIMEDOUT",
                              entry.sockfd)

    # ------------------------------------------------------------ one handshake

    def _serve(self, request: HandshakeRequest, entry: _InFlight) -> None:
        started = time.monotonic()
        once = entry.once
        outcome = Outcome(request, errno.EIO)
        result: object = None
        session: Session | None = None
        ctx: HandshakeContext | None = None
        sock: socket.socket | None = None
        remote_auth: tuple[int, ...] = ()
        stage = _Stages(outcome.stages)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", accept_line(request))
        try:
            try:
                sock = socket.socket(fileno=request.sockfd)
            except OSError as exc:
                raise HandshakeError(f"fd {request.sockfd} from ACCEPT is not a usable socket: {exc.strerror}") from None
            outcome.peer, outcome.local = address_of(sock.getpeername), address_of(sock.getsockname)
            with stage("context"):
                ctx, sni_pair = self._context(request, sock, entry.deadline)
            outcome.backend = ctx.backend
            if log.isEnabledFor(logging.DEBUG):
                log.debug("fd %d: %s -> backend %s; %s", request.sockfd, ctx.mode, ctx.backend,
                          credentials_line(self.config, request, ctx, sni_pair))
            with stage("handshake"):
                result = (run_isolated(ctx, self.host.handshake) if self.config.isolation == "process"
                          else self.host.handshake(ctx))
            if result is None:
                raise Unsupported(f"backend {ctx.backend!r} did not handle {ctx.mode}")
            session = check_session(result, ctx.backend)
            outcome.cipher, outcome.group, outcome.details = session.cipher, session.group, dict(session.details)
            if once.sent:
                raise HandshakeTimeout("the watchdog already failed this request")
            with stage("ktls"):
                install_session(self.channel.ktls, sock, session)
            with stage("identity"):
                remote_auth = _remote_auth(ctx, session)
            outcome.status = 0
        except HandshakeError as exc:
            outcome.status, outcome.reason = exc.status, exc.reason
        except Exception as exc:  # a plugin bug must cost one request, never the daemon
            log.exception("internal error during handshake")
            outcome.status, outcome.reason = errno.EIO, f"internal error: {exc!r}"
        finally:
            # every step runs whatever an earlier one raised; the entry goes before the fd, so a
            # request that gets this fd number next can never lose its own entry to this one
            with stage("done"):
                _each_step(("DONE", lambda: once.send(outcome.status, remote_auth)))
            _each_step(("wipe", lambda: _wipe(session, result)),
                       ("in-flight removal", lambda: self._forget(entry)),
                       ("close", lambda: self._close_socket(sock, request.sockfd)))
            outcome.done_error = once.error
            outcome.remote_auth = remote_auth if outcome.status == 0 else ()
            outcome.duration = time.monotonic() - started
            self.stats["done"] += 1
            self.stats["ok" if outcome.status == 0 else "failed"] += 1
            self._report(outcome, ctx, session)

    def _close_socket(self, sock: socket.socket | None, sockfd: int) -> None:
        """The request's fd, last of its clean-up (its number may be handed out again at once)."""
        if sock is not None:
            sock.close()
        else:
            _close_fd(sockfd)

    def _context(self, request: HandshakeRequest, sock: socket.socket,
                 deadline: float) -> tuple[HandshakeContext, SniPair | None]:
        """The backend's context, and the [hsd.server.sni] pair its credentials hold (None: not one)."""
        mode = Mode.of(request)  # Unsupported for an unknown message type or auth mode
        if mode.role is Role.SERVER and mode.auth is Auth.UNAUTH:
            raise Unsupported("a TLS 1.3 server cannot run without authentication (server unauth)")
        if sock.type != socket.SOCK_STREAM:
            raise Unsupported("only stream (TCP) sockets are supported")
        backend = self.host.backend_for(mode, self.default_backend)
        try:
            sni_pair = self._sni_pair(request, mode, sock, deadline)
            x509 = load_x509(self.config, request, sni_pair) if mode.auth is not Auth.PSK else X509Credentials()
        except CredentialError:
            if mode.role is Role.SERVER:  # misconfigured: the client hears it now, not at its own timeout
                refuse_handshake(sock, deadline)
            raise
        return HandshakeContext(request=request, sock=sock, deadline=deadline, backend=backend, x509=x509,
                                settings=settings_of(self.config)), sni_pair

    def _sni_pair(self, request: HandshakeRequest, mode: Mode, sock: socket.socket, deadline: float) -> SniPair | None:
        """Server x509 with [hsd.server.sni] pairs: the one the ClientHello's server_name chooses (hsd.sni).

        The ClientHello is read ahead and given back to the socket, so the
        backend's library reads it as if hsd had not; a request that names
        its own certificate (keyring) keeps it, and reads nothing ahead."""
        if not self.config.sni or mode != Mode(Role.SERVER, Auth.X509) or request.certificate or request.privkey:
            return None
        hello = tls13.peek_client_hello(RecordSocket(sock, deadline))
        try:
            host_name = tls13.server_name(hello) if hello is not None else None
        except tls13.MalformedClientHello:
            host_name = None  # the library judges the ClientHello (and answers it) itself
        pair = sni.choose(self.config.sni, host_name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fd %d: server_name %s -> %s", request.sockfd,
                      truncate(repr(host_name)) if host_name is not None else "none",
                      pair.key if pair is not None else "[authenticate.server] x509.certificate")
        return pair

    def _report(self, outcome: Outcome, ctx: HandshakeContext | None, session: Session | None) -> None:
        level = logging.INFO if outcome.status == 0 else logging.WARNING
        log.log(level, outcome.line())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fd %d timings: %s; remote-auth %s", outcome.request.sockfd,
                      " ".join(f"{name} {seconds * 1000:.1f}ms" for name, seconds in outcome.stages.items()) or "-",
                      ",".join(str(serial) for serial in outcome.remote_auth) or "none")
        if ctx is not None:
            self.host.observe(ctx, outcome.status, session)
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


class _Stages:
    """`with stage("name"):` adds the block's duration to the outcome's stages (for the debug timing line)."""

    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = time.monotonic() - began


def accept_line(request: HandshakeRequest) -> str:
    """[debug] what ACCEPT said, by number: never a key, only the serials the kernel named."""
    def named(enum_type: type, value: int) -> str:
        try:
            return enum_type(value).name
        except ValueError:
            return str(int(value))

    return (f"ACCEPT fd={request.sockfd} message_type={named(MessageType, request.message_type)} "
            f"auth_mode={named(AuthMode, request.auth_mode)} peername={truncate(repr(request.peername))} "
            f"timeout={request.timeout_ms}ms peer_identities={list(request.peer_identities)} "
            f"certificate={request.certificate} privkey={request.privkey} keyring={request.keyring}")


def credentials_line(config: Config, request: HandshakeRequest, ctx: HandshakeContext,
                     sni_pair: SniPair | None = None) -> str:
    """[debug] which credentials were chosen, and from where (paths and serials, never contents)."""
    if ctx.mode.auth is Auth.PSK:
        return (f"PSK keys from keyring {request.keyring} and the defaults/[authenticate] keyrings "
                f"{list(ctx.settings.keyrings)}; peer identities {list(request.peer_identities)}")
    role = config.role(str(ctx.mode.role))
    if sni_pair is not None:  # the pair the client's server_name chose
        role = replace(role, certificate=sni_pair.certificate, private_key=sni_pair.private_key)
    creds = ctx.x509
    cert = (f"keyring key {request.certificate}" if request.certificate else redact(role.certificate or "none"))
    key = (f"keyring key {request.privkey}" if request.privkey else redact(role.private_key or "none"))
    trust = (f"{len(creds.trust)} anchors from {role.truststore}" if creds.trust is not None else "the system store")
    return (f"certificate {cert} ({len(creds.chain)} in chain), private key {key}, trust {trust}, "
            f"{len(creds.crls)} CRLs, verify_peer={creds.verify_peer}, require_peer_cert={creds.require_peer_cert}, "
            f"allowed_sans={creds.allowed_sans or 'any'}" + (", ML-DSA pair too" if creds.pq_chain else ""))


def _each_step(*steps: tuple[str, Callable[[], object]]) -> None:
    """Run every step in order; one that raises is logged (one line) and the next still runs."""
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001  clean-up must not stop half-way
            log.error("request clean-up step %s failed: %r", name, exc)


def _wipe(session: Session | None, result: object) -> None:
    """Zero the secrets: the validated session's (Session.wipe), or what a malformed result holds."""
    if session is not None:
        session.wipe()
    elif result is not None:
        scrub(result)


def settings_of(config: Config) -> Settings:
    """The part of the configuration a plugin may see."""
    return Settings(tls_debug=config.tls_debug, psk_modes=tuple(config.psk_modes), keyrings=tuple(config.keyrings))


def _remote_auth(ctx: HandshakeContext, session: Session) -> tuple[int, ...]:
    """The identity DONE reports, decided here for every backend alike (hsd.identity).

    PSK: the serial the core resolved from the key the backend finished with
    (hsd.psk.run_psk, in the child under isolation).  Certificates: from what
    the peer presented, reported only when the contract made the backend verify it."""
    if ctx.mode.auth is Auth.PSK:
        if len(session.remote_auth) != 1:
            raise HandshakeError("a PSK session without the serial of the key used")
        return session.remote_auth
    return identity.remote_auth_for(ctx.request, session, ctx.x509.verify_peer)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
