"""Finding PSKs in the kernel keyrings one request may use, without linking anything.

The keyrings are searched by serial, in the request's order: the ACCEPT
keyring first, then the defaults (.nvme, .nfs, .nfsd), then the configured
names.  Nothing is linked into a shared keyring, so concurrent handshakes never
see each other's keys.  Every key read is returned in a PskKey whose secret the
caller wipes.

A keyring found by name is used only when root or hsd's own uid owns it: any
local user can create a keyring called ".nvme" (or like a configured name) and
let everyone view and search it, and /proc/keys would then list it beside the
real one - with keys whose secrets that user chose.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from hsd import keyring
from hsd.errors import CredentialError
from hsd.peerlog import PeerRateLimiter
from hsd.psk import PskKey
from hsd.secret import wipe

from .identity import psk_hash

log = logging.getLogger("hsd.psk")

DEFAULT_KEYRINGS = (".nvme", ".nfs", ".nfsd")
PSK_KEY_TYPES = ("psk", "user")  # "psk" where the kernel has it, else "user" (tlshd reads both)
ANCHORS = (keyring.KEY_SPEC_USER_KEYRING, keyring.KEY_SPEC_SESSION_KEYRING, keyring.KEY_SPEC_PROCESS_KEYRING)
PROC_KEYS = "/proc/keys"
MAX_DESCRIPTION = 4095  # bytes: the kernel refuses longer descriptions (KEY_MAX_DESC_SIZE), so none names a key
REFUSED_KEYRING_WARNINGS = PeerRateLimiter(burst=1, interval=3600.0)  # keyed by serial: once an hour each


def trusted_owner(uid: int) -> bool:
    """Keyrings of root or of the uid hsd runs as; nobody else may decide which PSKs hsd accepts."""
    return uid in (0, os.geteuid())


def owned_keyring(serial: int, name: str) -> bool:
    """True when serial is a keyring of a trusted owner (the kernel's word, KEYCTL_DESCRIBE); else logs why not."""
    try:
        key_type, uid, _gid, _perm, _description = keyring.describe_key(serial)
    except (keyring.KeyringError, ValueError) as exc:
        log.debug("keyring '%s' (%d) cannot be described: %s", name, serial, exc)
        return False
    if key_type != "keyring":
        return False
    if not trusted_owner(uid):
        REFUSED_KEYRING_WARNINGS.warning(
            log, str(serial), "not using keyring '%s' (%d): it is owned by uid %d, not by root or hsd's uid %d",
            name, serial, uid, os.geteuid())
        return False
    return True


def _from_proc_keys(name: str) -> int | None:
    """A keyring no anchor reaches (the kernel's .nvme): /proc/keys lists what we may view, of any owner."""
    try:
        with open(PROC_KEYS, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                found = keyring_in_proc_keys_line(line, name)
                if found is not None and owned_keyring(found, name):
                    return found
    except OSError:
        return None
    return None


def keyring_in_proc_keys_line(line: str, name: str) -> int | None:
    """The serial on one /proc/keys line if it is the keyring called name ("<hex serial> ... keyring name: ...")."""
    fields = line.split(None, 9)
    if len(fields) < 9 or fields[7] != "keyring" or fields[8].rstrip(":") != name:
        return None
    try:
        return int(fields[0], 16)
    except ValueError:
        return None


def find_keyring(name: str) -> int | None:
    """Serial of the keyring called name, searched from the user, session and process keyrings."""
    for anchor in ANCHORS:
        try:
            found = keyring.search(anchor, "keyring", name)
        except keyring.KeyringError:
            continue  # that anchor does not exist for this process
        if found is not None and owned_keyring(found, name):
            return found
    return _from_proc_keys(name)


def request_keyrings(accept_keyring: int, extra: Iterable[int], names: Iterable[str]) -> tuple[int, ...]:
    """The keyrings one request may search, in order, without duplicates."""
    ordered: list[int] = []
    if accept_keyring:
        ordered.append(accept_keyring)
    ordered.extend(serial for serial in extra if serial)
    for name in (*DEFAULT_KEYRINGS, *names):
        serial = find_keyring(name)
        if serial is not None:
            ordered.append(serial)
    return tuple(dict.fromkeys(ordered))


def load_key(serial: int) -> PskKey:
    """The PSK behind a kernel key serial; CredentialError if it is missing or unusable."""
    try:
        key_type, _uid, _gid, _perm, description = keyring.describe_key(serial)
    except keyring.KeyringError as exc:
        raise CredentialError(f"PSK key {serial}: {exc.strerror}") from None
    if key_type not in PSK_KEY_TYPES:
        raise CredentialError(f"key {serial} is a '{key_type}' key, not a PSK")
    try:
        secret = keyring.read_key(serial)
    except keyring.KeyringError as exc:
        raise CredentialError(f"PSK key {serial} ('{description}'): {exc.strerror}") from None
    try:
        hash_name = psk_hash(description, len(secret))
    except CredentialError:
        wipe(secret)
        raise
    return PskKey(identity=description.encode(), secret=secret, hash=hash_name, serial=serial)


def search_identity(keyrings: Iterable[int], identity: str) -> int | None:
    """Serial of the first PSK called identity in these keyrings ("psk" type before "user").

    identity comes from the peer: it is never logged (the kernel's error text would carry it)."""
    if len(identity.encode()) > MAX_DESCRIPTION:
        return None
    for ring in keyrings:
        for key_type in PSK_KEY_TYPES:
            try:
                found = keyring.search(ring, key_type, identity)
            except keyring.KeyringError as exc:
                log.debug("keyring %d not searchable: %s", ring, os.strerror(exc.errno))
                break
            if found is not None:
                return found
    return None
