"""[debug] tls for the OpenSSL backend: OpenSSL's message callback feeds the handshake's hsd.tlstrace.

Why the message callback: it hands over every handshake message and alert
in plaintext, whole, in both directions, as OpenSSL sends or parses it - the
same stream tlslite's record layer gives the tracer - while the info
callback only names states.  pyOpenSSL does not wrap it; the bindings that
come with cryptography (43 and later) declare SSL_CTX_set_msg_callback.  It
is installed only on contexts built for a traced handshake, so tracing off
costs nothing; each call finds its connection's tracer through OpenSSL's SSL
pointer, so a shared context carries no request's state.
"""

from __future__ import annotations

import weakref
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from hsd.tlstrace import TlsTrace

TRACED_TYPES = (20, 21, 22)  # change_cipher_spec, alert, handshake; not record headers (256, 257)

_traces: "weakref.WeakKeyDictionary[SSL.Connection, TlsTrace]" = weakref.WeakKeyDictionary()


@ffi.callback("void (*)(int, int, int, void *, size_t, SSL *, void *)")
def _on_message(write_p: int, _version: int, content_type: int, buf: Any, length: int, ssl: Any, _arg: Any) -> None:
    if content_type not in TRACED_TYPES:
        return
    try:
        conn = SSL.Connection._reverse_mapping.get(ssl)
        trace = _traces.get(conn) if conn is not None else None
        if trace is not None:
            trace.record(bool(write_p), content_type, bytes(ffi.buffer(buf, length)))
    except Exception:  # noqa: BLE001 - nothing may propagate into OpenSSL
        pass


def install(context: SSL.Context) -> None:
    """Route this context's handshake messages to the tracer of each connection that has one."""
    lib.SSL_CTX_set_msg_callback(context._context, _on_message)


def attach(conn: SSL.Connection, trace: TlsTrace | None) -> None:
    """conn's messages go to trace (None: nowhere); the entry goes with the connection."""
    if trace is not None:
        _traces[conn] = trace
