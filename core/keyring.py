"""Kernel keyrings through the raw add_key/keyctl syscalls (ctypes, no libkeyutils).

Small on purpose: read a key, describe it, search a keyring, add, link, unlink,
set permissions.  Every failure is a KeyringError carrying the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Any

from .secret import wipe

_SYSCALLS = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}
_ADD_KEY, _REQUEST_KEY, _KEYCTL = _SYSCALLS.get(platform.machine(), (248, 249, 250))

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_REVOKE = 3
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_INVALIDATE = 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class KeyringError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise KeyringError(err, f"{what}: {os.strerror(err)}")
    return ret


def _keyctl(op: int, *args: int | bytes | ctypes.Array | None) -> int:
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _libc.syscall(ctypes.c_long(_KEYCTL), ctypes.c_long(op), *cargs)


def add_key(key_type: str, description: str, payload: Any, keyring: int) -> int:
    """Add (or update) a key; returns its serial.

    A bytearray payload is passed to the kernel in place; anything else is
    first copied into a ctypes buffer that is zeroed after the call."""
    size = len(payload)
    buf: ctypes.Array | None = None  # a keyring has no payload: NULL, 0
    mine = not isinstance(payload, bytearray)
    if size:
        kind = ctypes.c_char * size
        buf = kind.from_buffer_copy(payload) if mine else kind.from_buffer(payload)  # bytearray: no copy
    try:
        ret = _libc.syscall(ctypes.c_long(_ADD_KEY), key_type.encode(), description.encode(), buf,
                            ctypes.c_size_t(size), ctypes.c_long(keyring))
    finally:
        if buf is not None and mine:
            wipe(buf)
        del buf
    return _check(ret, f"add_key {key_type} '{description}'")


def keyring_id(spec: int, create: bool = False) -> int:
    return _check(_keyctl(KEYCTL_GET_KEYRING_ID, spec, int(create)), "get keyring id")


def read_key(serial: int) -> bytearray:
    """A key's payload, in a bytearray the caller owns and wipes (hsd.secret.wipe) after use.

    KEYCTL_READ writes into a ctypes buffer; its bytes are moved straight into
    the bytearray (no immutable `bytes` in between) and the buffer is zeroed."""
    size = _check(_keyctl(KEYCTL_READ, serial, None, 0), f"read key {serial}")
    while True:
        buf = ctypes.create_string_buffer(max(size, 1))
        try:
            got = _check(_keyctl(KEYCTL_READ, serial, buf, size), f"read key {serial}")
            if got <= size:
                out = bytearray(got)
                if got:
                    ctypes.memmove((ctypes.c_char * got).from_buffer(out), buf, got)
                return out
        finally:
            wipe(buf)
        size = got  # the key grew between the two calls: read again with room for it


def describe_key(serial: int) -> tuple[str, int, int, int, str]:
    """(type, uid, gid, perm, description) as the kernel reports them."""
    size = _check(_keyctl(KEYCTL_DESCRIBE, serial, None, 0), f"describe key {serial}")
    buf = ctypes.create_string_buffer(size)
    _check(_keyctl(KEYCTL_DESCRIBE, serial, buf, size), f"describe key {serial}")
    return parse_description(buf.value)


def parse_description(raw: bytes) -> tuple[str, int, int, int, str]:
    """KEYCTL_DESCRIBE's "type;uid;gid;perm;description" (the description may itself hold ';')."""
    fields = raw.decode(errors="replace").split(";", 4)
    if len(fields) != 5:
        raise ValueError(f"key description has {len(fields)} fields, not 5")
    ktype, uid, gid, perm, desc = fields
    return ktype, int(uid), int(gid), int(perm, 16), desc


def search(keyring: int, key_type: str, description: str) -> int | None:
    """Serial of the matching key reachable from keyring, or None."""
    ret = _keyctl(KEYCTL_SEARCH, keyring, key_type.encode(), description.encode(), 0)
    if ret < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
            return None
        raise KeyringError(err, f"search {key_type} '{description}': {os.strerror(err)}")
    return ret


def link(key: int, keyring: int) -> None:
    _check(_keyctl(KEYCTL_LINK, key, keyring), f"link {key} into {keyring}")


def unlink(key: int, keyring: int) -> None:
    _check(_keyctl(KEYCTL_UNLINK, key, keyring), f"unlink {key} from {keyring}")


def set_perm(serial: int, perm: int) -> None:
    _check(_keyctl(KEYCTL_SETPERM, serial, perm), f"setperm {serial}")


def invalidate(serial: int) -> None:
    _check(_keyctl(KEYCTL_INVALIDATE, serial), f"invalidate {serial}")
