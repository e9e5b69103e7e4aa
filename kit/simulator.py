"""A user-space stand-in for the kernel's `handshake` family and kTLS setsockopt.

Why: the machines this project is developed on have neither net/handshake nor
kTLS, yet the daemon must be exercised end to end with real bytes.  The
simulator reproduces net/handshake's semantics (see the kernel notes): a FIFO
of pending requests per "network namespace", READY multicast, ACCEPT handing
over the consumer's very own socket, DONE looked up by socket, cancel, and the
tls ULP's setsockopt checks, TLS_TX_MAX_PAYLOAD_LEN included: accepted in its
range like Linux 7.2, or refused with ENOPROTOOPT like 6.12
(Simulator(tx_max_payload_len=False)).

Transport: an AF_UNIX SOCK_SEQPACKET listening socket.  Each connection plays
one netlink socket and gets a netlink port id.  Everything that crosses it is
the real family's wire format, built and parsed by `hsd.protocol`
(CTRL_CMD_GETFAMILY, ACCEPT, DONE, READY, NLMSG_ERROR with the echoed request).

The agent's edge (SimChannel) and the wire's private framing live in the daemon
package, hsd.sim_channel, because `hsd --simulator` serves through them.
Three things are syscalls in the real world, not netlink messages; here they are
netlink-framed messages of a private type, SIMCALL_TYPE (0x0f, inside the range
netlink reserves for control messages, so it can never collide with a family id),
with a generic-netlink header whose cmd says which call, and answered by an
NLMSG_ERROR (0 = success, else the errno the syscall would set):
  SIMCALL_ADD_MEMBERSHIP / SIMCALL_DROP_MEMBERSHIP: attr 1 = group id (u32);
      setsockopt(SOL_NETLINK, NETLINK_ADD/DROP_MEMBERSHIP).
  SIMCALL_SETSOCKOPT: attr 1 = level (u32), attr 2 = optname (u32),
      attr 3 = optval (bytes); the target socket travels with SCM_RIGHTS.
  SIMCALL_SETSOCKOPTS: those calls on one socket in one message, run in order
      up to the first that fails, answered by how many succeeded and the errno
      of the next (hsd.sim_channel describes the framing).
File descriptors also model the kernel's fd tables: ACCEPT's reply carries the
consumer's socket with SCM_RIGHTS, and DONE carries the fd it names, so an fd
not open in the agent fails with EBADF exactly where the kernel's fd lookup
would.  The simulator writes the consumer's own fd number into the reply's
sockfd; the kernel would write the number the fd got in the agent, which only
the receiving edge knows, so SimChannel puts that number into
HandshakeRequest.sockfd.  Likewise the keyring link into the agent's process
keyring has to run in the agent's context, so SimChannel does it (the only two
things done at the edge rather than in the "kernel").

A lost READY (receive buffer full, or drop_ready()) is reported to the
listener like netlink's ENOBUFS: an NLMSG_ERROR(-ENOBUFS) with seq 0 on its
READY connection, delivered as soon as the connection can take it.

Not modelled: CAP_NET_ADMIN on ACCEPT (EPERM), network namespaces, and keyring
linking, done by the agent edge (see SimChannel._link_keyring).
"""


from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import selectors
import signal
import socket
import stat
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from hsd import protocol as p
from hsd.ktls import (RECORD_SIZE_LIMIT_MIN, SOL_TLS, TCP_ULP, TLS_1_3_VERSION, TLS_MAX_PAYLOAD_SIZE, TLS_RX,
                      TLS_TX, TLS_TX_MAX_PAYLOAD_LEN, CryptoInfo)
from hsd.sim_channel import (MAX_DATAGRAM, MAX_FDS, REPLY_TIMEOUT, SIM_FAMILY_ID, SIM_GROUPS,
                             SIMCALL_ADD_MEMBERSHIP, SIMCALL_ATTR_GROUP, SIMCALL_ATTR_LEVEL,
                             SIMCALL_ATTR_OPTNAME, SIMCALL_ATTR_OPTVAL, SIMCALL_DROP_MEMBERSHIP,
                             SIMCALL_SETSOCKOPT, SIMCALL_SETSOCKOPTS, SIMCALL_TYPE, decode_setsockopts,
                             encode_setsockopts_answer, SimChannel, close_all, fds_from_ancdata,
                             scm_rights)


log = logging.getLogger(__name__)

HANDLER_CLASS_MAX = 2  # NLA_POLICY_MAX of the handler-class attribute
TCP_ESTABLISHED = 1

SockKey = tuple[int, int]  # (st_dev, st_ino): which socket, whatever fd names it
DoneCallback = Callable[[int, int], None]


def default_pending_max() -> int:
    """The kernel's cap: clamp(totalram / (25 * mem_unit), 3, 50), totalram counted in pages."""
    pages = os.sysconf("SC_PHYS_PAGES")
    page_size = os.sysconf("SC_PAGE_SIZE")
    return max(3, min(50, pages // (25 * page_size)))


def _sock_key(fd: int) -> SockKey:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _raw_messages(buf: bytes) -> list[bytes]:
    """Split one datagram into its netlink messages, raw (the kernel echoes them on error).

    Like netlink_rcv_skb, a message whose length is impossible ends the datagram silently."""
    out = []
    pos = 0
    while len(buf) - pos >= p.NLMSG_HDR.size:
        length = p.NLMSG_HDR.unpack_from(buf, pos)[0]
        if length < p.NLMSG_HDR.size or pos + length > len(buf):
            break
        out.append(bytes(buf[pos : pos + length]))
        pos += (length + 3) & ~3
    return out


# ---------------------------------------------------------------- consumer side


@dataclass(eq=False)
class SimRequest:
    """One submitted handshake, as the kernel consumer (NFS, NVMe) sees it."""

    sock: socket.socket
    message_type: p.MessageType
    auth_mode: p.AuthMode
    peername: str | None = None
    timeout_ms: int = 0
    keyring: int = 0
    peer_identities: tuple[int, ...] = ()
    certificate: int = 0
    privkey: int = 0
    callback: DoneCallback | None = None
    status: int | None = None  # positive errno once DONE arrived (the kernel hands consumers -status)
    peerid: int = 0
    remote_auth: tuple[int, ...] = ()
    accepted: bool = False
    completed: bool = False  # HANDSHAKE_F_REQ_COMPLETED: DONE or cancel-after-accept happened
    cancelled: bool = False
    done_calls: int = 0
    ktls_tx: CryptoInfo | None = None
    ktls_rx: CryptoInfo | None = None
    ktls_tx_max_payload: int | None = None  # TLS_TX_MAX_PAYLOAD_LEN the agent set (None: full-size records)
    consumer_fd: int = -1
    held_fd: int = -1  # the simulator's reference to the socket's file (the kernel's get_file)
    key: SockKey = (0, 0)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> tuple[int, int]:
        """Block until DONE reached the consumer: (status, peerid)."""
        if not self._finished.wait(timeout):
            raise TimeoutError("no DONE for this handshake request")
        assert self.status is not None
        return self.status, self.peerid

    def as_accept(self, sockfd: int) -> p.HandshakeRequest:
        """What the ACCEPT reply says about this request (tls_handshake_accept)."""
        return p.HandshakeRequest(sockfd=sockfd, message_type=self.message_type, auth_mode=self.auth_mode,
                                  timeout_ms=self.timeout_ms, peername=self.peername,
                                  peer_identities=self.peer_identities, certificate=self.certificate,
                                  privkey=self.privkey, keyring=self.keyring)


@dataclass
class SimStats:
    """Counters tests and the CLI read; not part of the kernel's behaviour."""

    submitted: int = 0
    submit_errors: int = 0
    ready_sent: int = 0  # READY notifications (one per submitted request), each to all listeners
    ready_lost: int = 0  # per listener: undeliverable or dropped, reported as ENOBUFS
    accepted: int = 0
    accept_eagain: int = 0
    done_received: int = 0  # DONE messages that found their request (duplicates included)
    done_errors: int = 0
    cancelled: int = 0


@dataclass(eq=False)
class _Conn:
    """One agent connection: the simulated netlink socket."""

    sock: socket.socket
    port: int
    groups: set[int] = field(default_factory=set)
    overrun: bool = False  # a READY was lost: ENOBUFS still to be reported
    want_write: bool = False


@dataclass
class _KtlsState:
    ulp: bool = False
    tx: CryptoInfo | None = None
    rx: CryptoInfo | None = None
    tx_max_payload: int | None = None


class Simulator:
    """The "kernel": serves agents on a unix socket and consumers through client_hello_*/server_hello_*."""

    def __init__(self, path: str | None = None, pending_max: int | None = None, *,
                 tx_max_payload_len: bool = True) -> None:
        """tx_max_payload_len=False: a kernel without that option (Linux 6.12), which answers ENOPROTOOPT."""
        self.tx_max_payload_len = tx_max_payload_len
        self._tmpdir = None if path else tempfile.mkdtemp(prefix="hsd-sim-")
        self.address = path or os.path.join(self._tmpdir, "handshake.sock")  # type: ignore[arg-type]
        self.pending_max = default_pending_max() if pending_max is None else pending_max
        self.stats = SimStats()
        self.family = p.FamilyInfo(SIM_FAMILY_ID, p.FAMILY_NAME, p.FAMILY_VERSION, dict(SIM_GROUPS))
        self._lock = threading.RLock()
        self._pending: deque[SimRequest] = deque()
        self._requests: dict[SockKey, SimRequest] = {}  # the kernel's request hash, by socket
        self._ktls: dict[SockKey, _KtlsState] = {}
        self._conns: dict[int, _Conn] = {}  # by port id
        self._next_port = 0x1000
        self._mangle: Callable[[bytes], bytes] | None = None
        self._drop_ready = 0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Simulator":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _remove_stale_socket(self.address)
            listener.bind(self.address)
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full wake pipe already means "wake up"; never block under the lock
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="hsd-simulator", daemon=True)
        self._thread.start()
        log.info("simulator listening on %s (family id %d, pending max %d)", self.address,
                 SIM_FAMILY_ID, self.pending_max)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join()
        self._thread = None
        with self._lock:
            for conn in self._conns.values():
                conn.sock.close()
            self._conns.clear()
            for req in self._requests.values():
                self._release(req)
            self._pending.clear()
        assert self._selector is not None and self._listener is not None
        assert self._wake_r is not None and self._wake_w is not None
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        if self._tmpdir:
            os.rmdir(self._tmpdir)

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def channel(self) -> "SimChannel":
        return SimChannel.connect(self.address)

    # ------------------------------------------------------------ consumer API

    def client_hello_anon(self, sock: socket.socket, *, peername: str | None = None, timeout_ms: int = 0,
                          keyring: int = 0, done: DoneCallback | None = None) -> SimRequest:
        return self._submit(SimRequest(sock, p.MessageType.CLIENTHELLO, p.AuthMode.UNAUTH, peername=peername,
                                       timeout_ms=timeout_ms, keyring=keyring, callback=done))

    def client_hello_x509(self, sock: socket.socket, *, peername: str | None = None, timeout_ms: int = 0,
                          cert: int = 0, privkey: int = 0, keyring: int = 0,
                          done: DoneCallback | None = None) -> SimRequest:
        return self._submit(SimRequest(sock, p.MessageType.CLIENTHELLO, p.AuthMode.X509, peername=peername,
                                       timeout_ms=timeout_ms, keyring=keyring, certificate=cert,
                                       privkey=privkey, callback=done))

    def client_hello_psk(self, sock: socket.socket, peerids: list[int] | tuple[int, ...], *,
                         peername: str | None = None, timeout_ms: int = 0, keyring: int = 0,
                         done: DoneCallback | None = None) -> SimRequest:
        if not 1 <= len(peerids) <= p.MAX_PEER_IDENTITIES:
            raise OSError(errno.EINVAL, f"a PSK client hello takes 1..{p.MAX_PEER_IDENTITIES} peer ids")
        return self._submit(SimRequest(sock, p.MessageType.CLIENTHELLO, p.AuthMode.PSK, peername=peername,
                                       timeout_ms=timeout_ms, keyring=keyring,
                                       peer_identities=tuple(peerids), callback=done))

    def server_hello_x509(self, sock: socket.socket, *, timeout_ms: int = 0, cert: int = 0, privkey: int = 0,
                          keyring: int = 0, done: DoneCallback | None = None) -> SimRequest:
        return self._submit(SimRequest(sock, p.MessageType.SERVERHELLO, p.AuthMode.X509, timeout_ms=timeout_ms,
                                       keyring=keyring, certificate=cert, privkey=privkey, callback=done))

    def server_hello_psk(self, sock: socket.socket, *, peerid: int = 0, timeout_ms: int = 0, keyring: int = 0,
                         done: DoneCallback | None = None) -> SimRequest:
        # the kernel always sends exactly one identity for a server, 0 included
        return self._submit(SimRequest(sock, p.MessageType.SERVERHELLO, p.AuthMode.PSK, timeout_ms=timeout_ms,
                                       keyring=keyring, peer_identities=(peerid,), callback=done))

    def cancel(self, sock: socket.socket) -> bool:
        """tls_handshake_cancel: True if the request was still outstanding (pending, or accepted and not done).

        A pending request leaves the queue; an accepted one is marked done, so
        its DONE will be ignored.  Neither calls the done callback."""
        if sock.fileno() < 0:
            return False
        key = _sock_key(sock.fileno())
        with self._lock:
            req = self._requests.get(key)
            if req is None or req.completed:
                return False
            if req in self._pending:
                self._pending.remove(req)
            req.completed = req.cancelled = True
            self.stats.cancelled += 1
            self._release(req)
        log.info("cancel %s", _describe(req))
        return True

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def listeners(self) -> int:
        """How many connections joined the tlshd group (genl_has_listeners)."""
        with self._lock:
            return sum(SIM_GROUPS[p.MCGRP_TLSHD] in c.groups for c in self._conns.values())

    # ------------------------------------------------------------ fault injection

    def mangle_next_accept(self, fn: Callable[[bytes], bytes]) -> None:
        """Rewrite the bytes of the next successful ACCEPT reply (the fd still travels with it)."""
        with self._lock:
            self._mangle = fn

    def drop_ready(self, n: int) -> None:
        """Suppress the next n READY notifications; listeners see them as lost (ENOBUFS)."""
        with self._lock:
            self._drop_ready += n

    # ------------------------------------------------------------ submit (handshake_req_submit)

    def _submit(self, req: SimRequest) -> SimRequest:
        fd = req.sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "consumer socket is closed")
        with self._lock:
            try:
                if len(self._pending) >= self.pending_max:
                    raise OSError(errno.EAGAIN, f"{self.pending_max} handshake requests already pending")
                key = _sock_key(fd)
                if key in self._requests:
                    raise OSError(errno.EBUSY, "this socket already has a handshake request")
                if not self.listeners():
                    raise OSError(errno.ESRCH, "no handshake agent listens on the tlshd group")
            except OSError as exc:
                self.stats.submit_errors += 1
                log.info("submit %s/%s failed: %s", req.message_type.name.lower(), req.auth_mode.name.lower(),
                         p.errno_name(exc.errno or 0))
                raise
            req.key, req.consumer_fd, req.held_fd = key, fd, os.dup(fd)
            self._requests[key] = req
            self._pending.append(req)
            self.stats.submitted += 1
            log.info("submit %s", _describe(req))
            self._notify_ready()
        return req

    def _notify_ready(self) -> None:
        """Multicast one READY to every listener; a listener that cannot take it is flagged overrun."""
        self.stats.ready_sent += 1
        group = SIM_GROUPS[p.MCGRP_TLSHD]
        drop = self._drop_ready > 0
        if drop:
            self._drop_ready -= 1
        msg = p.encode_ready(SIM_FAMILY_ID, p.HandlerClass.TLSHD)
        for conn in self._conns.values():
            if group not in conn.groups:
                continue
            if not drop:
                try:
                    conn.sock.send(msg)
                    continue
                except OSError:  # full (EAGAIN) or gone
                    pass
            conn.overrun = True
            self.stats.ready_lost += 1
        log.info("READY%s", " (dropped)" if drop else "")
        if any(c.overrun for c in self._conns.values()):
            self._wake()

    # ------------------------------------------------------------ event loop

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        assert self._selector is not None
        while not self._stopping:
            for key, events in self._selector.select():
                if key.data == "listen":
                    self._accept_conn()
                elif key.data == "wake":
                    assert self._wake_r is not None
                    try:
                        while self._wake_r.recv(64):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    conn: _Conn = key.data
                    if events & selectors.EVENT_READ:
                        self._serve(conn)
            with self._lock:
                self._flush_overruns()

    def _accept_conn(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        with self._lock:
            conn = _Conn(sock, self._next_port)
            self._next_port += 1
            self._conns[conn.port] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _flush_overruns(self) -> None:
        """Report lost READYs as ENOBUFS once each listener's buffer has room (loop thread only)."""
        assert self._selector is not None
        for conn in list(self._conns.values()):
            if conn.overrun:
                try:
                    conn.sock.send(p.encode_error(b"", errno.ENOBUFS, seq=0, pid=0))
                    conn.overrun = False
                except BlockingIOError:
                    pass
                except OSError:
                    conn.overrun = False
            if conn.overrun != conn.want_write:
                conn.want_write = conn.overrun
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.overrun else 0)
                self._selector.modify(conn.sock, events, conn)

    def _drop_conn(self, conn: _Conn) -> None:
        assert self._selector is not None
        self._selector.unregister(conn.sock)
        with self._lock:
            self._conns.pop(conn.port, None)
        conn.sock.close()

    def _serve(self, conn: _Conn) -> None:
        try:
            data, ancdata, _, _ = conn.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * 4),
                                                     socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            self._drop_conn(conn)
            return
        fds = fds_from_ancdata(ancdata)
        replies: list[bytes] = []
        try:
            if not data:
                self._drop_conn(conn)
                return
            for raw in _raw_messages(data):
                reply = self._handle(conn, raw, fds[0] if fds else None)
                if reply is not None:
                    replies.append(reply)
        finally:
            # the kernel only looks a DONE's fd up for the call (sockfd_lookup/fput): by the time the
            # agent reads the ACK, the "kernel" holds no copy of it
            close_all(fds)
        for reply in replies:
            self._reply(conn, reply)

    def _reply(self, conn: _Conn, data: bytes, fd: int | None = None) -> None:
        """Send a unicast reply, waiting briefly if the agent's buffer is full."""
        while True:
            try:
                conn.sock.sendmsg([data], scm_rights(fd))
                return
            except BlockingIOError:
                if not select.select([], [conn.sock], [], REPLY_TIMEOUT)[1]:
                    log.warning("agent port %d does not read its replies; reply dropped", conn.port)
                    return
            except OSError as exc:
                log.debug("reply to port %d failed: %s", conn.port, exc)
                return

    def _handle(self, conn: _Conn, raw: bytes, fd: int | None) -> bytes | None:
        """One netlink message, netlink_rcv_skb style: an error echoes the request, success ACKs if asked.

        Returns that error/ACK message; the caller sends it once the message's fds are closed."""
        _, mtype, flags, _, _ = p.NLMSG_HDR.unpack_from(raw)
        if mtype < 0x10 and mtype != SIMCALL_TYPE:
            return None  # control messages are skipped by the kernel
        err = 0
        if flags & p.NLM_F_REQUEST:
            try:
                [msg] = p.split_messages(raw)
            except (p.ProtocolError, ValueError):
                err = errno.EINVAL
            else:
                try:
                    err = self._dispatch(conn, msg, fd) if isinstance(msg, p.GenlMessage) else errno.EINVAL
                    if isinstance(err, bytes):
                        return err  # the call's own answer (SIMCALL_SETSOCKOPTS), sent like an ACK
                except Exception:  # a bug (or a test's mangle function) must not kill the "kernel"
                    log.exception("simulator failed on a message from port %d", conn.port)
                    err = errno.EIO
        if err or flags & p.NLM_F_ACK:
            return p.encode_error(raw, err, pid=conn.port)
        return None

    def _dispatch(self, conn: _Conn, msg: p.GenlMessage, fd: int | None) -> int | bytes:
        if msg.type == p.GENL_ID_CTRL:
            return self._ctrl(conn, msg)
        if msg.type == SIMCALL_TYPE:
            return self._simcall(conn, msg, fd)
        if msg.type != SIM_FAMILY_ID:
            return errno.ENOENT  # genl_rcv_msg: no such family
        if msg.cmd == p.Cmd.ACCEPT:
            return self._do_accept(conn, msg)
        if msg.cmd == p.Cmd.DONE:
            return self._do_done(msg, fd)
        return errno.EOPNOTSUPP

    def _ctrl(self, conn: _Conn, msg: p.GenlMessage) -> int:
        if msg.cmd != p.CTRL_CMD_GETFAMILY:
            return errno.EOPNOTSUPP
        try:
            names = [p.get_str(v) for t, v in msg.attrs() if t & p.NLA_TYPE_MASK == p.CTRL_ATTR_FAMILY_NAME]
        except p.ProtocolError:
            return errno.EINVAL
        if names != [p.FAMILY_NAME]:
            return errno.ENOENT
        self._reply(conn, p.encode_newfamily(self.family, msg.seq, pid=conn.port))
        return 0

    def _simcall(self, conn: _Conn, msg: p.GenlMessage, fd: int | None) -> int | bytes:
        try:
            if msg.cmd == SIMCALL_SETSOCKOPTS:
                calls = decode_setsockopts(msg)
                if fd is None:
                    return errno.EBADF
                applied = err = 0
                for level, optname, value in calls:  # each with its own syscall's checks, stop at a failure
                    err = self._setsockopt(fd, level, optname, value)
                    if err:
                        break
                    applied += 1
                return encode_setsockopts_answer(msg.seq, conn.port, applied, err)
            attrs = {t & p.NLA_TYPE_MASK: v for t, v in msg.attrs()}
            if msg.cmd in (SIMCALL_ADD_MEMBERSHIP, SIMCALL_DROP_MEMBERSHIP):
                group = p.get_u32(attrs[SIMCALL_ATTR_GROUP])
                if group not in SIM_GROUPS.values():
                    return errno.EINVAL
                with self._lock:
                    if msg.cmd == SIMCALL_ADD_MEMBERSHIP:
                        conn.groups.add(group)
                    else:
                        conn.groups.discard(group)
                name = next(n for n, gid in SIM_GROUPS.items() if gid == group)
                joined = "joined" if msg.cmd == SIMCALL_ADD_MEMBERSHIP else "left"
                log.info("agent port %d %s %s", conn.port, joined, name)
                return 0
            if msg.cmd == SIMCALL_SETSOCKOPT:
                if fd is None:
                    return errno.EBADF
                return self._setsockopt(fd, p.get_u32(attrs[SIMCALL_ATTR_LEVEL]),
                                        p.get_u32(attrs[SIMCALL_ATTR_OPTNAME]), attrs[SIMCALL_ATTR_OPTVAL])
        except (KeyError, p.ProtocolError):
            return errno.EINVAL
        return errno.EOPNOTSUPP

    # ------------------------------------------------------------ ACCEPT (handshake_nl_accept_doit)

    def _do_accept(self, conn: _Conn, msg: p.GenlMessage) -> int:
        try:
            handler = p.decode_accept_request(msg)
        except p.ProtocolError:
            return errno.EINVAL
        if handler > HANDLER_CLASS_MAX:
            return errno.EINVAL
        with self._lock:
            req = next((r for r in self._pending if handler == p.HandlerClass.TLSHD), None)
            if req is None:
                self.stats.accept_eagain += 1
                return errno.EAGAIN
            self._pending.remove(req)
            req.accepted = True
            self.stats.accepted += 1
            reply = p.encode_accept_reply(SIM_FAMILY_ID, msg.seq, conn.port, req.as_accept(req.consumer_fd))
            mangle, self._mangle = self._mangle, None
            if mangle is not None:
                reply = mangle(reply)
            log.info("ACCEPT port %d: %s", conn.port, _describe(req))
            self._reply(conn, reply, req.held_fd)
        return 0

    # ------------------------------------------------------------ DONE (handshake_nl_done_doit)

    def _do_done(self, msg: p.GenlMessage, fd: int | None) -> int:
        try:
            done = p.decode_done_request(msg)
        except p.ProtocolError:
            return errno.EINVAL
        if fd is None:
            return errno.EBADF  # the named fd is not open in the agent
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return errno.ENOTSOCK
        with self._lock:
            req = self._requests.get(_sock_key(fd))
            if req is None:
                self.stats.done_errors += 1
                return errno.EBUSY
            req.done_calls += 1
            self.stats.done_received += 1
            if req.completed:
                return 0
            status = errno.EIO if done.status is None else done.status
            callback = self._complete(req, status, done.remote_auth[: p.MAX_REMOTE_AUTH])
        log.info("DONE %s: status %d (%s)", _describe(req), status, p.errno_name(status) if status else "ok")
        if callback is not None:
            try:
                callback(status, req.peerid)
            except Exception:
                log.exception("done callback failed")
        return 0

    def _complete(self, req: SimRequest, status: int, remote: tuple[int, ...]) -> DoneCallback | None:
        req.completed = True
        req.status, req.remote_auth = status, remote
        req.peerid = remote[0] if remote else 0
        self._release(req)
        req._finished.set()
        return req.callback

    def _release(self, req: SimRequest) -> None:
        if req.held_fd >= 0:
            os.close(req.held_fd)
            req.held_fd = -1

    # ------------------------------------------------------------ setsockopt (tcp_set_ulp, do_tls_setsockopt_conf)

    def _setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> int:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return errno.ENOTSOCK
        sock = socket.socket(fileno=os.dup(fd))
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                return errno.EOPNOTSUPP
            key = _sock_key(fd)
            with self._lock:
                state = self._ktls.setdefault(key, _KtlsState())
                if level == socket.IPPROTO_TCP and optname == TCP_ULP:
                    if value.rstrip(b"\0") != b"tls":
                        return errno.ENOENT
                    if state.ulp:
                        return errno.EEXIST
                    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
                        return errno.ENOTCONN
                    state.ulp = True
                    return 0
                if level != SOL_TLS or not state.ulp:
                    return errno.ENOPROTOOPT
                if optname == TLS_TX_MAX_PAYLOAD_LEN and self.tx_max_payload_len:
                    return self._set_tx_max_payload(state, self._requests.get(key), value)
                if optname not in (TLS_TX, TLS_RX):
                    return errno.ENOPROTOOPT
                try:
                    info = CryptoInfo.unpack(value)
                except ValueError:
                    return errno.EINVAL
                other = state.rx if optname == TLS_TX else state.tx
                if other is not None and (other.version, other.cipher_type) != (info.version, info.cipher_type):
                    return errno.EINVAL
                if (state.tx if optname == TLS_TX else state.rx) is not None:
                    return errno.EBUSY
                req = self._requests.get(key)
                if optname == TLS_TX:
                    state.tx = info
                    if req is not None:
                        req.ktls_tx = info
                else:
                    state.rx = info
                    if req is not None:
                        req.ktls_rx = info
                return 0
        finally:
            sock.close()


    @staticmethod
    def _set_tx_max_payload(state: _KtlsState, req: SimRequest | None, value: bytes) -> int:
        """do_tls_setsockopt_tx_payload_len: a u16 in 64..16384, 63 allowed once TX is TLS 1.3.

        (Its EBUSY for a record still open in the TX path cannot happen here: the
        simulator's kTLS sockets carry no data.)"""
        if len(value) != 2:
            return errno.EINVAL
        payload = int.from_bytes(value, sys.byteorder)
        tls13 = state.tx is not None and state.tx.version == TLS_1_3_VERSION
        if not RECORD_SIZE_LIMIT_MIN - (1 if tls13 else 0) <= payload <= TLS_MAX_PAYLOAD_SIZE:
            return errno.EINVAL
        state.tx_max_payload = payload
        if req is not None:
            req.ktls_tx_max_payload = payload
        return 0


def _describe(req: SimRequest) -> str:
    role = "client" if req.message_type == p.MessageType.CLIENTHELLO else "server"
    extra = f" peername={req.peername}" if req.peername else ""
    return f"{role}/{req.auth_mode.name.lower()} fd={req.consumer_fd}{extra}"


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead simulator; refuse to steal a live one."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another simulator is serving {path}")


# ---------------------------------------------------------------- CLI


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Consumers:
    """The CLI's stand-in for NFS/NVMe: submits handshakes once an agent listens, prints their DONE."""

    def __init__(self, sim: Simulator, args: argparse.Namespace, stop: threading.Event) -> None:
        self.sim, self.args, self.stop = sim, args, stop
        self.sockets: list[socket.socket] = []
        self.requests: list[SimRequest] = []
        self.failed = False

    def _wait_for_agent(self) -> bool:
        while not self.sim.listeners():
            if self.stop.wait(0.1):
                return False
        return True

    def _report(self, what: str) -> DoneCallback:
        def done(status: int, peerid: int) -> None:
            print(f"{what}: DONE status {status} ({p.errno_name(status) if status else 'ok'}) peerid {peerid}",
                  flush=True)
        return done

    def run_clients(self) -> None:
        if not self._wait_for_agent():
            return
        for host, port in self.args.client_anon:
            what = f"client {host}:{port}"
            try:
                sock = socket.create_connection((host, port), timeout=10)
                self.sockets.append(sock)
                self.requests.append(self.sim.client_hello_anon(
                    sock, peername=self.args.peername or host, timeout_ms=self.args.timeout_ms,
                    done=self._report(what)))
            except OSError as exc:
                print(f"hsd-sim: {what}: {exc.strerror or exc}", file=sys.stderr, flush=True)
                self.failed = True
        if self.args.once:
            for req in self.requests:
                try:
                    req.wait(self.args.timeout_ms / 1000 + 5)
                except TimeoutError:
                    print(f"hsd-sim: no DONE for fd {req.consumer_fd}; cancelled", file=sys.stderr, flush=True)
                    self.sim.cancel(req.sock)
                    self.failed = True
            self.failed |= any(req.status for req in self.requests)
            self.stop.set()

    def run_server(self, listener: socket.socket) -> None:
        listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                sock, peer = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.sockets.append(sock)
            what = f"server for {peer[0]}:{peer[1]}"
            try:
                self.sim.server_hello_x509(sock, timeout_ms=self.args.timeout_ms, done=self._report(what))
            except OSError as exc:
                print(f"hsd-sim: {what}: {exc.strerror}", file=sys.stderr, flush=True)
                sock.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    """hsd-sim: run the simulated kernel on a unix socket until SIGINT/SIGTERM.

    With --client-anon / --server-x509 it also plays the kernel consumer: TCP
    connections to (or accepted on) the given addresses are handed to the agent
    that joined, and each DONE is printed."""
    parser = argparse.ArgumentParser(prog="hsd-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="unix socket path agents connect to")
    parser.add_argument("--pending-max", type=int, default=None, help="pending request cap (default: like the kernel)")
    parser.add_argument("--client-anon", type=_host_port, action="append", default=[], metavar="HOST:PORT",
                        help="connect there and submit a client hello (unauth) once an agent listens")
    parser.add_argument("--peername", help="peer name for --client-anon (default: the host)")
    parser.add_argument("--server-x509", type=_host_port, metavar="HOST:PORT",
                        help="listen there and submit a server hello (x509) per accepted connection")
    parser.add_argument("--timeout-ms", type=int, default=10000, help="timeout hint sent with each request")
    parser.add_argument("--once", action="store_true",
                        help="exit when every --client-anon request is done (status 1 if any failed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    stop = threading.Event()
    stopping: list[int] = []  # the handler only appends: Event.set would take a lock the main thread may hold
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda got, _frame: stopping.append(got))
    try:
        sim = Simulator(args.socket, args.pending_max).start()
    except OSError as exc:
        print(f"hsd-sim: cannot listen on {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    consumers = _Consumers(sim, args, stop)
    threads = []
    listener = None
    try:
        if args.server_x509:
            try:
                listener = socket.create_server(args.server_x509)
            except OSError as exc:
                print(f"hsd-sim: cannot listen on {args.server_x509[0]}:{args.server_x509[1]}: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return 1
            threads.append(threading.Thread(target=consumers.run_server, args=(listener,), daemon=True))
        if args.client_anon:
            threads.append(threading.Thread(target=consumers.run_clients, daemon=True))
        for thread in threads:
            thread.start()
        while not stopping and not stop.wait(0.5):
            pass
        stop.set()
        for thread in threads:
            thread.join(5)
    finally:
        if listener is not None:
            listener.close()
        consumers.close()
        sim.stop()
    print("hsd-sim: stopped", flush=True)
    return 1 if consumers.failed else 0


if __name__ == "__main__":
    sys.exit(main())
