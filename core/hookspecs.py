"""The plugin contract: pluggy hook specifications, versioned by API_VERSION.

A plugin is any object (module, class or instance) registered under the
entry-point group ``hsd.backends`` that implements some of these hooks.  The
host routes: each request goes to exactly one backend, the one configured for
its mode, and a PSK request to the PSK policy plugin and then that backend.
So a backend never has to ask "is this request mine?".  Backends never touch
netlink, keyrings or DONE: the core owns the cycle, checks the rules every
backend must obey before and after the call, and installs kTLS from the
returned Session.

Exceptions: raise a subclass of ``hsd.errors.HandshakeError`` to fail a
handshake with a chosen status; any other exception fails it with EIO and is
logged as a plugin bug.  Either way the request still gets its DONE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pluggy

from .context import ALL_MODES, Auth, HandshakeContext, Mode, Role, Settings
from .psk import PskOffer
from .session import Session

PROJECT = "hsd"
API_VERSION = 2  # 2: the host calls only the chosen backend; typed context; the core decides remote-auth
ENTRY_POINT_GROUP = "hsd.backends"
KINDS = ("backend", "policy", "observer")  # observer: only hsd_handshake_done, no modes

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["ALL_MODES", "API_VERSION", "Auth", "BackendInfo", "ENTRY_POINT_GROUP", "HookSpecs", "KINDS", "Mode",
           "PROJECT", "Role", "Settings", "hookimpl", "hookspec"]


@dataclass(frozen=True)
class BackendInfo:
    """What a plugin is.  ``name`` is the name configuration uses (``[hsd] backend``, ``[hsd.backends]``,
    ``--backend``, enable_plugins), not the entry point's."""

    name: str
    version: str
    modes: frozenset[Mode]
    api_version: int = API_VERSION
    description: str = ""
    kind: str = "backend"  # "backend" runs TLS; "policy" (like psk) chooses the PSKs a backend uses; "observer"
    extra: dict[str, str] = field(default_factory=dict)


class HookSpecs:
    @hookspec
    def hsd_backend_info(self) -> BackendInfo:
        """Describe this plugin: name, version, API version, kind and the modes it serves.

        Called once at load time.  A plugin whose api_version differs from hsd's
        API_VERSION, or whose info is malformed (modes not Mode values, an
        unknown kind), is refused with a message naming it and not registered.
        """

    @hookspec(firstresult=True)
    def hsd_handshake(self, ctx: HandshakeContext) -> Session:
        """Run the certificate-mode (unauth/x509) handshake described by ``ctx`` on ``ctx.sock``.

        Called only on the backend chosen for ``ctx.mode``, and only for a mode
        its BackendInfo claims.  The core has already checked the peer name
        (``ctx.server_name``) and that our own certificate and key are present.
        Honour ``ctx.deadline``; never close ``ctx.sock``; read it through
        ``ctx.records()`` so nothing after the peer's Finished is consumed (those
        records belong to kTLS); send no session tickets.  Return a Session with
        the peer's certificates as presented; leave ``remote_auth`` empty.
        """

    @hookspec(firstresult=True)
    def hsd_psk_handshake(self, ctx: HandshakeContext, offer: PskOffer) -> Session:
        """The PSK mechanics, on the backend chosen for ``ctx.mode``; the PSK policy chose the keys.

        Client: offer the identities in ``offer.keys`` in order.  Server: resolve
        the client's identities with ``offer.lookup(identity)``; raise
        UnknownPskIdentity when none is known.  Set ``Session.psk_identity`` to
        the identity the library finished with; the core maps it to the key's
        serial for remote-auth.
        """

    @hookspec(firstresult=True)
    def hsd_psk_offer(self, ctx: HandshakeContext) -> PskOffer:
        """A policy plugin (kind "policy"): the PSKs this request may use, before any byte is sent.

        Client: ``PskOffer(keys=[...])`` in the order to offer them.  Server:
        ``PskOffer(lookup=...)`` resolving a client's identity to a key (or None).
        The core wipes every key the offer handed out when the request ends.
        """

    @hookspec
    def hsd_handshake_done(self, ctx: HandshakeContext, status: int, session: Session | None) -> None:
        """Observe a finished request after its DONE was sent (metrics, audit); called on every plugin."""
