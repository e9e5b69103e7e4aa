"""An example hsd backend: TLS 1.3 client/unauth with Python's standard ``ssl`` module.

Written against the public plugin contract only (hsd.hookspecs), as a guide
for plugin authors (see docs/plugins.md).  One mode, verification on by default.
"""

from __future__ import annotations

import ssl

from hsd.context import HandshakeContext
from hsd.hookspecs import API_VERSION, BackendInfo, Mode, hookimpl
from hsd.session import Session

from .handshake import client_handshake

NAME = "stdlib-ssl"
MODES = frozenset({Mode("client", "unauth")})
# Python's ssl cannot choose TLS 1.3 suites, so OpenSSL's default three are what it offers.
SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(name=NAME, version="0.1.0", modes=MODES, api_version=API_VERSION,
                       description="example: Python ssl over memory BIOs, client/unauth only",
                       extra={"library": ssl.OPENSSL_VERSION, "tls13_suites": SUITES})


@hookimpl
def hsd_handshake(ctx: HandshakeContext) -> Session:
    # hsd calls this only for requests routed to this backend, in a mode it declared (client/unauth)
    return client_handshake(ctx)
