"""Joining the `tlshd` group first, loading everything else afterwards.

Why: until an agent has joined the handshake family's `tlshd` multicast group
the kernel fails every consumer request at once with ESRCH (a mount or an NVMe
connect at boot, or during a restart, simply fails).  Once someone has joined,
the kernel queues requests until they are ACCEPTed.  So `hsd` joins with
nothing but the socket and struct modules, and only then imports its
configuration, the dispatcher, the plugins and their TLS libraries; requests
that arrive meanwhile wait in the kernel's queue, and the dispatcher's first
pass ACCEPTs until EAGAIN.

Hence this module imports nothing of hsd and no dataclasses, enum or logging:
each of those costs milliseconds of a join budget of tens (figures in
docs/performance.md, "Start-up").  It carries the few netlink constants and the
one request it needs, CTRL_CMD_GETFAMILY; tests/test_startup.py checks them
against hsd.protocol's codec and the simulator's, and its reading of the real
kernel's answers against pyroute2's.

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

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("=BBH")
NLA_HDR = struct.Struct("=HH")
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x01, 0x04
NLA_TYPE_MASK = 0x3FFF
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_VERSION, CTRL_ATTR_MCAST_GROUPS = 1, 2, 3, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
FAMILY_NAME, GROUP_NAME = "handshake", "tlshd"
# the simulator's stand-in for setsockopt(NETLINK_ADD_MEMBERSHIP) (hsd.sim_channel.SIMCALL_*)
SIMCALL_TYPE, SIMCALL_ADD_MEMBERSHIP, SIMCALL_ATTR_GROUP = 0x0F, 1, 1
REPLY_TIMEOUT = 5.0

NO_FAMILY = ("this kernel has no 'handshake' generic-netlink family: "
             "hsd needs Linux >= 6.4 built with CONFIG_NET_HANDSHAKE")  # hsd.netlink_channel's words


class JoinError(RuntimeError):
    """The group cannot be joined; the message is the one line hsd prints."""


class Unparsable(ValueError):
    """An answer this module's small decoder cannot read (pyroute2 gets a try)."""


def _attr(atype: int, payload: bytes) -> bytes:
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, atype) + payload + b"\0" * (-length % 4)


def _attrs(buf: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + NLA_HDR.size <= len(buf):
        length, atype = NLA_HDR.unpack_from(buf, pos)
        if length < NLA_HDR.size or pos + length > len(buf):
            raise Unparsable(f"attribute length {length} out of bounds")
        out.append((atype & NLA_TYPE_MASK, buf[pos + NLA_HDR.size:pos + length]))
        pos += (length + 3) & ~3
    return out


def _message(mtype: int, flags: int, seq: int, cmd: int, payload: bytes) -> bytes:
    body = GENL_HDR.pack(cmd, 1, 0) + payload
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), mtype, flags, seq, 0) + body


def getfamily_request(name: str, seq: int) -> bytes:
    return _message(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY,
                    _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))


def read_reply(data: bytes, seq: int) -> tuple[int, bytes] | None:
    """(errno, genl payload) of the message answering seq in one datagram; errno 0 for an answer or ACK."""
    pos = 0
    while pos + NLMSG_HDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = NLMSG_HDR.unpack_from(data, pos)
        if length < NLMSG_HDR.size or pos + length > len(data):
            raise Unparsable(f"netlink length {length} out of bounds")
        body = data[pos + NLMSG_HDR.size:pos + length]
        pos += (length + 3) & ~3
        if mseq != seq:
            continue
        if mtype == NLMSG_ERROR:
            if len(body) < 4:
                raise Unparsable("truncated netlink error")
            return -struct.unpack_from("=i", body)[0], b""
        if len(body) < GENL_HDR.size:
            raise Unparsable("truncated generic-netlink header")
        return 0, body[GENL_HDR.size:]
    return None


def parse_family(payload: bytes) -> tuple[int, int, dict[str, int]]:
    """(family id, version, {group name: group id}) from a CTRL_CMD_NEWFAMILY payload."""
    family_id, version, groups = 0, 0, {}
    for atype, value in _attrs(payload):
        if atype == CTRL_ATTR_FAMILY_ID and len(value) == 2:
            family_id = struct.unpack("=H", value)[0]
        elif atype == CTRL_ATTR_VERSION and len(value) == 4:
            version = struct.unpack("=I", value)[0]
        elif atype == CTRL_ATTR_MCAST_GROUPS:
            for _, group in _attrs(value):
                fields = dict(_attrs(group))
                name, gid = fields.get(CTRL_ATTR_MCAST_GRP_NAME), fields.get(CTRL_ATTR_MCAST_GRP_ID)
                if name is not None and gid is not None and len(gid) == 4:
                    groups[name.split(b"\0", 1)[0].decode("ascii", "replace")] = struct.unpack("=I", gid)[0]
    if not family_id:
        raise Unparsable("family reply without an id")
    return family_id, version, groups


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
    return parse_family(payload)


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
            except Unparsable:
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
            request = _message(SIMCALL_TYPE, NLM_F_REQUEST | NLM_F_ACK, 2, SIMCALL_ADD_MEMBERSHIP,
                               _attr(SIMCALL_ATTR_GROUP, struct.pack("=I", group)))
            error, _ = _transact(sock, request, 2)
            if error:
                raise OSError(error, f"cannot join the tlshd group: {os.strerror(error)}")
        except Unparsable as exc:
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
