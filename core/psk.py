"""The values the PSK policy plugin hands to a backend's PSK mechanics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class PskKey:
    identity: bytes  # what goes on the wire
    secret: bytearray  # the PSK; wipe after use
    hash: str  # "sha256" | "sha384"
    serial: int  # kernel key serial, reported as remote-auth when this key is used

    def __repr__(self) -> str:
        return f"PskKey(identity={self.identity!r}, hash={self.hash}, serial={self.serial})"

    def wipe(self) -> None:
        self.secret[:] = bytes(len(self.secret))


@dataclass
class PskOffer:
    keys: list[PskKey] = field(default_factory=list)  # client: identities to offer, in order
    lookup: Callable[[bytes], PskKey | None] | None = None  # server: identity -> key
    modes: tuple[str, ...] = ("psk_dhe_ke",)  # psk_dhe_ke and/or psk_ke

    def wipe(self) -> None:
        for key in self.keys:
            key.wipe()
