"""Reuse of SSL.Context objects across handshakes whose contexts would be identical.

Building a context per request (SSL_CTX_new, trust anchors converted and
added, our chain and key installed and checked) was a large part of the
backend's CPU: reusing it took hsd's server x509 P-256 handshakes from about
2.3 to 1.5 ms of daemon CPU each (docs/performance.md).  Everything that shapes a context is in its cache key;
what belongs to one connection (host name / IP check, SNI, secret capture,
verification outcome, trace logging) is set on the SSL.Connection or reached
through conn.get_app_data(), so a cached context carries no request's state.

The key is made of the parsed credentials themselves, not of file names: the
certificates (chain, trust anchors, x509.pq chain) by content, our private
keys by their public half (a key that does not match the certificate gives a
different key, so a fresh build, which then fails as it always did), CRLs by
object identity (core/credentials.py caches them per file mtime and size, so
a changed file gives new objects), and the system trust store by the mtime and
size of OpenSSL's default CA file and directory (and rebuilt every 5 minutes).
Requests that name their own key material in a keyring are never cached:
their contexts are built, used once and dropped, as before.

A cached context keeps our private key inside OpenSSL between handshakes (the
same key hsd.credentials keeps parsed while its file is unchanged); it never holds
a peer's data or any traffic secret.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL

from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials, public_der

CACHE_SIZE = 32
SYSTEM_TRUST_TTL = 300


class _Same:
    """Hashable by identity, for parsed objects that are not hashable (CRLs); keeps them alive."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


class ContextCache:
    """A bounded LRU of built contexts, safe to use from many handshake threads."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, SSL.Context] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def obtain(self, key: Hashable | None, build: Callable[[], SSL.Context]) -> SSL.Context:
        """The cached context for key, or a new one from build() (cached unless key is None)."""
        if key is None:
            return build()
        with self._lock:
            context = self._items.get(key)
            if context is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return context
            self.misses += 1
        context = build()  # outside the lock: a slow build must not stall other handshakes
        with self._lock:
            self._items[key] = context
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return context

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget_after_fork(self) -> None:
        """In a forked child: another thread may have held our lock, or an OpenSSL lock inside a
        cached context (a handshake in progress), at the moment of the fork; start empty."""
        self._lock = threading.Lock()
        self._items = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


contexts = ContextCache()
os.register_at_fork(after_in_child=contexts.forget_after_fork)  # [hsd] isolation = process forks per handshake


def _public_half(key: PrivateKeyTypes | None, remember: bool) -> bytes | None:
    if key is None:
        return None
    return public_der(key, remember)  # remembered for the file cache's keys: asked of the same key every request


def _stamp(path: str | None) -> tuple[str, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)


def _system_trust_stamp() -> tuple[Any, ...]:
    """The system store: a changed default CA file or directory gives a new context at once, and
    contexts on it are rebuilt every SYSTEM_TRUST_TTL seconds anyway (pyOpenSSL may fall back to
    other well-known locations than the ones the ssl module reports)."""
    paths = ssl.get_default_verify_paths()
    return ("system", int(time.monotonic() // SYSTEM_TRUST_TTL), _stamp(paths.openssl_cafile),
            _stamp(paths.openssl_capath))


def context_key(ctx: HandshakeContext, creds: X509Credentials) -> Hashable | None:
    """Everything that shapes this request's context; None when it must not be shared."""
    request = ctx.request
    if request.certificate or request.privkey:
        return None  # key material from the request's keyring: one context per request
    trust: Hashable = _system_trust_stamp() if creds.trust is None else tuple(creds.trust)
    return (
        request.role,
        request.auth,
        creds.verify_peer,
        creds.require_peer_cert,
        tuple(creds.allowed_sans),
        tuple(creds.chain),
        _public_half(creds.key, creds.from_files),
        trust,
        tuple(_Same(crl) for crl in creds.crls),
        tuple(creds.pq_chain),
        _public_half(creds.pq_key, True),  # x509.pq.* keys come from files only
        ctx.tls_trace is not None,  # a traced handshake's context has the message callback
    )
