"""hsd's tlslite backend: a second, independent TLS 1.3 stack (tlslite-ng) for the kernel's consumers.

Registered under the ``hsd.backends`` entry-point group; pluggy registers this
module, so the hook implementations are the module-level functions below.
tlslite does no certificate path validation, so hsd.x509verify does it during
the handshake (see connection.py).  Pure Python: slower than OpenSSL, useful
as an independent implementation and where OpenSSL is not wanted.  Its record
ciphers and X25519 are computed by `cryptography` (accel.py); the protocol
itself stays tlslite's.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():  # tlslite-ng imports asyncore at import time: not something a user can act on
    warnings.filterwarnings("ignore", "The asyncore module is deprecated", DeprecationWarning)
    import tlslite

from hsd.context import HandshakeContext
from hsd.hookspecs import ALL_MODES, BackendInfo, Mode, Role, hookimpl
from hsd.psk import PskOffer
from hsd.session import Session

from . import accel
from .handshake import client_handshake, server_handshake
from .psk import client_psk_handshake, server_psk_handshake

NAME = "tlslite"
CERT_MODES = frozenset({Mode("client", "unauth"), Mode("client", "x509"), Mode("server", "x509")})
PSK_MODES = frozenset({Mode("client", "psk"), Mode("server", "psk")})

accel.install()


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        version=tlslite.__version__,
        modes=frozenset(ALL_MODES),
        description="TLS 1.3 via tlslite-ng (pure Python), one record at a time, no session tickets",
        extra={"library": f"tlslite-ng {tlslite.__version__}"},
    )


@hookimpl
def hsd_handshake(ctx: HandshakeContext) -> Session:
    if ctx.mode.role is Role.SERVER:
        return server_handshake(ctx)
    return client_handshake(ctx)


@hookimpl
def hsd_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    if ctx.mode.role is Role.SERVER:
        return server_psk_handshake(ctx, offer)
    return client_psk_handshake(ctx, offer)
