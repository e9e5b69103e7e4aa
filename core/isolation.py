"""Crash isolation (``[hsd] isolation = process``): each handshake runs in a forked child.

Why: a backend crash - a Python bug, or a segfault in native TLS code - must
cost only its own request, never the daemon and the other handshakes in flight.
The parent keeps everything the kernel ties to the daemon: the fd (DONE's sockfd
is looked up in the caller's fd table), kTLS installation and DONE.  The child
only runs the host's routed handshake (the chosen backend, and for PSK the
policy's offer and the core's remote-auth rule) on its inherited copy of the
socket and sends the Session back through a pipe (memory only, never disk);
both copies of the secrets are wiped.  The Session travels field by field as
its own definition lists them (dataclasses.fields), so a new field crosses
too; only the two secrets travel outside the JSON header.

Forking a multi-threaded process: the child does the handshake and leaves with
os._exit() - it never returns into the thread pool, never runs atexit handlers.
It dies by SIGALRM shortly after ctx.deadline whatever the plugin does; the
parent SIGKILLs it a little later still, and always reaps it.

Keyrings: a fork() child does not inherit the process keyring, where the kernel
linked the request's ACCEPT keyring; it inherits the session keyring.  So the
fork happens from a short-lived thread that first joins a fresh anonymous
session keyring (KEYCTL_JOIN_SESSION_KEYRING changes only the calling thread's
credentials) and links into it the request's keyring, the process keyring and
its previous session keyring: the child possesses exactly what the daemon does.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import faulthandler
import json
import logging
import os
import select
import signal
import struct
import threading
import time
from typing import Callable, NoReturn

from . import keyring
from .context import HandshakeContext
from .errors import HandshakeError, HandshakeTimeout
from .secret import wipe
from .session import Session
from .validate import check_session, scrub

log = logging.getLogger("hsd.isolation")

CHILD_ALARM_GRACE = 0.5  # the child kills itself (SIGALRM) this long after ctx.deadline
PARENT_KILL_GRACE = 1.5  # the parent SIGKILLs a child still alive this long after the deadline
# (both shorter than the dispatcher's watchdog grace, so the status comes from here)

_MAGIC = b"HSDI"
_FRAME_HEAD = struct.Struct("!4sIII")  # magic, header length, tx secret length, rx secret length
_MAX_HEADER = 4 << 20  # peer certificate chains travel in the header; anything larger is garbage
_MAX_SECRET = 64
_EXIT_OK = 0
_EXIT_FRAME_FAILED = 70  # the child could not even report its result


class IsolatedHandshakeFailed(HandshakeError):
    """The child crashed, died by a signal, or exited without a usable result."""

    status = errno.EIO


Handshake = Callable[[HandshakeContext], "Session | None"]
SECRET_FIELDS = ("tx_secret", "rx_secret")  # the frame's body, never its header


def run_isolated(ctx: HandshakeContext, handshake: Handshake) -> Session | None:
    """Run handshake(ctx) in a forked child; return its Session, or raise what it raised (status kept)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        pid = _fork_with_request_keyrings(ctx, lambda: _child_main(ctx, handshake, read_fd, write_fd))
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    os.close(write_fd)
    try:
        frame, wait_status, killed = _collect(pid, read_fd, ctx.deadline + PARENT_KILL_GRACE)
    finally:
        os.close(read_fd)
    try:
        return _result(frame, wait_status, killed)
    finally:
        wipe(frame)


# ---------------------------------------------------------------- forking with the request's keyrings


def _fork_with_request_keyrings(ctx: HandshakeContext, child: Callable[[], NoReturn]) -> int:
    """Fork from a fresh thread that joined a new session keyring holding the daemon's keyrings."""
    outcome: dict[str, object] = {}

    def fork_here() -> None:
        try:
            _join_session_with(_keyrings_to_keep(ctx))
        except OSError as exc:  # no keyrings here (or quota): non-keyring handshakes still work
            log.debug("isolated handshake without a fresh session keyring: %s", exc)
        try:
            pid = os.fork()
        except OSError as exc:
            outcome["error"] = exc
            return
        if pid == 0:
            child()  # never returns
        outcome["pid"] = pid

    thread = threading.Thread(target=fork_here, name="hsd-isolation-fork")
    thread.start()
    thread.join()
    if "pid" not in outcome:
        exc = outcome.get("error")
        raise IsolatedHandshakeFailed(f"cannot fork the isolated handshake: {exc}")
    return int(outcome["pid"])  # type: ignore[call-overload]


def _keyrings_to_keep(ctx: HandshakeContext) -> list[int]:
    """The request's keyring, then the anchors a fork() would lose or replace."""
    rings = [ctx.request.keyring]
    for spec in (keyring.KEY_SPEC_PROCESS_KEYRING, keyring.KEY_SPEC_SESSION_KEYRING):
        try:
            rings.append(keyring.keyring_id(spec, create=False))
        except OSError:
            pass  # this thread has no such keyring
    return list(dict.fromkeys(ring for ring in rings if ring))


def _join_session_with(rings: list[int]) -> None:
    """This thread only: a new anonymous session keyring with rings linked into it."""
    session = keyring._check(keyring._keyctl(keyring.KEYCTL_JOIN_SESSION_KEYRING, None), "join session keyring")
    for ring in rings:
        try:
            keyring.link(ring, session)
        except OSError as exc:
            log.debug("isolated handshake: cannot link keyring %d: %s", ring, exc.strerror)


# ---------------------------------------------------------------- the child


def _child_main(ctx: HandshakeContext, handshake: Handshake, read_fd: int, write_fd: int) -> NoReturn:
    """The forked side: one handshake, one frame, os._exit().  Nothing here may return."""
    code = _EXIT_FRAME_FAILED
    try:
        os.close(read_fd)
        faulthandler.disable()  # a crash here is reported by the parent (signal name), not as a dump
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)  # the daemon's handlers are not ours to run
        signal.setitimer(signal.ITIMER_REAL, max(0.01, ctx.remaining() + CHILD_ALARM_GRACE))
        frame = _run_and_encode(ctx, handshake)
        try:
            _write_all(write_fd, frame)
            code = _EXIT_OK
        finally:
            wipe(frame)
    finally:
        os._exit(code)


def _run_and_encode(ctx: HandshakeContext, handshake: Handshake) -> bytearray:
    try:
        session = handshake(ctx)
    except HandshakeError as exc:
        return _encode({"kind": "error", "status": exc.status, "reason": exc.reason,
                        "type": type(exc).__name__})
    except BaseException as exc:  # a plugin bug: the child reports it, the parent fails the request
        log.exception("internal error in the isolated handshake")
        return _encode({"kind": "bug", "reason": repr(exc)})
    if session is None:
        return _encode({"kind": "none"})
    try:
        checked = check_session(session, ctx.backend)  # the same contract as in-process, checked here
    except HandshakeError as exc:
        scrub(session)
        return _encode({"kind": "error", "status": exc.status, "reason": exc.reason, "type": type(exc).__name__})
    try:
        return _encode(_session_header(checked), checked.tx_secret, checked.rx_secret)
    finally:
        scrub(checked)


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        view.release()


# ---------------------------------------------------------------- the frame (no secrets in the header)


def _session_header(session: Session) -> dict[str, object]:
    """Every Session field but the secrets, as JSON: bytes become {"b64": ...}, tuples {"tuple": [...]}."""
    header: dict[str, object] = {"kind": "session"}
    for item in dataclasses.fields(Session):
        if item.name not in SECRET_FIELDS:
            header[item.name] = _to_json(getattr(session, item.name))
    return header


def _to_json(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"tuple": [_to_json(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": {str(key): _to_json(item) for key, item in value.items()}}
    return value


def _from_json(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"], validate=True)
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_from_json(item) for item in value["tuple"])
        if set(value) == {"dict"} and isinstance(value["dict"], dict):
            return {key: _from_json(item) for key, item in value["dict"].items()}
        raise ValueError(f"unknown encoding {sorted(value)}")
    if isinstance(value, list):
        raise ValueError("a bare list (tuples travel as {'tuple': [...]})")
    return value


def _session_from(header: dict, tx: bytearray, rx: bytearray) -> Session:
    """The Session again, from exactly the fields its definition lists (a missing one is malformed)."""
    names = [item.name for item in dataclasses.fields(Session) if item.name not in SECRET_FIELDS]
    missing = [name for name in names if name not in header]
    if missing:
        raise KeyError(", ".join(missing))
    return Session(tx_secret=tx, rx_secret=rx, **{name: _from_json(header[name]) for name in names})


def _encode(header: dict[str, object], tx: bytes | bytearray = b"", rx: bytes | bytearray = b"") -> bytearray:
    head = json.dumps(header).encode()
    frame = bytearray(_FRAME_HEAD.pack(_MAGIC, len(head), len(tx), len(rx)))
    frame += head
    frame += tx
    frame += rx
    return frame


def _decode(frame: bytearray) -> tuple[dict, bytearray, bytearray]:
    magic, head_len, tx_len, rx_len = _FRAME_HEAD.unpack_from(frame)
    if magic != _MAGIC or len(frame) != _FRAME_HEAD.size + head_len + tx_len + rx_len:
        raise ValueError("malformed frame")
    pos = _FRAME_HEAD.size
    header = json.loads(bytes(frame[pos:pos + head_len]))
    pos += head_len
    tx = bytearray(memoryview(frame)[pos:pos + tx_len])
    rx = bytearray(memoryview(frame)[pos + tx_len:pos + tx_len + rx_len])
    return header, tx, rx


# ---------------------------------------------------------------- the parent


def _collect(pid: int, read_fd: int, kill_at: float) -> tuple[bytearray, int, bool]:
    """Read the child's frame while waiting for it to exit; SIGKILL it at kill_at; always reap it."""
    frame = bytearray()
    killed = False
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = None  # old kernel: poll waitpid instead
    try:
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        reading = True
        while True:
            left = kill_at - time.monotonic()
            if left <= 0:
                _kill(pid)
                killed = True
                break
            wait_ms = left * 1000 if pidfd is not None else min(left, 0.05) * 1000
            events = dict(poller.poll(max(1, int(wait_ms))))
            if reading and events.get(read_fd):
                reading = _read_some(read_fd, frame)
                if not reading:
                    poller.unregister(read_fd)
            if pidfd is not None and events.get(pidfd):
                break
            if pidfd is None and _exited(pid):
                break
        while reading and _read_some(read_fd, frame, drain=True):
            pass
    except BaseException:
        _kill(pid)  # never wait for a child we stopped listening to
        wipe(frame)
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
        _, wait_status = os.waitpid(pid, 0)
    return frame, wait_status, killed


def _read_some(fd: int, frame: bytearray, drain: bool = False) -> bool:
    """Append what the pipe holds to frame, in place (no immutable copy of secrets); False at EOF."""
    if drain and not select.select([fd], [], [], 0)[0]:
        return False
    chunk = bytearray(65536)
    try:
        got = os.readv(fd, [chunk])
        frame += memoryview(chunk)[:got]
    finally:
        wipe(chunk)
    if len(frame) > _FRAME_HEAD.size + _MAX_HEADER + 2 * _MAX_SECRET:
        raise IsolatedHandshakeFailed("the isolated handshake sent an oversized result")
    return got > 0


def _exited(pid: int) -> bool:
    """Without a pidfd: has the child exited?  (Peeks with waitid, leaving it to be reaped.)"""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _result(frame: bytearray, wait_status: int, killed: bool) -> Session | None:
    if killed:
        raise HandshakeTimeout("the isolated handshake overran its deadline; the child was killed")
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGALRM:
            raise HandshakeTimeout("the isolated handshake overran its deadline (child ended by SIGALRM)")
        raise IsolatedHandshakeFailed(f"the isolated handshake crashed: child killed by {signal.Signals(sig).name}")
    code = os.waitstatus_to_exitcode(wait_status)
    if code != _EXIT_OK or not frame:
        raise IsolatedHandshakeFailed(f"the isolated handshake exited with status {code} without a result")
    try:
        header, tx, rx = _decode(frame)
    except (ValueError, struct.error) as exc:
        raise IsolatedHandshakeFailed(f"the isolated handshake sent a malformed result: {exc}") from None
    if not isinstance(header, dict):
        wipe(tx)
        wipe(rx)
        raise IsolatedHandshakeFailed("the isolated handshake sent a malformed result: no header object")
    kind = header.get("kind")
    if kind == "error":
        status = header.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 0 < status < 4096:
            status = errno.EIO  # a DONE status is a positive errno; anything else is the child's garbage
        raise _error_named(str(header.get("type", "")), str(header.get("reason", "")), status)
    if kind == "bug":
        raise IsolatedHandshakeFailed(f"internal error in the isolated handshake: {header.get('reason')}")
    if kind == "none":
        return None
    try:
        return _session_from(header, tx, rx)
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        wipe(tx)
        wipe(rx)
        raise IsolatedHandshakeFailed(f"the isolated handshake sent a malformed session: {exc!r}") from None


def _error_named(type_name: str, reason: str, status: int) -> HandshakeError:
    """The child's HandshakeError again, same class when it is one of hsd's, same status always."""
    from . import errors

    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, HandshakeError):
        return cls(reason, status)
    return HandshakeError(reason, status)
