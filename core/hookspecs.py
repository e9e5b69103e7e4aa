"""The plugin contract: pluggy hook specifications, versioned by API_VERSION.

A backend is any object (module or instance) registered under the entry-point
group ``hsd.backends`` that implements some of these hooks.  The built-in
backends use exactly this contract.  Backends never touch netlink, keyrings
or DONE: the core owns the cycle and installs kTLS from the returned Session.

Exceptions: raise a subclass of ``hsd.errors.HandshakeError`` to fail a
handshake with a chosen status; any other exception fails it with EIO and is
logged as a plugin bug.  Either way the request still gets its DONE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import pluggy

if TYPE_CHECKING:
    from .context import HandshakeContext
    from .psk import PskOffer
    from .session import Session

PROJECT = "hsd"
API_VERSION = 1
ENTRY_POINT_GROUP = "hsd.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Mode(NamedTuple):
    """A (role, auth mode, transport) combination a backend can serve."""

    role: str  # "client" | "server"
    auth: str  # "unauth" | "x509" | "psk"
    transport: str = "tcp"

    def __str__(self) -> str:
        return f"{self.role}/{self.auth}"


ALL_MODES = (
    Mode("client", "unauth"), Mode("client", "x509"), Mode("client", "psk"),
    Mode("server", "x509"), Mode("server", "psk"),
)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    version: str
    modes: frozenset[Mode]
    api_version: int = API_VERSION
    description: str = ""
    kind: str = "backend"  # "backend" runs TLS; "policy" (like psk) decides keys and delegates to a backend
    extra: dict[str, str] = field(default_factory=dict)


class HookSpecs:
    @hookspec
    def hsd_backend_info(self) -> BackendInfo:
        """Describe this backend: name, version, API version and the modes it serves.

        Called once at load time.  A backend whose api_version differs from
        hsd's API_VERSION is refused with a clear message and not registered.
        """

    @hookspec(firstresult=True)
    def hsd_handshake(self, ctx: HandshakeContext) -> Session | None:
        """Run the TLS handshake described by ``ctx`` on ``ctx.sock``.

        Return None when ``ctx.backend`` is not you (or you do not serve the
        mode); the first non-None Session wins.  Honour ``ctx.deadline``
        (time.monotonic()); never close ``ctx.sock``; never read past the
        peer's Finished (those records belong to kTLS); send no session tickets.
        """

    @hookspec(firstresult=True)
    def hsd_psk_handshake(self, ctx: HandshakeContext, offer: PskOffer) -> Session | None:
        """The PSK mechanics for ``ctx.backend``: the PSK policy plugin chose the keys.

        Client: offer the identities in ``offer.keys`` in order.  Server: resolve
        the client's identity with ``offer.lookup(identity)``; raise
        UnknownPskIdentity when it returns None.  Set Session.remote_auth to the
        serial of the key used.
        """

    @hookspec
    def hsd_handshake_done(self, ctx: HandshakeContext, status: int, session: Session | None) -> None:
        """Observe a finished request after its DONE was sent (metrics, audit)."""
