"""PSK requests: the offer the policy hands a backend, the map back from the library's choice, and the composition.

The host composes a PSK handshake explicitly (run_psk): the policy plugin's
offer, then the chosen backend's mechanics with it, then the core's own rule
for the identity DONE reports - the serial of the one key, handed out by this
offer, whose identity the library finished with.  Every key the offer handed
out is wiped when the request ends, whatever happened.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from .errors import CredentialError, HandshakeError, PeerRejected, UnknownPskIdentity
from .peerlog import PeerRateLimiter, peer_of, truncate_list
from .secret import wipe
from .tls13 import UNKNOWN_PSK_IDENTITY, offered_psk_identities, send_alert
from .wire import RecordSocket

if TYPE_CHECKING:
    from .context import HandshakeContext
    from .session import Session

log = logging.getLogger("hsd.psk")

UNKNOWN_IDENTITY_WARNINGS = PeerRateLimiter()  # process-wide: a flooding peer shares one bucket


@dataclass
class PskKey:
    identity: bytes  # what goes on the wire
    secret: bytearray  # the PSK; wipe after use
    hash: str  # "sha256" | "sha384"
    serial: int  # kernel key serial, reported as remote-auth when this key is used

    def __repr__(self) -> str:
        return f"PskKey(identity={self.identity!r}, hash={self.hash}, serial={self.serial})"

    def wipe(self) -> None:
        wipe(self.secret)


@dataclass
class PskOffer:
    """The PSKs one request may use.  Server lookups are remembered: each identity is resolved once, and
    the core knows every key handed out (to wipe it, and to map the library's choice back to a serial)."""

    keys: list[PskKey] = field(default_factory=list)  # client: identities to offer, in order
    lookup: Callable[[bytes], PskKey | None] | None = None  # server: identity -> key (None: unknown)
    modes: tuple[str, ...] = ("psk_dhe_ke",)  # psk_dhe_ke and/or psk_ke
    looked_up: dict[bytes, PskKey | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.lookup is not None:
            find = self.lookup

            def remembered(identity: bytes) -> PskKey | None:
                identity = bytes(identity)
                if identity not in self.looked_up:
                    self.looked_up[identity] = find(identity)
                return self.looked_up[identity]

            self.lookup = remembered

    def handed_out(self) -> list[PskKey]:
        """Every key this offer gave a backend: the client's keys, the server's found lookups."""
        return [*self.keys, *(key for key in self.looked_up.values() if key is not None)]

    def key_for(self, identity: bytes | None) -> PskKey:
        """The key behind the identity a backend reports it finished with; HandshakeError if none was offered.

        Client: the first key of that identity in offer order (a library cannot
        tell two keys of one identity apart, so only the first is ever given).
        Server: the key the lookup returned for that identity."""
        if identity is None:
            raise HandshakeError("backend reported no PSK identity for a PSK handshake")
        identity = bytes(identity)
        if self.lookup is not None:
            key = self.looked_up.get(identity)
        else:
            key = next((k for k in self.keys if k.identity == identity), None)
        if key is None:
            raise HandshakeError("backend reported a PSK identity this request did not offer")
        return key

    def unknown(self) -> list[bytes]:
        """Identities a client named that no keyring of this request holds, in lookup order."""
        return [identity for identity, key in self.looked_up.items() if key is None]

    def wipe(self) -> None:
        for key in self.handed_out():
            key.wipe()


class PskSelection:
    """The keys one handshake handed its TLS library, and the one the library says it finished with.

    The only way from "the library selected identity X" to a kernel serial:
    the identity must be one the library was given (give()), and it maps to
    that very key - never to a position in some other list (a ClientHello
    before a HelloRetryRequest), never to a key looked up again.  A library
    that also exposes the secret it used (OpenSSL's session) has it checked
    against the key, so the serial reported is the key that keyed the
    handshake, which the peer's binder and Finished proved."""

    def __init__(self, keys: Iterable[PskKey] = ()) -> None:
        self._given: dict[bytes, PskKey] = {}
        for key in keys:
            self.give(key)

    def give(self, key: PskKey) -> bool:
        """Record a key handed to the library; False when another key already holds its identity.

        A TLS library finds a PSK by its identity, so two keys under one
        identity cannot be told apart: only the first one may be handed over."""
        held = self._given.get(key.identity)
        if held is not None and held is not key:
            return False
        self._given[key.identity] = key
        return True

    @property
    def given(self) -> list[PskKey]:
        """The keys handed over, in the order they were given."""
        return list(self._given.values())

    def chosen(self, identity: bytes | None, used_secret: bytes | bytearray | memoryview | None = None) -> PskKey:
        """The key behind the identity the library finished with; PeerRejected when it is not one we gave."""
        if identity is None:
            raise PeerRejected("handshake finished without a PSK")
        key = self._given.get(bytes(identity))
        if key is None:
            raise PeerRejected("the TLS library finished with a PSK identity it was never given")
        if used_secret is not None and not hmac.compare_digest(key.secret, used_secret):
            raise PeerRejected("the TLS library finished with another secret than the selected PSK's")
        return key


def selected_identity(identities: list[bytes] | tuple[bytes, ...], selected: int | None) -> bytes | None:
    """The identity a ServerHello's selected index names in the ClientHello it answers (None: out of range)."""
    if selected is None or not 0 <= selected < len(identities):
        return None
    return identities[selected]


def run_psk(ctx: HandshakeContext, offer: PskOffer, mechanics: Callable[[PskOffer], Session]) -> Session:
    """mechanics(offer) (the chosen backend's hsd_psk_handshake), then remote-auth from the key it used.

    The offer is wiped afterwards in every case.  A server handshake that found
    none of the client's identities is logged here, once for all backends: the
    identities truncated, the warnings rate-limited per peer address, since any
    host that can connect can send a 64 KiB list of them on every connection."""
    try:
        try:
            session = mechanics(offer)
        except UnknownPskIdentity:
            if offer.lookup is not None:
                peer = peer_of(ctx.sock)
                unknown = offer.unknown()
                UNKNOWN_IDENTITY_WARNINGS.warning(
                    log, peer, "client %s offered %d PSK identities, none in this request's keyrings: %s",
                    peer, len(unknown), truncate_list(unknown))
            raise
        try:
            session.remote_auth = (offer.key_for(session.psk_identity).serial,)
        except HandshakeError:
            session.wipe()
            raise
        return session
    finally:
        offer.wipe()


def server_first_flight(records: RecordSocket, offer: PskOffer) -> tuple[list[bytes], tuple[bytes, ...], PskKey]:
    """A PSK server's first step, the same for every backend, before its library sees a byte.

    Reads the ClientHello (hsd.tls13) and resolves the offered identities in
    the client's order until one is known.  Returns the ClientHello's records
    (to feed the library), every offered identity, and that first known key;
    none known: the unknown_psk_identity alert, then UnknownPskIdentity.  A key
    found but unusable (wrong length, unreadable) is the server's
    misconfiguration, CredentialError (EIO) as ever, but the client gets the
    same alert at once: it need not wait for its timeout, and learns nothing
    about which identities exist."""
    if offer.lookup is None:
        raise CredentialError("PSK server handshake without an identity lookup")
    raw, identities = offered_psk_identities(records)
    lookup = offer.lookup
    try:
        first = next((key for key in map(lookup, identities) if key is not None), None)
    except CredentialError:
        send_alert(records, UNKNOWN_PSK_IDENTITY)
        raise
    if first is None:
        send_alert(records, UNKNOWN_PSK_IDENTITY)
        # the identities themselves are logged by run_psk (bounded, rate-limited per peer)
        raise UnknownPskIdentity(f"client offered {len(identities)} unknown PSK identities")
    return raw, identities, first
