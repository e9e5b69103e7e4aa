"""The TLS 1.3 protocol settings every OpenSSL context of hsd gets.

Only suites the kernel can take over are offered (all four kTLS TLS 1.3 suites,
in the reference daemon's order; CCM is off by default in OpenSSL, so the list
is explicit).  Groups stay OpenSSL's default (hybrid ML-KEM first).
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import lib

KTLS_SUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_128_CCM_SHA256",
)


def tls13_context(suites: tuple[str, ...] = KTLS_SUITES) -> SSL.Context:
    """A TLS-1.3-only context with the given suites and no session cache."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    # The binding rather than Context.set_tls13_ciphersuites, which pyOpenSSL added in 25.1:
    # Debian trixie's 25.0 lacks it, and pyproject allows 25.0.
    if lib.SSL_CTX_set_ciphersuites(context._context, ":".join(suites).encode()) != 1:
        raise SSL.Error(f"OpenSSL rejects the TLS 1.3 suites {':'.join(suites)}")
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    return context
