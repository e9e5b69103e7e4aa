"""Everything a backend gets for one handshake, and nothing more: the request, its socket, deadline and credentials.

The context is typed and closed (no whole Config, no hook relay): a backend
reads the ACCEPT (``request``, ``mode``, ``peername``), does I/O on ``sock``
through ``records()`` until ``deadline``, and uses ``x509`` and ``settings``.
``Mode``'s role and auth are enums that map one-to-one onto hsd.protocol's
MessageType and AuthMode, so a mode is never a string compared by hand.
"""

from __future__ import annotations

import enum
import functools
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .credentials import X509Credentials
from .errors import Unsupported
from .protocol import AuthMode, HandshakeRequest, MessageType
from .tlstrace import TlsTrace, trace_for
from .wire import RecordSocket
from .x509verify import PeerName, client_peer_name

if TYPE_CHECKING:
    from .psk import PskOffer
    from .session import Session


class Role(enum.StrEnum):
    """Which end of the TLS connection hsd plays: the ACCEPT's message type."""

    CLIENT = "client"  # MessageType.CLIENTHELLO
    SERVER = "server"  # MessageType.SERVERHELLO

    @classmethod
    def of(cls, message_type: MessageType | int) -> "Role":
        try:
            return _ROLE_OF[MessageType(message_type)]
        except (KeyError, ValueError):
            raise Unsupported(f"unknown message type {int(message_type)}") from None

    @property
    def wire(self) -> MessageType:
        return MessageType.CLIENTHELLO if self is Role.CLIENT else MessageType.SERVERHELLO


class Auth(enum.StrEnum):
    """How the peers authenticate: the ACCEPT's auth mode."""

    UNAUTH = "unauth"  # AuthMode.UNAUTH (client only: the server is still verified)
    X509 = "x509"  # AuthMode.X509
    PSK = "psk"  # AuthMode.PSK

    @classmethod
    def of(cls, auth_mode: AuthMode | int) -> "Auth":
        try:
            return cls[AuthMode(auth_mode).name]
        except (KeyError, ValueError):
            raise Unsupported(f"unknown auth mode {int(auth_mode)}") from None

    @property
    def wire(self) -> AuthMode:
        return AuthMode[self.name]


_ROLE_OF = {MessageType.CLIENTHELLO: Role.CLIENT, MessageType.SERVERHELLO: Role.SERVER}


@dataclass(frozen=True, order=True)
class Mode:
    """A (role, auth) combination a backend serves; Mode("client", "x509") is Mode(Role.CLIENT, Auth.X509)."""

    role: Role
    auth: Auth

    def __post_init__(self) -> None:  # strings are accepted and become the enums; anything else is refused
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "auth", Auth(self.auth))

    @classmethod
    def of(cls, request: HandshakeRequest) -> "Mode":
        """A table lookup for the five modes (asked several times per request); the enums' own checks otherwise."""
        mode = _MODE_OF.get((request.message_type, request.auth_mode))
        return mode if mode is not None else cls(Role.of(request.message_type), Auth.of(request.auth_mode))

    @property
    def key(self) -> str:
        """The name of this mode in [hsd.backends]: "client.x509"."""
        return f"{self.role}.{self.auth}"

    def __str__(self) -> str:
        return f"{self.role}/{self.auth}"


ALL_MODES = (
    Mode("client", "unauth"), Mode("client", "x509"), Mode("client", "psk"),
    Mode("server", "x509"), Mode("server", "psk"),
)
_MODE_OF = {(int(mode.role.wire), int(mode.auth.wire)): mode for mode in ALL_MODES}


@dataclass(frozen=True)
class Settings:
    """The few configuration values a plugin may need (not the whole Config)."""

    tls_debug: int = 0  # [debug] tls: > 0 gives HandshakeContext a tls_trace its backend feeds (hsd.tlstrace)
    psk_modes: tuple[str, ...] = ("psk_dhe_ke",)  # [hsd] psk_modes: psk_dhe_ke and/or psk_ke
    keyrings: tuple[str, ...] = ()  # [authenticate] keyrings: names of further keyrings to search for PSKs


class Delegate(Protocol):
    def __call__(self, ctx: "HandshakeContext", backend: str, offer: "PskOffer | None") -> "Session": ...


def _no_delegation(ctx: "HandshakeContext", backend: str, offer: "PskOffer | None") -> "Session":
    raise Unsupported(f"this context has no plugin host to delegate to {backend!r}")


@dataclass
class HandshakeContext:
    request: HandshakeRequest  # the ACCEPT: message type, auth mode, peer name, timeout, keys by serial
    sock: socket.socket  # non-blocking, connected; owned by the core: never close it, read it via records()
    deadline: float  # time.monotonic() by which the handshake must be over
    backend: str  # BackendInfo.name of the backend running this handshake
    x509: X509Credentials = field(default_factory=X509Credentials)  # ours and the trust policy (empty for PSK)
    settings: Settings = field(default_factory=Settings)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("hsd.handshake"))
    delegate_to: Delegate = field(default=_no_delegation, repr=False, compare=False)  # set by the plugin host

    @property
    def mode(self) -> Mode:
        return Mode.of(self.request)

    @property
    def peername(self) -> str | None:
        """The peer name from ACCEPT, as the consumer gave it (may be None on a server)."""
        return self.request.peername

    @property
    def server_name(self) -> PeerName | None:
        """Client: the normalised name the server's certificate must prove (DNS name or IP address).

        None only when verification is off and no name was given; the core has
        already refused a verifying client request without one (EACCES)."""
        return client_peer_name(self.request.peername, verify=self.x509.verify_peer)

    @functools.cached_property
    def tls_trace(self) -> TlsTrace | None:
        """[debug] tls > 0: the tracer this handshake's backend feeds its plaintext records (hsd.tlstrace).

        None when tracing is off: a backend then installs no hook at all."""
        return trace_for(self.settings.tls_debug, f"fd {self.request.sockfd} {self.request.role}")

    def remaining(self) -> float:
        """Seconds left until the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def records(self) -> RecordSocket:
        """The socket as TLS records, one at a time, bounded by the deadline and the handshake read limit."""
        return RecordSocket(self.sock, self.deadline)

    def delegate(self, backend: str, offer: "PskOffer | None" = None) -> "Session":
        """Run this same handshake on another loaded backend (by its BackendInfo.name) and return its Session.

        The host checks that backend serves this mode and validates its Session
        as if it had been chosen; PSK modes pass the offer they were given."""
        return self.delegate_to(self, backend, offer)
