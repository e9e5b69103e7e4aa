"""Throwaway kernel keyrings for tests: real keyrings, linked where the test process possesses them."""

from __future__ import annotations

import uuid

from hsd import keyring


class ThrowawayKeyring:
    """A fresh keyring linked into the process keyring, so its keys are possessed (readable); invalidated on close."""

    KEY_TYPE = "user"  # the kernel may lack the "psk" key type; the PSK policy reads both

    __test__ = False

    def __init__(self) -> None:
        self.name = f"hsd-test-{uuid.uuid4().hex}"
        self.serial = keyring.add_key("keyring", self.name, b"", keyring.KEY_SPEC_PROCESS_KEYRING)

    def add(self, identity: str, secret: bytes) -> int:
        """Store one PSK; returns its serial (what DONE must report for it)."""
        return keyring.add_key(self.KEY_TYPE, identity, secret, self.serial)

    def close(self) -> None:
        keyring.invalidate(self.serial)

    def __enter__(self) -> "ThrowawayKeyring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keyrings_usable() -> str | None:
    """None when this process can make and read keyrings, else why not (containers may forbid keyctl)."""
    try:
        ring = ThrowawayKeyring()
    except OSError as exc:
        return f"kernel keyrings are not usable here: {exc.strerror or exc}"
    try:
        serial = ring.add("hsd-probe", b"probe")
        keyring.read_key(serial)
    except OSError as exc:
        return f"kernel keyring keys are not readable here: {exc.strerror or exc}"
    finally:
        ring.close()
    return None
