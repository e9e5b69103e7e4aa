"""The `handshake` generic-netlink family, as bytes (sans-I/O).

Everything the daemon and the kernel simulator say to each other goes through
this module: netlink framing, the generic-netlink header, attributes, and the
family's ACCEPT / DONE / READY messages.  No sockets and no threads live here,
so every rule can be unit-tested and fuzzed.  Numbers come from
include/uapi/linux/handshake.h and Documentation/netlink/specs/handshake.yaml.
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

FAMILY_NAME = "handshake"
FAMILY_VERSION = 1
MCGRP_NONE = "none"
MCGRP_TLSHD = "tlshd"

# netlink framing and the controller: the light codec the early join shares (hsd.nlwire),
# re-exported here as the family codec's vocabulary
from .nlwire import (CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS,  # noqa: E402
                     CTRL_ATTR_MCAST_GRP_ID, CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_VERSION, CTRL_CMD_GETFAMILY,
                     CTRL_CMD_NEWFAMILY, GENL_HDR, GENL_ID_CTRL, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLA_HDR,
                     NLA_TYPE_MASK, NLM_F_ACK, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR,
                     ProtocolError, align, attr, error_of, frames, genl_message, getfamily_request, parse_attrs,
                     parse_family, text_of)

MAX_STATUS = 4095
MAX_REMOTE_AUTH = 5  # the kernel keeps at most this many remote-auth serials
MAX_PEER_IDENTITIES = 5
HANDLER_CLASS_MAX = 2  # the kernel's policy: NLA_POLICY_MAX(NLA_U32, 2) on handler-class


class HandlerClass(enum.IntEnum):
    NONE = 0
    TLSHD = 1


class MessageType(enum.IntEnum):
    UNSPEC = 0
    CLIENTHELLO = 1
    SERVERHELLO = 2


class AuthMode(enum.IntEnum):
    UNSPEC = 0
    UNAUTH = 1
    PSK = 2
    X509 = 3


class Cmd(enum.IntEnum):
    READY = 1
    ACCEPT = 2
    DONE = 3


class AcceptAttr(enum.IntEnum):
    SOCKFD = 1
    HANDLER_CLASS = 2
    MESSAGE_TYPE = 3
    TIMEOUT = 4
    AUTH_MODE = 5
    PEER_IDENTITY = 6
    CERTIFICATE = 7
    PEERNAME = 8
    KEYRING = 9


class X509Attr(enum.IntEnum):
    CERT = 1
    PRIVKEY = 2


class DoneAttr(enum.IntEnum):
    STATUS = 1
    SOCKFD = 2
    REMOTE_AUTH = 3


# ---------------------------------------------------------------- attributes


def attr_u32(atype: int, value: int) -> bytes:
    return attr(atype, struct.pack("=I", value & 0xFFFFFFFF))


def attr_s32(atype: int, value: int) -> bytes:
    return attr(atype, struct.pack("=i", value))


def attr_str(atype: int, value: str) -> bytes:
    return attr(atype, value.encode() + b"\0")


def attr_nest(atype: int, inner: bytes) -> bytes:
    return attr(atype | NLA_F_NESTED, inner)


def get_u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"u32 attribute has {len(payload)} bytes")
    return struct.unpack("=I", payload)[0]


def get_s32(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"s32 attribute has {len(payload)} bytes")
    return struct.unpack("=i", payload)[0]


def get_str(payload: bytes) -> str:
    return text_of(payload)


# ---------------------------------------------------------------- messages


@dataclass
class GenlMessage:
    """One generic-netlink message: headers plus raw attribute bytes."""

    type: int
    flags: int
    seq: int
    pid: int
    cmd: int
    version: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return genl_message(self.type, self.flags, self.seq, self.pid, self.cmd, self.version, self.payload)

    def attrs(self) -> list[tuple[int, bytes]]:
        return parse_attrs(self.payload)


@dataclass
class NetlinkError:
    """An NLMSG_ERROR message: error 0 is an ACK, otherwise a negative errno."""

    seq: int
    pid: int
    error: int  # positive errno, 0 for an ACK
    original: bytes = b""


Message = GenlMessage | NetlinkError


def split_messages(buf: bytes) -> list[Message]:
    """Decode every netlink message in one datagram."""
    out: list[Message] = []
    for mtype, flags, seq, pid, body in frames(buf):
        if mtype == NLMSG_DONE:
            continue
        if mtype == NLMSG_ERROR:
            out.append(NetlinkError(seq, pid, error_of(body), body[4:]))
            continue
        if len(body) < GENL_HDR.size:
            raise ProtocolError("truncated generic-netlink header")
        cmd, version, _ = GENL_HDR.unpack_from(body)
        out.append(GenlMessage(mtype, flags, seq, pid, cmd, version, body[GENL_HDR.size :]))
    return out


def encode_error(request: bytes, error: int, seq: int | None = None, pid: int = 0) -> bytes:
    """An NLMSG_ERROR answering `request` (error is a positive errno, 0 = ACK).

    Like the kernel, the whole original message is echoed back on error and
    just its header on an ACK.
    """
    if len(request) >= NLMSG_HDR.size:
        _, _, _, rseq, _ = NLMSG_HDR.unpack_from(request)
    else:
        rseq = 0
    echoed = request if error else request[: NLMSG_HDR.size]
    body = struct.pack("=i", -error) + echoed
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NLMSG_ERROR, 0, rseq if seq is None else seq, pid) + body


# ---------------------------------------------------------------- controller


def encode_getfamily(name: str, seq: int) -> bytes:
    return getfamily_request(name, seq)


@dataclass
class FamilyInfo:
    id: int
    name: str
    version: int
    groups: dict[str, int] = field(default_factory=dict)


def encode_newfamily(info: FamilyInfo, seq: int, pid: int = 0) -> bytes:
    groups = b"".join(
        attr_nest(i + 1, attr_str(CTRL_ATTR_MCAST_GRP_NAME, name) + attr_u32(CTRL_ATTR_MCAST_GRP_ID, gid))
        for i, (name, gid) in enumerate(info.groups.items())
    )
    payload = (attr(CTRL_ATTR_FAMILY_ID, struct.pack("=H", info.id)) + attr_str(CTRL_ATTR_FAMILY_NAME, info.name)
               + attr_u32(CTRL_ATTR_VERSION, info.version) + attr_nest(CTRL_ATTR_MCAST_GROUPS, groups))
    return GenlMessage(GENL_ID_CTRL, 0, seq, pid, CTRL_CMD_NEWFAMILY, 2, payload).encode()


def decode_newfamily(msg: GenlMessage) -> FamilyInfo:
    family_id, name, version, groups = parse_family(msg.payload)
    return FamilyInfo(family_id, name, version, groups)


# ---------------------------------------------------------------- handshake family


@dataclass(frozen=True)
class HandshakeRequest:
    """What ACCEPT tells the agent about one queued handshake."""

    sockfd: int
    message_type: MessageType | int
    auth_mode: AuthMode | int
    timeout_ms: int = 0
    peername: str | None = None
    peer_identities: tuple[int, ...] = ()
    certificate: int = 0
    privkey: int = 0
    keyring: int = 0
    unknown_attrs: tuple[int, ...] = ()

    @property
    def role(self) -> str:
        return {MessageType.CLIENTHELLO: "client", MessageType.SERVERHELLO: "server"}.get(self.message_type, "unknown")

    @property
    def auth(self) -> str:
        try:
            return AuthMode(self.auth_mode).name.lower()
        except ValueError:
            return f"auth{self.auth_mode}"


def _enum_or_int(cls: type[enum.IntEnum], value: int) -> enum.IntEnum | int:
    try:
        return cls(value)
    except ValueError:
        return value


def encode_accept(family_id: int, seq: int, handler_class: int = HandlerClass.TLSHD) -> bytes:
    """The agent's ACCEPT request."""
    return GenlMessage(family_id, NLM_F_REQUEST, seq, 0, Cmd.ACCEPT, FAMILY_VERSION,
                       attr_u32(AcceptAttr.HANDLER_CLASS, handler_class)).encode()


def encode_accept_reply(family_id: int, seq: int, pid: int, req: HandshakeRequest) -> bytes:
    """The kernel's ACCEPT reply, attributes in the kernel's order (tls_handshake_accept)."""
    p = attr_s32(AcceptAttr.SOCKFD, req.sockfd) + attr_u32(AcceptAttr.MESSAGE_TYPE, req.message_type)
    if req.peername:
        p += attr_str(AcceptAttr.PEERNAME, req.peername)
    if req.timeout_ms:
        p += attr_u32(AcceptAttr.TIMEOUT, req.timeout_ms)
    if req.keyring:
        p += attr_u32(AcceptAttr.KEYRING, req.keyring)
    p += attr_u32(AcceptAttr.AUTH_MODE, req.auth_mode)
    for serial in req.peer_identities:
        p += attr_u32(AcceptAttr.PEER_IDENTITY, serial)
    if req.certificate or req.privkey:
        p += attr_nest(AcceptAttr.CERTIFICATE,
                       attr_s32(X509Attr.CERT, req.certificate) + attr_s32(X509Attr.PRIVKEY, req.privkey))
    return GenlMessage(family_id, 0, seq, pid, Cmd.ACCEPT, FAMILY_VERSION, p).encode()


def decode_accept_reply(msg: GenlMessage) -> HandshakeRequest:
    """Parse an ACCEPT reply.  Unknown (future) attributes are kept by number and logged."""
    try:
        return _decode_accept_reply(msg)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), sockfd_hint(msg)) from None


def _decode_accept_reply(msg: GenlMessage) -> HandshakeRequest:
    if msg.cmd != Cmd.ACCEPT:
        raise ProtocolError(f"expected ACCEPT, got command {msg.cmd}")
    fields: dict = {"peer_identities": [], "unknown_attrs": []}
    for atype, payload in msg.attrs():
        kind = atype & NLA_TYPE_MASK
        if kind == AcceptAttr.SOCKFD:
            if "sockfd" in fields:  # the kernel sends one; which of two fds would be the request's?
                raise ProtocolError("ACCEPT reply carries more than one SOCKFD")
            fields["sockfd"] = get_s32(payload)
        elif kind == AcceptAttr.HANDLER_CLASS:
            get_u32(payload)
        elif kind == AcceptAttr.MESSAGE_TYPE:
            fields["message_type"] = _enum_or_int(MessageType, get_u32(payload))
        elif kind == AcceptAttr.TIMEOUT:
            fields["timeout_ms"] = get_u32(payload)
        elif kind == AcceptAttr.AUTH_MODE:
            fields["auth_mode"] = _enum_or_int(AuthMode, get_u32(payload))
        elif kind == AcceptAttr.PEER_IDENTITY:
            fields["peer_identities"].append(get_u32(payload))
        elif kind == AcceptAttr.PEERNAME:
            fields["peername"] = get_str(payload) or None
        elif kind == AcceptAttr.KEYRING:
            fields["keyring"] = get_u32(payload)
        elif kind == AcceptAttr.CERTIFICATE:
            for xtype, xval in parse_attrs(payload):
                xkind = xtype & NLA_TYPE_MASK
                if xkind == X509Attr.CERT:
                    fields["certificate"] = get_s32(xval)
                elif xkind == X509Attr.PRIVKEY:
                    fields["privkey"] = get_s32(xval)
                else:
                    log.debug("ignoring unknown x509 attribute %d", xkind)
        else:
            log.debug("ignoring unknown accept attribute %d (%d bytes)", kind, len(payload))
            fields["unknown_attrs"].append(kind)
    for required in ("sockfd", "message_type", "auth_mode"):
        if required not in fields:
            raise ProtocolError(f"ACCEPT reply lacks {required}")
    fields["peer_identities"] = tuple(fields["peer_identities"])
    fields["unknown_attrs"] = tuple(fields["unknown_attrs"])
    return HandshakeRequest(**fields)


def sockfd_hint(msg: GenlMessage) -> int | None:
    """Best-effort sockfd from a malformed ACCEPT reply, so the fd can still get its DONE.

    Walks the attributes one by one and stops at the first malformed one, so a
    SOCKFD that precedes the damage is still found (the kernel puts it first)."""
    buf, pos = msg.payload, 0
    while len(buf) - pos >= NLA_HDR.size:
        length, atype = NLA_HDR.unpack_from(buf, pos)
        if length < NLA_HDR.size or pos + length > len(buf):
            break
        if atype & NLA_TYPE_MASK == AcceptAttr.SOCKFD and length == NLA_HDR.size + 4:
            return struct.unpack_from("=i", buf, pos + NLA_HDR.size)[0]
        pos += align(length)
    return None


@dataclass(frozen=True)
class Done:
    """The agent's verdict on one handshake."""

    sockfd: int
    status: int | None  # positive errno, 0 = success; None only to model a malformed DONE
    remote_auth: tuple[int, ...] = ()


def encode_done(family_id: int, seq: int, done: Done) -> bytes:
    """DONE: status and sockfd, remote-auth serials only on success."""
    p = b""
    if done.status is not None:
        if not 0 <= done.status <= MAX_STATUS:
            raise ValueError(f"status {done.status} is not a positive errno")
        p += attr_u32(DoneAttr.STATUS, done.status)
    p += attr_s32(DoneAttr.SOCKFD, done.sockfd)
    if done.status == 0:
        for serial in done.remote_auth:
            p += attr_u32(DoneAttr.REMOTE_AUTH, serial)
    return GenlMessage(family_id, NLM_F_REQUEST | NLM_F_ACK, seq, 0, Cmd.DONE, FAMILY_VERSION, p).encode()


def _reject_nested_flag(atype: int) -> None:
    """Strict kernel validation: NLA_F_NESTED on a scalar attribute is EINVAL."""
    if atype & NLA_F_NESTED:
        raise ProtocolError(f"NLA_F_NESTED not expected on attribute {atype & NLA_TYPE_MASK}")


def decode_done_request(msg: GenlMessage) -> Done:
    """Kernel-side strict parse of DONE (unknown attribute or bad size -> EINVAL)."""
    status: int | None = None
    sockfd: int | None = None
    remote: list[int] = []
    for atype, payload in msg.attrs():
        _reject_nested_flag(atype)
        kind = atype & NLA_TYPE_MASK
        if kind == DoneAttr.STATUS:
            status = get_u32(payload)
            if status > MAX_STATUS:
                raise ProtocolError("status above 4095")
        elif kind == DoneAttr.SOCKFD:
            sockfd = get_s32(payload)
        elif kind == DoneAttr.REMOTE_AUTH:
            remote.append(get_u32(payload))
        else:
            raise ProtocolError(f"unknown done attribute {kind}")
    if sockfd is None:
        raise ProtocolError("DONE lacks sockfd")
    return Done(sockfd, status, tuple(remote))


def decode_accept_request(msg: GenlMessage) -> int:
    """Kernel-side strict parse of ACCEPT: returns the handler class."""
    handler: int | None = None
    for atype, payload in msg.attrs():
        _reject_nested_flag(atype)
        kind = atype & NLA_TYPE_MASK
        if kind == AcceptAttr.HANDLER_CLASS:
            handler = get_u32(payload)
            if handler > HANDLER_CLASS_MAX:
                raise ProtocolError(f"handler-class {handler} above {HANDLER_CLASS_MAX}")
        else:
            raise ProtocolError(f"unexpected attribute {kind} in ACCEPT request")
    if handler is None:
        raise ProtocolError("ACCEPT lacks handler-class")
    return handler


def encode_ready(family_id: int, handler_class: int = HandlerClass.TLSHD, seq: int = 0) -> bytes:
    """The READY notification multicast once per queued request."""
    return GenlMessage(family_id, 0, seq, 0, Cmd.READY, FAMILY_VERSION,
                       attr_u32(AcceptAttr.HANDLER_CLASS, handler_class)).encode()


def is_ready(msg: Message, family_id: int) -> bool:
    return isinstance(msg, GenlMessage) and msg.type == family_id and msg.cmd == Cmd.READY


def errno_name(code: int) -> str:
    """The errno's symbolic name; 95 is EOPNOTSUPP, as the kernel, tlshd and hsd's docs call it (Python says ENOTSUP)."""
    if code == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errno.errorcode.get(code, str(code))
