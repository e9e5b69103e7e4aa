"""PSK policy: which keys a request may use, in which order; the mechanics are a backend's.

Runs first for every handshake (tryfirst) and takes only auth mode psk.  It
builds a PskOffer from the kernel keyrings of this one request and asks the
request's backend (ctx.backend) for the TLS mechanics through
hsd_psk_handshake.  Every secret it read is wiped when the handshake ends,
whatever the outcome.  A server handshake that found none of the client's
identities is logged here, once for all backends: the identities truncated,
the warnings rate-limited per peer address (hsd.peerlog), since any host that
can connect can send a 64 KiB list of them on every connection.
"""

from __future__ import annotations

import logging

from hsd.context import HandshakeContext
from hsd.errors import CredentialError, HandshakeError, UnknownPskIdentity, Unsupported
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.peerlog import PeerRateLimiter, peer_of, truncate_list
from hsd.psk import PskKey, PskOffer
from hsd.session import Session

from . import keys

log = logging.getLogger("hsd.psk")

VERSION = "0.1"
PSK_MODES = frozenset({Mode("client", "psk"), Mode("server", "psk")})
UNKNOWN_IDENTITY_WARNINGS = PeerRateLimiter()  # process-wide: a flooding peer shares one bucket


class RequestKeys:
    """The PSKs one request read; the server's lookup() caches, so each key is read once."""

    def __init__(self, keyrings: tuple[int, ...]) -> None:
        self.keyrings = keyrings
        self.loaded: list[PskKey] = []
        self._by_identity: dict[bytes, PskKey | None] = {}

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
            self.loaded.append(key)
            usable.append(key)
        for problem in problems:
            log.info("skipping a peer identity: %s", problem)
        if not usable:
            detail = "; ".join(problems) or "ACCEPT carried no peer identity"
            raise CredentialError(f"no usable PSK for this client handshake ({detail})")
        return usable

    def lookup(self, identity: bytes) -> PskKey | None:
        """Server side: the PSK the client named, or None when this request has no such key."""
        if identity in self._by_identity:
            return self._by_identity[identity]
        key: PskKey | None = None
        try:
            name = identity.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        if name and "\0" not in name:
            serial = keys.search_identity(self.keyrings, name)
            if serial is not None:
                key = keys.load_key(serial)
                self.loaded.append(key)
        self._by_identity[identity] = key
        return key

    def unknown(self) -> list[bytes]:
        """Identities the client named that no keyring of this request holds, in lookup order."""
        return [identity for identity, key in self._by_identity.items() if key is None]

    def wipe(self) -> None:
        for key in self.loaded:
            key.wipe()


def _keyrings_for(ctx: HandshakeContext) -> tuple[int, ...]:
    return keys.request_keyrings(ctx.request.keyring, ctx.keyrings, ctx.config.keyrings)


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(
        name="psk", version=VERSION, modes=PSK_MODES, kind="policy",
        description="PSK policy (keyrings, identities, hash choice); delegates the TLS mechanics "
                    "to the selected backend's hsd_psk_handshake")


@hookimpl(tryfirst=True)
def hsd_handshake(ctx: HandshakeContext) -> Session | None:
    if ctx.request.auth != "psk":
        return None
    if ctx.hook is None:
        raise Unsupported("PSK handshakes need the plugin hook relay (ctx.hook)")
    request_keys = RequestKeys(_keyrings_for(ctx))
    try:
        if ctx.request.role == "client":
            offer = PskOffer(keys=request_keys.client_keys(ctx.request.peer_identities),
                             modes=tuple(ctx.config.psk_modes))
        elif ctx.request.role == "server":
            offer = PskOffer(lookup=request_keys.lookup, modes=tuple(ctx.config.psk_modes))
        else:
            raise Unsupported(f"PSK handshake for unknown role '{ctx.request.role}'")
        try:
            session = ctx.hook.hsd_psk_handshake(ctx=ctx, offer=offer)
        except UnknownPskIdentity:
            if ctx.request.role == "server":
                _warn_unknown(ctx, request_keys.unknown())
            raise
        if session is None:
            raise Unsupported(f"backend '{ctx.backend}' does not implement PSK handshakes")
        _check_remote_auth(session, request_keys)
        return session
    finally:
        request_keys.wipe()


def _warn_unknown(ctx: HandshakeContext, identities: list[bytes]) -> None:
    peer = peer_of(ctx.sock)
    UNKNOWN_IDENTITY_WARNINGS.warning(log, peer, "client %s offered %d PSK identities, none in this request's "
                                      "keyrings: %s", peer, len(identities), truncate_list(identities))


def _check_remote_auth(session: Session, request_keys: RequestKeys) -> None:
    """The NVMe host rejects any remote-auth but the serial of the PSK used (ENOKEY)."""
    serials = {key.serial for key in request_keys.loaded}
    if len(session.remote_auth) != 1 or session.remote_auth[0] not in serials:
        session.wipe()
        raise HandshakeError(f"backend reported remote-auth {session.remote_auth}, "
                             "not the serial of one PSK this request offered")
