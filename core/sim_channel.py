"""The agent's edge to the kernel simulator: SimChannel, the channel `hsd --simulator` serves.

Why here: the daemon can serve the simulated kernel (hsd_kit.simulator, which
models net/handshake and the tls ULP) exactly as it serves the real one, so its
edge to it is daemon code, while the simulated kernel itself is kit.

The wire is the real family's (hsd.protocol) over an AF_UNIX SOCK_SEQPACKET
socket, plus three syscalls framed as netlink messages of a private type,
SIMCALL_TYPE (0x0f, inside the range netlink reserves for control messages, so
it can never collide with a family id), with a generic-netlink header whose cmd
says which call, answered by an NLMSG_ERROR (0 = success, else the errno the
syscall would set):
  SIMCALL_ADD_MEMBERSHIP / SIMCALL_DROP_MEMBERSHIP: attr 1 = group id (u32);
      setsockopt(SOL_NETLINK, NETLINK_ADD/DROP_MEMBERSHIP).
  SIMCALL_SETSOCKOPT: attr 1 = level (u32), attr 2 = optname (u32),
      attr 3 = optval (bytes); the target socket travels with SCM_RIGHTS.
  SIMCALL_SETSOCKOPTS: several setsockopt on one socket in one round trip (the
      kTLS install: ULP, TX, RX): attr 4 (nested, repeated) = one call's attrs
      1-3.  The simulator runs them in order, each with the checks of its own
      syscall, and stops at the first that fails; it answers with a SIMCALL
      message of the same cmd: attr 1 = calls that succeeded (u32), attr 2 = the
      errno of the next one (u32, 0 when all did).  SimKtls replays that answer
      call by call through hsd.ktls.install_via, so the sequence, the errors
      tolerated (EEXIST on the ULP) and their messages stay those of the real
      syscalls; a call after a tolerated failure goes in a new batch.
The edge does two things the kernel would do in the agent's context: it puts the
number the handed-over fd got here into HandshakeRequest.sockfd, and it links
the request's keyring into this process's keyring.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import os
import select
import socket
import struct
import threading
from typing import Any

from . import keyring as keyrings
from . import protocol as p
from .channel import OVERRUN
from .ktls import SOL_TLS, TCP_ULP, TLS_RX, TLS_TX, TLS_TX_MAX_PAYLOAD_LEN, CryptoInfo, install_via
from .secret import wipe

SIM_FAMILY_ID = 0x1E  # dynamic in the kernel; agents must resolve it with GETFAMILY
SIM_GROUPS = {p.MCGRP_NONE: 0x0B, p.MCGRP_TLSHD: 0x0C}
SIMCALL_TYPE = 0x0F
SIMCALL_ADD_MEMBERSHIP = 1
SIMCALL_DROP_MEMBERSHIP = 2
SIMCALL_SETSOCKOPT = 3
SIMCALL_SETSOCKOPTS = 4
SIMCALL_ATTR_GROUP = 1
SIMCALL_ATTR_LEVEL = 1
SIMCALL_ATTR_OPTNAME = 2
SIMCALL_ATTR_OPTVAL = 3
SIMCALL_ATTR_CALL = 4
SIMCALL_ATTR_APPLIED = 1  # in the SIMCALL_SETSOCKOPTS answer
SIMCALL_ATTR_ERRNO = 2

MAX_DATAGRAM = 65536
MAX_FDS = 8
REPLY_TIMEOUT = 10.0  # an agent edge waits this long for the "kernel" before giving up
# plain ints, computed once: `|` on socket's IntFlag members costs microseconds per reply
_RECV_WAIT = int(socket.MSG_CMSG_CLOEXEC)
_RECV_NOWAIT = int(socket.MSG_CMSG_CLOEXEC) | int(socket.MSG_DONTWAIT)
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


def fds_from_ancdata(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def scm_rights(fd: int | None) -> list:
    """Ancillary data passing one fd (the way both sides name a socket to each other)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def simcall(cmd: int, seq: int, attrs: bytes) -> bytes:
    """A private syscall-emulation message (see the module docstring)."""
    return p.GenlMessage(SIMCALL_TYPE, p.NLM_F_REQUEST | p.NLM_F_ACK, seq, 0, cmd, 1, attrs).encode()


def encode_setsockopt(seq: int, level: int, optname: int, optval: bytes) -> bytes:
    return simcall(SIMCALL_SETSOCKOPT, seq, p.attr_u32(SIMCALL_ATTR_LEVEL, level)
                   + p.attr_u32(SIMCALL_ATTR_OPTNAME, optname) + p.attr(SIMCALL_ATTR_OPTVAL, optval))


def encode_setsockopts(seq: int, calls: list[tuple[int, int, bytes | bytearray]]) -> bytearray:
    """SIMCALL_SETSOCKOPTS in a bytearray the caller wipes: the values (keys) are copied only into it.

    Sized once and filled in place: a growing bytearray would be reallocated and leave
    the values copied so far in freed memory."""
    parts = []
    for level, optname, value in calls:
        head = p.attr_u32(SIMCALL_ATTR_LEVEL, level) + p.attr_u32(SIMCALL_ATTR_OPTNAME, optname)
        length = p.NLA_HDR.size + len(value)
        parts.append((p.NLA_HDR.pack(p.NLA_HDR.size + len(head) + p.align(length), SIMCALL_ATTR_CALL | p.NLA_F_NESTED)
                      + head + p.NLA_HDR.pack(length, SIMCALL_ATTR_OPTVAL), value, p.align(length) - length))
    size = sum(len(head) + len(value) + pad for head, value, pad in parts)
    message = bytearray(p.GenlMessage(SIMCALL_TYPE, p.NLM_F_REQUEST, seq, 0, SIMCALL_SETSOCKOPTS, 1,
                                      bytes(size)).encode())
    pos = len(message) - size
    for head, value, pad in parts:
        message[pos:pos + len(head)] = head
        pos += len(head)
        message[pos:pos + len(value)] = value
        pos += len(value) + pad
    return message


def decode_setsockopts(msg: p.GenlMessage) -> list[tuple[int, int, bytes]]:
    """The calls of a SIMCALL_SETSOCKOPTS request (the simulator's side); ProtocolError/KeyError if malformed."""
    calls = []
    for atype, payload in msg.attrs():
        if atype & p.NLA_TYPE_MASK != SIMCALL_ATTR_CALL:
            raise p.ProtocolError(f"unexpected attribute {atype} in SIMCALL_SETSOCKOPTS")
        inner = {t & p.NLA_TYPE_MASK: v for t, v in p.parse_attrs(payload)}
        calls.append((p.get_u32(inner[SIMCALL_ATTR_LEVEL]), p.get_u32(inner[SIMCALL_ATTR_OPTNAME]),
                      inner[SIMCALL_ATTR_OPTVAL]))
    return calls


def encode_setsockopts_answer(seq: int, pid: int, applied: int, err: int) -> bytes:
    return p.GenlMessage(SIMCALL_TYPE, 0, seq, pid, SIMCALL_SETSOCKOPTS, 1,
                         p.attr_u32(SIMCALL_ATTR_APPLIED, applied) + p.attr_u32(SIMCALL_ATTR_ERRNO, err)).encode()


class _Endpoint:
    """One agent connection (a simulated netlink socket) with request/reply matched by seq."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(address)
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.lock = threading.Lock()
        self.seq = 0
        self.port = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, data: bytes, fd: int | None = None) -> None:
        self.sock.sendmsg([data], scm_rights(fd))

    def recv(self, timeout: float | None = REPLY_TIMEOUT) -> tuple[bytes, list[int]]:
        """One datagram within timeout (None: wait; 0: only one already there, else BlockingIOError).

        The socket stays blocking: poll() and MSG_DONTWAIT instead of settimeout(), which costs two
        fcntl/ioctl calls around every reply (docs/performance.md, "Per-handshake cost")."""
        flags = _RECV_WAIT
        if timeout is not None:
            flags = _RECV_NOWAIT
            if timeout > 0 and not self.poller.poll(timeout * 1000):
                raise socket.timeout("timed out")
        data, ancdata, _, _ = self.sock.recvmsg(MAX_DATAGRAM, _ANCILLARY_SPACE, flags)
        if not data:
            raise ConnectionError("the simulator closed the connection")
        return data, fds_from_ancdata(ancdata)

    def transact(self, data: bytes, fd: int | None = None) -> tuple[list[p.Message], list[int], bytes]:
        """Send one request and collect its answer: (messages, fds, raw bytes); caller holds the lock.

        Replies to earlier requests (whose caller gave up) are discarded."""
        seq = p.NLMSG_HDR.unpack_from(data)[3]
        self.send(data, fd)
        while True:
            try:
                raw, fds = self.recv()
            except socket.timeout:
                raise TimeoutError("the simulator did not answer") from None
            try:
                msgs = p.split_messages(raw)
            except p.ProtocolError:
                return [], fds, raw  # let the caller decide (a mangled reply)
            if not msgs or any(m.seq == seq for m in msgs):
                return msgs, fds, raw
            close_all(fds)

    def call(self, data: bytes, fd: int | None = None) -> int:
        """A request answered by NLMSG_ERROR only: the errno (0 = ACK)."""
        msgs, fds, _ = self.transact(data, fd)
        close_all(fds)
        for m in msgs:
            if isinstance(m, p.NetlinkError):
                return m.error
        raise p.ProtocolError("expected an ACK")

    def close(self) -> None:
        self.sock.close()


class SimChannel:
    """The agent's edge to the simulator: hsd.channel.Channel over two simulated netlink sockets.

    `_ready` joined the tlshd group and only ever receives READY; `_req`
    carries ACCEPT, DONE and setsockopt, one exchange at a time."""

    def __init__(self, ready: _Endpoint, req: _Endpoint, family: p.FamilyInfo) -> None:
        self._ready = ready
        self._req = req
        self.family = family
        self.ktls = SimKtls(self)

    @classmethod
    def connect(cls, address: str) -> "SimChannel":
        """Join the simulator at address.  From now on this process keeps peer-certificate keys in its own
        keyring: an agent serving a simulator must leave nothing in root's real user keyring."""
        from .identity import keep_peer_keys_private

        keep_peer_keys_private()
        req = _Endpoint(address)
        ready = _Endpoint(address)
        try:
            family = cls._resolve(req)
            cls._resolve(ready)  # learns this connection's port id too
            group = family.groups.get(p.MCGRP_TLSHD)
            if group is None:
                raise p.ProtocolError("the handshake family has no tlshd group")
            err = ready.call(simcall(SIMCALL_ADD_MEMBERSHIP, ready.next_seq(), p.attr_u32(SIMCALL_ATTR_GROUP, group)))
            if err:
                raise OSError(err, f"cannot join the tlshd group: {os.strerror(err)}")
        except BaseException:
            req.close()
            ready.close()
            raise
        return cls(ready, req, family)

    @staticmethod
    def _resolve(ep: _Endpoint) -> p.FamilyInfo:
        msgs, fds, _ = ep.transact(p.encode_getfamily(p.FAMILY_NAME, ep.next_seq()))
        close_all(fds)
        for m in msgs:
            if isinstance(m, p.NetlinkError) and m.error:
                raise OSError(m.error, f"handshake family not found: {os.strerror(m.error)}")
            if isinstance(m, p.GenlMessage):
                ep.port = m.pid
                return p.decode_newfamily(m)
        raise p.ProtocolError("no answer to CTRL_CMD_GETFAMILY")

    def fileno(self) -> int:
        return self._ready.sock.fileno()

    def wait_ready(self, timeout: float | None) -> int:
        """READY count, 0 on timeout, OVERRUN if the simulator reported lost notifications."""
        if not select.select([self._ready.sock], [], [], timeout)[0]:
            return 0
        count, overrun = 0, False
        while True:
            try:
                raw, fds = self._ready.recv(0.0) if count or overrun else self._ready.recv(None)
            except (socket.timeout, BlockingIOError):
                break
            close_all(fds)
            for m in p.split_messages(raw):
                if isinstance(m, p.NetlinkError) and m.error == errno.ENOBUFS:
                    overrun = True
                elif p.is_ready(m, self.family.id):
                    count += 1
        return OVERRUN if overrun else count

    def accept(self) -> p.HandshakeRequest | None:
        """ACCEPT; the handed-over socket is installed O_CLOEXEC and its number replaces the reply's sockfd."""
        with self._req.lock:
            msgs, fds, raw = self._req.transact(p.encode_accept(self.family.id, self._req.next_seq()))
        fd = fds[0] if fds else None
        close_all(fds[1:])
        for m in msgs:
            if isinstance(m, p.NetlinkError):
                close_all(fds[:1])
                if m.error == errno.EAGAIN:
                    return None
                raise OSError(m.error, f"ACCEPT failed: {os.strerror(m.error)}")
        try:
            if len(msgs) != 1 or not isinstance(msgs[0], p.GenlMessage):
                raise p.ProtocolError(f"malformed ACCEPT reply ({len(raw)} bytes)")
            req = p.decode_accept_reply(msgs[0])
            if fd is None:
                raise p.ProtocolError("ACCEPT reply carried no socket")
        except p.ProtocolError as exc:
            raise p.ProtocolError(str(exc), fd) from None
        if req.keyring:
            self._link_keyring(req.keyring, fd)
        return dataclasses.replace(req, sockfd=fd)

    def _link_keyring(self, ring: int, fd: int) -> None:
        """The kernel links ta_keyring into the caller's process keyring (tls_handshake_private_keyring).

        That must happen in the agent's own context, so the edge does it.  On
        failure the kernel fails the ACCEPT and completes the request with EIO:
        so does the edge (DONE EIO, fd closed, the errno raised)."""
        try:
            keyrings.link(ring, keyrings.keyring_id(keyrings.KEY_SPEC_PROCESS_KEYRING, create=True))
        except OSError as exc:
            self.done(p.Done(fd, errno.EIO))
            os.close(fd)
            raise OSError(exc.errno, f"ACCEPT failed: cannot link keyring {ring}: {os.strerror(exc.errno)}") from None

    def done(self, done: p.Done) -> int:
        """DONE with the named fd attached (the kernel's fd lookup); EBADF if it is not open here."""
        with self._req.lock:
            if self._req.sock.fileno() < 0:
                raise ConnectionError("the channel is closed")
            data = p.encode_done(self.family.id, self._req.next_seq(), done)
            try:
                return self._req.call(data, done.sockfd)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    return errno.EBADF  # sendmsg could not attach it: no such fd in this process
                raise

    def setsockopt(self, fd: int, level: int, optname: int, value: bytes) -> int:
        """The setsockopt emulation: 0 or the errno the kernel would set.

        The value (a crypto_info holds keys) is spliced into a bytearray that is
        zeroed once sent: like the real syscall, the agent keeps no copy of it."""
        with self._req.lock:
            message = bytearray(encode_setsockopt(self._req.next_seq(), level, optname, bytes(len(value))))
            end = len(message) - (-len(value) % 4)  # the value is the last attribute, then its padding
            message[end - len(value):end] = value
            try:
                return self._req.call(message, fd)
            finally:
                wipe(message)

    def setsockopts(self, fd: int, calls: list[tuple[int, int, bytes | bytearray]]) -> tuple[int, int]:
        """Several emulated setsockopt on fd in one round trip: (how many succeeded, errno of the next or 0).

        The message holding the values is zeroed once sent, as in setsockopt()."""
        with self._req.lock:
            message = encode_setsockopts(self._req.next_seq(), calls)
            try:
                msgs, fds, raw = self._req.transact(message, fd)
            finally:
                wipe(message)
        close_all(fds)
        for m in msgs:
            if isinstance(m, p.NetlinkError) and m.error:
                return 0, m.error  # refused as a whole (no socket attached): the first call's errno
            if isinstance(m, p.GenlMessage) and m.type == SIMCALL_TYPE and m.cmd == SIMCALL_SETSOCKOPTS:
                try:
                    attrs = {t & p.NLA_TYPE_MASK: v for t, v in m.attrs()}
                    return p.get_u32(attrs[SIMCALL_ATTR_APPLIED]), p.get_u32(attrs[SIMCALL_ATTR_ERRNO])
                except KeyError:
                    break
        raise p.ProtocolError(f"malformed SIMCALL_SETSOCKOPTS answer ({len(raw)} bytes)")

    def close(self) -> None:
        self._ready.close()
        self._req.close()


class SimKtls:
    """hsd.ktls.KtlsInstaller for the simulated kernel: the same setsockopt calls as KernelKtls."""

    def __init__(self, channel: SimChannel) -> None:
        self._channel = channel

    def setsockopt(self, sock: socket.socket, level: int, optname: int, value: bytes) -> None:
        """One emulated setsockopt; raises OSError like the syscall."""
        err = self._channel.setsockopt(sock.fileno(), level, optname, value)
        if err:
            raise OSError(err, os.strerror(err))

    def install(self, sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo,
                tx_max_payload: int | None = None) -> None:
        """install_via's calls, sent as one SIMCALL_SETSOCKOPTS (one round trip instead of three or four)."""
        plan: list[tuple[int, int, bytes | bytearray]] = [(socket.IPPROTO_TCP, TCP_ULP, b"tls"),
                                                          (SOL_TLS, TLS_TX, tx.pack()), (SOL_TLS, TLS_RX, rx.pack())]
        if tx_max_payload is not None:
            plan.append((SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", tx_max_payload)))
        batch = _Batch(self, sock, plan)
        try:
            install_via(batch.setsockopt, tx, rx, no_ulp="kernel TLS is not available (tls ULP unknown)",
                        tx_max_payload=tx_max_payload)
        finally:
            for _level, _optname, value in plan:
                if isinstance(value, bytearray):
                    wipe(value)


class _Batch:
    """install_via's setsockopt, answered from SIMCALL_SETSOCKOPTS results of the planned calls.

    The first call sends it and every planned call from there on; each call
    then gets its own result (success, its errno, as the syscall would have).
    A call past a failure (install_via goes on after EEXIST on the ULP) sends
    the rest again; a call that is not the next planned one goes alone."""

    def __init__(self, ktls: SimKtls, sock: socket.socket, plan: list[tuple[int, int, bytes | bytearray]]) -> None:
        self._ktls = ktls
        self._sock = sock
        self._plan = plan
        self._next = 0
        self._results: dict[int, int] = {}

    def setsockopt(self, level: int, optname: int, value: Any) -> None:
        index = self._next
        if index >= len(self._plan) or self._plan[index][:2] != (level, optname) or self._plan[index][2] != value:
            self._ktls.setsockopt(self._sock, level, optname, value)
            return
        self._next += 1
        if index not in self._results:
            applied, err = self._ktls._channel.setsockopts(self._sock.fileno(), self._plan[index:])
            self._results = {index + i: 0 for i in range(applied)}
            if err:
                self._results[index + applied] = err
        err = self._results.get(index, 0)
        if err:
            raise OSError(err, os.strerror(err))
