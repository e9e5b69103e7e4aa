"""Everything a backend needs for one handshake, in one object."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hookspecs import Mode
from .protocol import HandshakeRequest

if TYPE_CHECKING:
    from .config import Config
    from .credentials import X509Credentials


@dataclass
class HandshakeContext:
    request: HandshakeRequest
    sock: socket.socket  # non-blocking, connected; owned by the core, never close it
    deadline: float  # time.monotonic() by which the handshake must be over
    backend: str  # the backend chosen for this mode
    config: Config
    x509: X509Credentials | None = None  # our certificate/key and the trust policy for this role
    hook: Any = None  # the pluggy hook relay, for policy plugins that call backends
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("hsd.handshake"))
    keyrings: tuple[int, ...] = ()  # keyrings this request may search, in order
    started: float = field(default_factory=time.monotonic)

    @property
    def mode(self) -> Mode:
        return Mode(self.request.role, self.request.auth)

    @property
    def peername(self) -> str | None:
        return self.request.peername

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
