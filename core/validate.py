"""What a plugin hands back is checked at the boundary, before the core trusts any of it.

A Session is third-party data: a wrong type found later (a `bytes` secret that
cannot be wiped, a string where a serial belongs) would fail deep inside kTLS
installation, identity reporting or clean-up, far from the plugin that caused
it.  check_session() turns every such contract breach into one HandshakeError
(EIO) naming the backend, so the request fails cleanly with its DONE.
"""

from __future__ import annotations

import errno
import logging
from typing import Iterator

from .errors import HandshakeError, KtlsError
from .ktls import RECORD_SIZE_LIMIT_MIN, cipher_spec
from .secret import wipe_all
from .session import Session

log = logging.getLogger("hsd")

MAX_SECRET = 64  # bytes; no TLS 1.3 hash is longer (SHA-512)
U16_MAX = 0xFFFF  # the extension's value is a uint16
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


class MalformedSession(HandshakeError):
    """A backend returned something that is not a well-formed Session (a plugin bug)."""

    status = errno.EIO


def check_session(result: object, backend: str) -> Session:
    """result itself when it is a well-formed Session; else log and raise MalformedSession (EIO)."""
    problems = list(_problems(result))
    if not problems:
        assert isinstance(result, Session)
        return result
    reason = f"backend {backend!r} returned a malformed session: {'; '.join(problems)}"
    log.error("%s", reason)
    raise MalformedSession(reason)


def scrub(result: object) -> None:
    """Zero whatever secret buffers a (possibly malformed) result holds that can be zeroed; never raises."""
    wipe_all(getattr(result, "tx_secret", None), getattr(result, "rx_secret", None))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problems(result: object) -> Iterator[str]:
    if not isinstance(result, Session):
        yield f"a {type(result).__name__}, not a Session"
        return
    secret_size: int | None = None
    if not isinstance(result.cipher, str):
        yield f"cipher is {type(result.cipher).__name__}, not str"
    else:
        try:
            secret_size = cipher_spec(result.cipher).hash.digest_size
        except KtlsError:
            secret_size = None  # a suite kTLS lacks: installation refuses it with EOPNOTSUPP
    for name in ("tx_secret", "rx_secret"):
        yield from _secret_problems(name, getattr(result, name), secret_size)
    for name in ("tx_seq", "rx_seq"):
        value = getattr(result, name)
        if not _is_int(value) or not 0 <= value <= U64_MAX:
            yield f"{name} is not a record count (an int in 0..2^64-1)"
    if not _is_int(result.version):
        yield f"version is {type(result.version).__name__}, not int"
    if result.group is not None and not isinstance(result.group, str):
        yield f"group is {type(result.group).__name__}, not str or None"
    if not isinstance(result.remote_auth, tuple) or not all(
            _is_int(s) and 0 <= s <= U32_MAX for s in result.remote_auth):
        yield "remote_auth is not a tuple of key serials (ints in 0..2^32-1)"
    if not isinstance(result.peer_certificates, tuple) or not all(
            isinstance(der, (bytes, bytearray)) and der for der in result.peer_certificates):
        yield "peer_certificates is not a tuple of non-empty DER bytes"
    if result.psk_identity is not None and not isinstance(result.psk_identity, (bytes, bytearray)):
        yield f"psk_identity is {type(result.psk_identity).__name__}, not bytes or None"
    limit = result.peer_record_size_limit
    if limit is not None and (not _is_int(limit) or not RECORD_SIZE_LIMIT_MIN <= limit <= U16_MAX):
        yield f"peer_record_size_limit is not None or an RFC 8449 limit (an int in {RECORD_SIZE_LIMIT_MIN}..{U16_MAX})"
    if not isinstance(result.details, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in result.details.items()):
        yield "details is not a dict of str to str"


def _secret_problems(name: str, value: object, size: int | None) -> Iterator[str]:
    # never the value itself: only its type and length may be logged
    if not isinstance(value, bytearray):
        yield f"{name} is {type(value).__name__}, not bytearray (the core could not wipe it)"
    elif size is not None and len(value) != size:
        yield f"{name} is {len(value)} bytes, the suite's traffic secrets are {size}"
    elif not 0 < len(value) <= MAX_SECRET:
        yield f"{name} is {len(value)} bytes, not 1..{MAX_SECRET}"
