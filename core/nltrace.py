"""[debug] nl: the handshake family's messages as hsd exchanges them, decoded, in the daemon's log.

Why a channel wrapper: the dispatcher talks to the real kernel and to the
simulator through the same Channel interface, so wrapping that interface is
the one place that sees every READY, ACCEPT reply and DONE of either; the
level is read at each call, so a SIGHUP that changes [debug] nl applies at
once.  The attributes are shown as hsd.protocol encodes and decodes them,
by name and number.  Nothing secret travels over this family: certificates,
keys and PSKs are named by keyring serial, never carried.

Levels (tlshd hands its number to libnl, whose own debug output is its
internal steps; hsd shows the messages themselves): >= 1 one line per
message - READY notifications (how many), each ACCEPT reply (or that the
queue was empty), each DONE with the kernel's answer; >= 5 also every
attribute of ACCEPT and DONE on its own line.
"""

from __future__ import annotations

import enum
import errno
import logging
from typing import Any, Callable

from . import protocol as p
from .channel import OVERRUN, Channel
from .peerlog import truncate

log = logging.getLogger("hsd.trace.nl")

LEVEL_ATTRIBUTES = 5


def _name(enum_type: type[enum.IntEnum], value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(int(value))


def accept_summary(request: p.HandshakeRequest) -> str:
    """One line: what the kernel asked for (serials by number, the peer name as given)."""
    text = (f"ACCEPT reply: sockfd={request.sockfd} message_type={_name(p.MessageType, request.message_type)} "
            f"auth_mode={_name(p.AuthMode, request.auth_mode)} timeout={request.timeout_ms}ms "
            f"peername={truncate(repr(request.peername))} peer_identities={list(request.peer_identities)} "
            f"certificate={request.certificate} privkey={request.privkey} keyring={request.keyring}")
    if request.unknown_attrs:
        text += f" unknown attributes {list(request.unknown_attrs)}"
    return text


def done_summary(done: p.Done, answer: int | str) -> str:
    status = "none" if done.status is None else f"{done.status} ({'ok' if done.status == 0 else p.errno_name(done.status)})"
    kernel = answer if isinstance(answer, str) else ("0 (accepted)" if answer == 0 else p.errno_name(answer))
    return (f"DONE: sockfd={done.sockfd} status={status} remote_auth={list(done.remote_auth)}; "
            f"kernel answered {kernel}")


def _attribute_lines(raw: bytes, attrs: type[enum.IntEnum]) -> list[str]:
    """Every attribute of one encoded message: name(number)=value, nested ones indented."""
    lines = []
    for atype, payload in p.split_messages(raw)[0].attrs():
        kind = atype & p.NLA_TYPE_MASK
        label = f"{_name(attrs, kind)}({kind})"
        if attrs is p.AcceptAttr and kind == p.AcceptAttr.CERTIFICATE:
            lines.append(f"  {label}: nested")
            for xtype, xval in p.parse_attrs(payload):
                xkind = xtype & p.NLA_TYPE_MASK
                lines.append(f"    {_name(p.X509Attr, xkind)}({xkind})={p.get_s32(xval)} (keyring serial)")
        elif attrs is p.AcceptAttr and kind == p.AcceptAttr.PEERNAME:
            lines.append(f"  {label}={truncate(repr(p.get_str(payload)))}")
        elif attrs is p.AcceptAttr and kind == p.AcceptAttr.SOCKFD or attrs is p.DoneAttr and kind == p.DoneAttr.SOCKFD:
            lines.append(f"  {label}={p.get_s32(payload)}")
        elif attrs is p.AcceptAttr and kind in (p.AcceptAttr.MESSAGE_TYPE, p.AcceptAttr.AUTH_MODE):
            value = p.get_u32(payload)
            kinds = p.MessageType if kind == p.AcceptAttr.MESSAGE_TYPE else p.AuthMode
            lines.append(f"  {label}={value} ({_name(kinds, value)})")
        else:
            lines.append(f"  {label}={p.get_u32(payload)}")
    return lines


def accept_attributes(request: p.HandshakeRequest) -> list[str]:
    """The ACCEPT reply's attributes as hsd.protocol decoded them (unknown ones are listed by number)."""
    lines = _attribute_lines(p.encode_accept_reply(0, 0, 0, request), p.AcceptAttr)
    lines += [f"  {kind}: unknown to hsd, ignored" for kind in request.unknown_attrs]
    return lines


def done_attributes(done: p.Done) -> list[str]:
    """DONE's attributes exactly as hsd.protocol encodes them."""
    if done.status is not None and not 0 <= done.status <= p.MAX_STATUS:
        return [f"  status {done.status} cannot be encoded"]
    return _attribute_lines(p.encode_done(0, 0, done), p.DoneAttr)


class TracedChannel:
    """A Channel that logs what passes through it when level() > 0; otherwise only forwards."""

    def __init__(self, channel: Channel, level: Callable[[], int], logger: logging.Logger = log) -> None:
        self.inner = channel
        self.level = level
        self.log = logger

    @property
    def ktls(self):  # the Channel's KtlsInstaller, unchanged
        return self.inner.ktls

    def __getattr__(self, name: str) -> Any:  # fileno(), family, ... of the wrapped channel
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _lines(self, lines: list[str]) -> None:
        for line in lines:
            self.log.debug("nl: %s", line)

    def wait_ready(self, timeout: float | None) -> int:
        got = self.inner.wait_ready(timeout)
        if got and self.level() > 0:
            self._lines(["READY notifications lost (queue overrun): draining the queue" if got == OVERRUN
                            else f"READY x{got} (tlshd group)"])
        return got

    def accept(self) -> p.HandshakeRequest | None:
        try:
            request = self.inner.accept()
        except p.ProtocolError as exc:
            if self.level() > 0:
                self._lines([f"ACCEPT reply malformed: {exc} (sockfd {exc.sockfd})"])
            raise
        except OSError as exc:
            if self.level() > 0:
                self._lines([f"ACCEPT refused: {p.errno_name(exc.errno or errno.EIO)}"])
            raise
        level = self.level()
        if level > 0:
            if request is None:
                self._lines(["ACCEPT: nothing queued (EAGAIN)"])
            else:
                self._lines([accept_summary(request)]
                            + (accept_attributes(request) if level >= LEVEL_ATTRIBUTES else []))
        return request

    def done(self, done: p.Done) -> int:
        try:
            answer = self.inner.done(done)
        except Exception as exc:
            if self.level() > 0:
                self._lines([done_summary(done, f"nothing ({type(exc).__name__}: {exc})")])
            raise
        level = self.level()
        if level > 0:
            self._lines([done_summary(done, answer)] + (done_attributes(done) if level >= LEVEL_ATTRIBUTES else []))
        return answer

    def close(self) -> None:
        self.inner.close()
