"""Capture the TLS 1.3 application traffic secrets through OpenSSL's keylog callback.

The keylog line is the only place OpenSSL exposes them.  pyOpenSSL's own
set_keylog_callback turns each line into an immutable `bytes` (hex text of
every secret of the handshake) before Python sees it, so hsd registers its own
cffi callback instead: the `const char *` line is copied into a bytearray,
the two application secrets are decoded from it into bytearrays the core
wipes after kTLS has them, and the line copy is zeroed before the callback
returns.  OpenSSL's own buffer is OpenSSL's: it frees it with
OPENSSL_clear_free right after the callback (and may read it once more for
its SSLKEYLOGFILE feature), so it is not written to here.  The line is never
logged or stored.

A context shared by many connections (plugins/openssl/contexts.py) gets one
routing callback that hands each line to the sink of the connection it
belongs to (conn.get_app_data()), so one handshake's secrets never reach another.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from hsd.errors import HandshakeError
from hsd.secret import fromhex_into, wipe

CLIENT_LABEL = b"CLIENT_TRAFFIC_SECRET_0"
SERVER_LABEL = b"SERVER_TRAFFIC_SECRET_0"
MAX_LINE = 1024  # the longest NSS keylog line is ~230 characters; anything longer is not one

_strnlen = ctypes.CDLL(None).strnlen
_strnlen.restype = ctypes.c_size_t
_strnlen.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

LineSink = Callable[[SSL.Connection, bytearray], None]


class TrafficSecrets:
    """Collects CLIENT/SERVER_TRAFFIC_SECRET_0 of the one connection on a context."""

    def __init__(self) -> None:
        self.client: bytearray | None = None
        self.server: bytearray | None = None

    def attach(self, context: SSL.Context) -> None:
        """For a context of this one connection (PSK): the sink is fixed."""
        set_keylog_sink(context, self._on_keylog)

    def _on_keylog(self, conn: SSL.Connection, line: bytearray) -> None:
        """Keep the secret of an application traffic secret line; `line` is the caller's to wipe."""
        for label in (CLIENT_LABEL, SERVER_LABEL):
            if line.startswith(label + b" "):
                break
        else:
            return
        with memoryview(line) as view:
            secret = fromhex_into(view[line.rfind(b" ") + 1:])
        old = self.client if label == CLIENT_LABEL else self.server
        wipe(old)  # a repeated line (should not happen) leaves no unwiped predecessor
        if label == CLIENT_LABEL:
            self.client = secret
        else:
            self.server = secret

    def for_role(self, role: str) -> tuple[bytearray, bytearray]:
        """(tx, rx) for our role; raises when OpenSSL did not report both."""
        if self.client is None or self.server is None:
            raise HandshakeError("OpenSSL completed the handshake without reporting traffic secrets")
        if role == "server":
            return self.server, self.client
        return self.client, self.server

    def wipe(self) -> None:
        wipe(self.client)
        wipe(self.server)


def set_keylog_sink(context: SSL.Context, sink: LineSink) -> None:
    """SSL_CTX_set_keylog_callback with a callback that hands `sink` a wipeable copy of each line.

    The callback runs inside OpenSSL: it never raises (an error there is dropped, and
    the handshake then fails for want of secrets), and it zeroes its copy of the line
    whatever the sink did."""
    if not getattr(lib, "Cryptography_HAS_KEYLOG", 0):
        raise HandshakeError("this OpenSSL has no keylog callback: traffic secrets cannot be read")

    @ffi.callback("void (*)(const SSL *, const char *)")
    def on_line(ssl, line) -> None:
        copy = bytearray()
        try:
            if not _wanted(line):
                return  # a handshake, early or exporter secret: never copied
            size = _strnlen(int(ffi.cast("uintptr_t", line)), MAX_LINE + 1)
            if size > MAX_LINE:
                return
            copy = bytearray(size)
            ffi.memmove(copy, line, size)
            conn = SSL.Connection._reverse_mapping.get(ssl)
            if conn is not None:
                sink(conn, copy)
        except Exception:  # noqa: BLE001 - nothing may propagate into OpenSSL
            pass
        finally:
            wipe(copy)

    context._hsd_keylog_callback = on_line  # the cdata must live as long as the context uses it
    lib.SSL_CTX_set_keylog_callback(context._context, on_line)


def _wanted(line) -> bool:
    """False for a line that cannot name an application traffic secret, read from its label alone.

    Of the five lines of a TLS 1.3 handshake only CLIENT_/SERVER_TRAFFIC_SECRET_0
    are kept (their full label is checked on the copy).  Only the first 8
    characters are read (ffi.string stops at a NUL, so a short line is never
    overrun): label text, never secret.  Skipping the other three lines spares
    their copy, wipe and routing."""
    return ffi.string(line, 8)[7:] == b"T"  # "CLIENT_T" / "SERVER_T"; handshake, early, exporter differ here


def route_keylog(context: SSL.Context) -> None:
    """For a shared context: each line goes to its own connection's sink, or nowhere."""
    set_keylog_sink(context, _route_line)


def _route_line(conn: SSL.Connection, line: bytearray) -> None:
    # No sink (should not happen): drop the line; the handshake then fails for want of secrets.
    sink = getattr(conn.get_app_data(), "secrets", None)
    if isinstance(sink, TrafficSecrets):
        sink._on_keylog(conn, line)
