"""The values the PSK policy hands to a backend's PSK mechanics, and the map back from the library's choice."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import PeerRejected
from .secret import wipe


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
    keys: list[PskKey] = field(default_factory=list)  # client: identities to offer, in order
    lookup: Callable[[bytes], PskKey | None] | None = None  # server: identity -> key
    modes: tuple[str, ...] = ("psk_dhe_ke",)  # psk_dhe_ke and/or psk_ke

    def wipe(self) -> None:
        for key in self.keys:
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
