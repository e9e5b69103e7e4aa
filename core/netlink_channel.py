"""The real kernel edge: the `handshake` generic-netlink family.

pyroute2 resolves the family and its multicast groups (CTRL_CMD_GETFAMILY);
the traffic itself is hsd.protocol bytes on two plain netlink sockets: one
joined to the `tlshd` group that only hears READY, one for ACCEPT/DONE
request-reply, so replies and notifications never interleave.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import threading

from . import protocol as p
from .channel import OVERRUN
from .ktls import KernelKtls

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11


class KernelUnsupported(RuntimeError):
    """The running kernel cannot serve hsd (no handshake family, no permission, ...)."""


def resolve_family() -> p.FamilyInfo:
    """Family id and groups, or KernelUnsupported with one clear sentence."""
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    class _AnyMsg(genlmsg):
        nla_map = (("HANDSHAKE_A_UNSPEC", "none"),)

    gs = GenericNetlinkSocket()
    try:
        gs.bind(p.FAMILY_NAME, _AnyMsg)
        return p.FamilyInfo(gs.prid, p.FAMILY_NAME, p.FAMILY_VERSION, dict(gs.mcast_groups))
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            raise KernelUnsupported(
                "this kernel has no 'handshake' generic-netlink family: "
                "hsd needs Linux >= 6.4 built with CONFIG_NET_HANDSHAKE") from None
        raise KernelUnsupported(f"cannot resolve the handshake family: {exc}") from None
    finally:
        gs.close()


class NetlinkChannel:
    def __init__(self, family: p.FamilyInfo | None = None) -> None:
        self.family = family or resolve_family()
        group = self.family.groups.get(p.MCGRP_TLSHD)
        if group is None:
            raise KernelUnsupported("the handshake family has no 'tlshd' multicast group")
        self.ktls = KernelKtls()
        self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._events.bind((0, 0))
        try:
            self._events.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            raise KernelUnsupported(f"cannot join the 'tlshd' multicast group: {exc.strerror}") from None
        self._events.setblocking(False)
        self._control = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._control.bind((0, 0))
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def fileno(self) -> int:
        return self._events.fileno()

    def wait_ready(self, timeout: float | None) -> int:
        ready, _, _ = select.select([self._events], [], [], timeout)
        if not ready:
            return 0
        count = 0
        while True:
            try:
                data = self._events.recv(65536)
            except BlockingIOError:
                return count
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # notifications were lost: drain the queue
                    log.warning("netlink notifications overran; draining the handshake queue")
                    return OVERRUN
                raise
            try:
                msgs = p.split_messages(data)
            except p.ProtocolError as exc:
                log.debug("ignoring malformed notification: %s", exc)
                continue
            count += sum(1 for m in msgs if p.is_ready(m, self.family.id))

    def _request(self, data: bytes, seq: int) -> list[p.Message]:
        self._control.send(data)
        while True:
            reply = self._control.recv(65536)
            msgs = [m for m in p.split_messages(reply) if m.seq == seq]
            if msgs:
                return msgs

    def accept(self) -> p.HandshakeRequest | None:
        with self._lock:
            seq = next(self._seq)
            msgs = self._request(p.encode_accept(self.family.id, seq), seq)
        for msg in msgs:
            if isinstance(msg, p.NetlinkError):
                if msg.error == errno.EAGAIN:
                    return None
                if msg.error == errno.EPERM:
                    raise PermissionError(errno.EPERM, "ACCEPT needs CAP_NET_ADMIN")
                raise OSError(msg.error, f"ACCEPT failed: {p.errno_name(msg.error)}")
            return p.decode_accept_reply(msg)
        return None

    def done(self, done: p.Done) -> int:
        with self._lock:
            seq = next(self._seq)
            msgs = self._request(p.encode_done(self.family.id, seq, done), seq)
        for msg in msgs:
            if isinstance(msg, p.NetlinkError):
                return msg.error
        return 0

    def close(self) -> None:
        self._events.close()
        self._control.close()
