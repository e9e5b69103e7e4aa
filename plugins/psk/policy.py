"""PSK policy: which keys a request may use, in which order; the mechanics are a backend's.

The host asks it (hsd_psk_offer) for every PSK request, before the backend
runs: it builds a PskOffer from the kernel keyrings of this one request.  The
host then hands the offer to the chosen backend's hsd_psk_handshake, reports
the serial of the key used, and wipes every key the offer handed out
(hsd.psk.run_psk) - so this plugin never sees the backend or the outcome.
"""

from __future__ import annotations

import logging

from hsd.context import HandshakeContext
from hsd.errors import CredentialError
from hsd.hookspecs import BackendInfo, Mode, Role, hookimpl
from hsd.psk import PskKey, PskOffer

from . import keys

log = logging.getLogger("hsd.psk")

VERSION = "0.1"
PSK_MODES = frozenset({Mode("client", "psk"), Mode("server", "psk")})


class RequestKeys:
    """The PSKs one request may read (the offer remembers each lookup, so each key is read once)."""

    def __init__(self, keyrings: tuple[int, ...]) -> None:
        self.keyrings = keyrings

    def client_keys(self, serials: tuple[int, ...]) -> list[PskKey]:
        """Every peer-identity serial that holds a usable PSK, in ACCEPT's order."""
        usable: list[PskKey] = []
        problems: list[str] = []
        for serial in serials:
            if not serial:
                continue
            try:
                key = keys.load_key(serial)
            except CredentialError as exc:
                problems.append(exc.reason)
                continue
            usable.append(key)
        for problem in problems:
            log.info("skipping a peer identity: %s", problem)
        if not usable:
            detail = "; ".join(problems) or "ACCEPT carried no peer identity"
            raise CredentialError(f"no usable PSK for this client handshake ({detail})")
        return usable

    def lookup(self, identity: bytes) -> PskKey | None:
        """Server side: the PSK the client named, or None when this request has no such key."""
        try:
            name = identity.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not name or "\0" in name:
            return None
        serial = keys.search_identity(self.keyrings, name)
        return keys.load_key(serial) if serial is not None else None


def _keyrings_for(ctx: HandshakeContext) -> tuple[int, ...]:
    return keys.request_keyrings(ctx.request.keyring, (), ctx.settings.keyrings)


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(
        name="psk", version=VERSION, modes=PSK_MODES, kind="policy",
        description="PSK policy (keyrings, identities, hash choice); the host then runs the "
                    "selected backend's hsd_psk_handshake with these keys")


@hookimpl
def hsd_psk_offer(ctx: HandshakeContext) -> PskOffer:
    """Client: the ACCEPT's peer identities that hold a usable PSK.  Server: a lookup in this request's keyrings."""
    request_keys = RequestKeys(_keyrings_for(ctx))
    modes = tuple(ctx.settings.psk_modes)
    if ctx.mode.role is Role.CLIENT:
        return PskOffer(keys=request_keys.client_keys(ctx.request.peer_identities), modes=modes)
    return PskOffer(lookup=request_keys.lookup, modes=modes)
