"""Which hash a PSK is used with, from its identity and its length (tlshd's rules).

NVMe/TCP identities ("NVMe<v><type><hh> <hostnqn> <subnqn>", NVMe TP 8006) name
the hash in hh: 01 is SHA-256, 02 is SHA-384.  Any other identity gets its hash
from the key length, as the reference daemon does: 32 bytes SHA-256, 48 SHA-384.
"""

from __future__ import annotations

import re

from hsd.errors import CredentialError

NVME_IDENTITY = re.compile(r"NVMe(?P<version>[0-9])(?P<kind>[RG])(?P<hmac>[0-9]{2}) ")
NVME_HMAC_HASH = {"01": "sha256", "02": "sha384"}
LENGTH_HASH = {32: "sha256", 48: "sha384"}
MAX_PSK_LENGTH = 48  # OpenSSL keeps an external PSK as a master key, at most 48 bytes


def nvme_hash(identity: str) -> str | None:
    """The hash an NVMe identity names, or None when the identity does not name one."""
    match = NVME_IDENTITY.match(identity)
    if match is None:
        return None
    return NVME_HMAC_HASH.get(match["hmac"])


def psk_hash(identity: str, key_length: int) -> str:
    """"sha256" or "sha384" for this key, or CredentialError when neither fits."""
    if not 0 < key_length <= MAX_PSK_LENGTH:
        raise CredentialError(f"PSK '{identity}' is {key_length} bytes (must be 1..{MAX_PSK_LENGTH})")
    named = nvme_hash(identity)
    if named is not None:
        return named
    by_length = LENGTH_HASH.get(key_length)
    if by_length is None:
        raise CredentialError(
            f"PSK '{identity}' is {key_length} bytes: only 32 (SHA-256) or 48 (SHA-384) bytes "
            "can be used without an NVMe identity naming the hash")
    return by_length
