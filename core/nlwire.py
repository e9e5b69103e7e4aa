"""Netlink framing and the generic-netlink controller's family lookup, with nothing but struct.

Why its own module: the early join (hsd.startup) must read the controller's answer before
anything heavier than socket and struct is imported, and hsd.protocol builds the handshake
family's messages on the same framing.  One codec serves both, so the bytes the join sends
and reads are the ones the rest of hsd (and the simulator) speaks.
"""

from __future__ import annotations

import struct

# netlink framing (linux/netlink.h)
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
NLA_HDR = struct.Struct("=HH")  # len, type
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# generic netlink controller (linux/genetlink.h)
GENL_ID_CTRL = 0x10
CTRL_CMD_NEWFAMILY = 1
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_VERSION = 3
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

Frame = tuple[int, int, int, int, bytes]  # type, flags, seq, pid, body


class ProtocolError(ValueError):
    """Bytes that do not form a valid message of this family.

    `sockfd` is set when a malformed ACCEPT reply still named its socket, so the
    request can get its DONE."""

    def __init__(self, message: str, sockfd: int | None = None) -> None:
        super().__init__(message)
        self.sockfd = sockfd


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, atype) + payload + b"\0" * (align(length) - length)


def parse_attrs(buf: bytes) -> list[tuple[int, bytes]]:
    """Split an attribute stream into (type, payload) pairs, flags kept in type."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < NLA_HDR.size:
            raise ProtocolError("truncated attribute header")
        length, atype = NLA_HDR.unpack_from(buf, pos)
        if length < NLA_HDR.size or pos + length > len(buf):
            raise ProtocolError(f"attribute length {length} out of bounds")
        out.append((atype, bytes(buf[pos + NLA_HDR.size : pos + length])))
        pos += align(length)
    return out


def frames(buf: bytes) -> list[Frame]:
    """Every netlink message in one datagram as (type, flags, seq, pid, body)."""
    out: list[Frame] = []
    pos = 0
    while pos < len(buf):
        if len(buf) - pos < NLMSG_HDR.size:
            raise ProtocolError("truncated netlink header")
        length, mtype, flags, seq, pid = NLMSG_HDR.unpack_from(buf, pos)
        if length < NLMSG_HDR.size or pos + length > len(buf):
            raise ProtocolError(f"netlink length {length} out of bounds")
        out.append((mtype, flags, seq, pid, bytes(buf[pos + NLMSG_HDR.size : pos + length])))
        pos += align(length)
    return out


def error_of(body: bytes) -> int:
    """The positive errno of an NLMSG_ERROR body (0 for an ACK)."""
    if len(body) < 4:
        raise ProtocolError("truncated netlink error")
    return -struct.unpack_from("=i", body)[0]


def genl_message(mtype: int, flags: int, seq: int, pid: int, cmd: int, version: int, payload: bytes) -> bytes:
    body = GENL_HDR.pack(cmd, version, 0) + payload
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), mtype, flags, seq, pid) + body


def text_of(payload: bytes) -> str:
    """A NUL-terminated string attribute."""
    try:
        return payload.split(b"\0", 1)[0].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("string attribute is not UTF-8") from exc


def getfamily_request(name: str, seq: int) -> bytes:
    """CTRL_CMD_GETFAMILY for the family called name."""
    return genl_message(GENL_ID_CTRL, NLM_F_REQUEST, seq, 0, CTRL_CMD_GETFAMILY, 1,
                        attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"))


def parse_family(payload: bytes) -> tuple[int, str, int, dict[str, int]]:
    """(id, name, version, {group name: group id}) from a CTRL_CMD_NEWFAMILY's attributes."""
    family_id, name, version, groups = 0, "", 0, {}
    for atype, value in parse_attrs(payload):
        atype &= NLA_TYPE_MASK
        if atype == CTRL_ATTR_FAMILY_ID:
            if len(value) != 2:
                raise ProtocolError("family id must be u16")
            family_id = struct.unpack("=H", value)[0]
        elif atype == CTRL_ATTR_FAMILY_NAME:
            name = text_of(value)
        elif atype == CTRL_ATTR_VERSION:
            if len(value) != 4:
                raise ProtocolError(f"u32 attribute has {len(value)} bytes")
            version = struct.unpack("=I", value)[0]
        elif atype == CTRL_ATTR_MCAST_GROUPS:
            for _, group in parse_attrs(value):
                group_name, gid = "", None
                for gtype, gval in parse_attrs(group):
                    gtype &= NLA_TYPE_MASK
                    if gtype == CTRL_ATTR_MCAST_GRP_NAME:
                        group_name = text_of(gval)
                    elif gtype == CTRL_ATTR_MCAST_GRP_ID:
                        if len(gval) != 4:
                            raise ProtocolError(f"u32 attribute has {len(gval)} bytes")
                        gid = struct.unpack("=I", gval)[0]
                if group_name and gid is not None:
                    groups[group_name] = gid
    if not family_id:
        raise ProtocolError("family reply without an id")
    return family_id, name, version, groups
