"""hsd's OpenSSL backend: TLS 1.3 handshakes through pyOpenSSL for the kernel's consumers.

Registered under the ``hsd.backends`` entry-point group; pluggy registers this
module, so the hook implementations are the module-level functions below.
The host calls them only for a request routed to this backend: client/unauth,
client/x509 and server/x509 here, the PSK mechanics in plugins/openssl/psk.py.
"""

from __future__ import annotations

import OpenSSL

from hsd.context import HandshakeContext
from hsd.hookspecs import BackendInfo, Mode, Role, hookimpl
from hsd.session import Session

from .handshake import client_handshake, server_handshake
from .psk import hsd_psk_handshake  # noqa: F401  (a hookimpl pluggy finds on this module)

NAME = "openssl"
CERT_MODES = frozenset({Mode("client", "unauth"), Mode("client", "x509"), Mode("server", "x509")})
PSK_MODES = frozenset({Mode("client", "psk"), Mode("server", "psk")})


def _library_version() -> str:
    from OpenSSL._util import ffi, lib

    return ffi.string(lib.OpenSSL_version(0)).decode()


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        version=OpenSSL.__version__,
        modes=CERT_MODES | PSK_MODES,
        description="TLS 1.3 via pyOpenSSL over memory BIOs (no session tickets)",
        extra={"library": _library_version()},
    )


@hookimpl
def hsd_handshake(ctx: HandshakeContext) -> Session:
    if ctx.mode.role is Role.SERVER:
        return server_handshake(ctx)
    return client_handshake(ctx)
