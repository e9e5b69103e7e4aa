"""Joining the `tlshd` group first, loading everything else afterwards.

Why: until an agent has joined the handshake family's `tlshd` multicast group
the kernel fails every consumer request at once with ESRCH (a mount or an NVMe
connect at boot, or during a restart, simply fails).  Once someone has joined,
the kernel queues requests until they are ACCEPTed.  So `hsd` joins with
nothing but the socket and struct modules, and only then imports its
configuration, the dispatcher, the plugins and their TLS libraries; requests
that arrive meanwhile wait in the kernel's queue, and the dispatcher's first
pass ACCEPTs until EAGAIN.

Hence this module imports of hsd only hsd.nlwire (struct alone), the netlink
codec hsd.protocol is built on, and no dataclasses, enum or logging: each of
those costs milliseconds of a join budget of tens (figures in
docs/performance.md, "Start-up").  tests/test_startup.py checks its reading of
the real kernel's answers against pyroute2's.

pyroute2 stays the netlink library of record, but its package import alone
costs 130-190 ms (its ``__init__`` imports every socket class it has, IPRoute,
NDB, ...): more than the whole budget.  The join resolves the family itself and
hands it to hsd.netlink_channel, which then needs no pyroute2 either; pyroute2's
reading (hsd.netlink_channel.resolve_family) is the fallback for an answer this
module cannot parse.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from .nlwire import (NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, ProtocolError, attr, error_of,
                     frames, genl_message, getfamily_request, parse_family)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
FAMILY_NAME, GROUP_NAME = "handshake", "tlshd"
# the simulator's stand-in for setsockopt(NETLINK_ADD_MEMBERSHIP) (hsd.sim_channel.SIMCALL_*)
SIMCALL_TYPE, SIMCALL_ADD_MEMBERSHIP, SIMCALL_ATTR_GROUP = 0x0F, 1, 1
REPLY_TIMEOUT = 5.0

NO_FAMILY = ("this kernel has no 'handshake' generic-netlink family: "
             "hsd needs Linux >= 6.4 built with CONFIG_NET_HANDSHAKE")  # hsd.netlink_channel's words


class JoinError(RuntimeError):
    """The group cannot be joined; the message is the one line hsd prints."""


def read_reply(data: bytes, seq: int) -> tuple[int, bytes] | None:
    """(errno, genl payload) of the message answering seq in one datagram; errno 0 for an answer or ACK."""
    for mtype, _flags, mseq, _pid, body in frames(data):
        if mseq != seq:
            continue
        if mtype == NLMSG_ERROR:
            return error_of(body), b""
        if len(body) < 4:
            raise ProtocolError("truncated generic-netlink header")
        return 0, body[4:]
    return None


def _transact(sock: socket.socket, request: bytes, seq: int) -> tuple[int, bytes]:
    sock.settimeout(REPLY_TIMEOUT)
    try:
        sock.send(request)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the peer closed the connection")
            answer = read_reply(data, seq)
            if answer is not None:
                return answer
    finally:
        sock.settimeout(None)


def lookup_family(sock: socket.socket, name: str) -> tuple[int, int, dict[str, int]]:
    """CTRL_CMD_GETFAMILY on sock: FileNotFoundError if there is no such family, OSError for other errors."""
    error, payload = _transact(sock, getfamily_request(name, 1), 1)
    if error == errno.ENOENT:
        raise FileNotFoundError(errno.ENOENT, f"no generic-netlink family {name!r}")
    if error:
        raise OSError(error, f"CTRL_CMD_GETFAMILY {name!r}: {os.strerror(error)}")
    family_id, _name, version, groups = parse_family(payload)
    return family_id, version, groups


class EarlyJoin:
    """A membership of the `tlshd` group held while the daemon loads.

    `take()` gives the parent process its real channel, which joins on its own
    connection before this one is closed: the group never empties, and what
    the kernel queued meanwhile is ACCEPTed by the dispatcher's first pass.  A
    forked worker's take() closes its copy and returns None (it opens its own)."""

    def __init__(self, sock: socket.socket | None = None, *, family: tuple[int, int, dict[str, int]] | None = None,
                 simulator: str | None = None) -> None:
        self._sock = sock
        self.family_fields = family  # (id, version, groups) of the handshake family; None for the simulator
        self.simulator = simulator
        self._owner = os.getpid()

    @classmethod
    def kernel(cls) -> "EarlyJoin":
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        try:
            sock.bind((0, 0))
            try:
                family = lookup_family(sock, FAMILY_NAME)
            except FileNotFoundError:
                raise JoinError(NO_FAMILY) from None
            except ProtocolError:  # an answer the light codec cannot read: pyroute2 gets a try
                family = _pyroute2_family()
            group = family[2].get(GROUP_NAME)
            if group is None:
                raise JoinError("the handshake family has no 'tlshd' multicast group")
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            except OSError as exc:
                raise JoinError(f"cannot join the 'tlshd' multicast group: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, family=family)

    @classmethod
    def simulator_at(cls, address: str) -> "EarlyJoin":
        """The same for hsd-sim at address: its GETFAMILY, then its stand-in for ADD_MEMBERSHIP."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
            _, _, groups = lookup_family(sock, FAMILY_NAME)
            group = groups.get(GROUP_NAME)
            if group is None:
                raise JoinError("the simulator's handshake family has no 'tlshd' multicast group")
            request = genl_message(SIMCALL_TYPE, NLM_F_REQUEST | NLM_F_ACK, 2, 0, SIMCALL_ADD_MEMBERSHIP, 1,
                                   attr(SIMCALL_ATTR_GROUP, struct.pack("=I", group)))
            error, _ = _transact(sock, request, 2)
            if error:
                raise OSError(error, f"cannot join the tlshd group: {os.strerror(error)}")
        except ProtocolError as exc:
            sock.close()
            raise JoinError(f"the simulator at {address} answered something that is not netlink: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, simulator=address)

    @property
    def joined(self) -> bool:
        return self._sock is not None

    def family(self):  # -> hsd.protocol.FamilyInfo (imported late on purpose)
        from . import protocol as p

        family_id, version, groups = self.family_fields or (0, 0, {})
        return p.FamilyInfo(family_id, FAMILY_NAME, version or p.FAMILY_VERSION, dict(groups))

    def take(self):  # -> hsd.channel.Channel | None
        """The parent's channel, once (the early membership ends here); None in a forked worker or once taken."""
        if os.getpid() != self._owner or not self.joined:
            self.discard()
            return None
        try:
            if self.simulator is not None:
                from .sim_channel import SimChannel

                return SimChannel.connect(self.simulator)  # joins before ours leaves
            from .netlink_channel import NetlinkChannel

            return NetlinkChannel(self.family())  # joins before ours leaves: never a moment without a listener
        finally:
            self.discard()

    def discard(self) -> None:
        """Close this process's copy: the parent's after take() or on a refused start, a forked worker's copy."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _pyroute2_family() -> tuple[int, int, dict[str, int]]:
    from .netlink_channel import KernelUnsupported, resolve_family  # pyroute2's reading of the same request

    try:
        info = resolve_family()
    except KernelUnsupported as exc:
        raise JoinError(str(exc)) from None
    return info.id, info.version, dict(info.groups)
