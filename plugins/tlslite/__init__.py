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

import importlib.util
import threading
import warnings
from types import ModuleType

from hsd.context import HandshakeContext
from hsd.hookspecs import ALL_MODES, BackendInfo, Mode, Role, hookimpl
from hsd.psk import PskOffer
from hsd.session import Session

NAME = "tlslite"
CERT_MODES = frozenset({Mode("client", "unauth"), Mode("client", "x509"), Mode("server", "x509")})
PSK_MODES = frozenset({Mode("client", "psk"), Mode("server", "psk")})

# tlslite-ng costs about 50 ms to import: a daemon that routes no mode here never pays it
# (docs/performance.md, "Start-up").  Loading the plugin only asks whether the library is
# there, so `hsd plugins` / `hsd check` still report it unavailable, the same way, when not.
if importlib.util.find_spec("tlslite") is None:
    raise ModuleNotFoundError("No module named 'tlslite'", name="tlslite")

_lock = threading.Lock()
_loaded: tuple[ModuleType, ModuleType] | None = None


def _library() -> tuple[ModuleType, ModuleType]:
    """tlslite with the library's ciphers installed, and the two modules that drive it; imported once."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                with warnings.catch_warnings():  # tlslite-ng imports asyncore: not something a user can act on
                    warnings.filterwarnings("ignore", "The asyncore module is deprecated", DeprecationWarning)
                    import tlslite  # noqa: F401

                from . import accel, handshake, psk

                accel.install()
                _loaded = (handshake, psk)
    return _loaded


def _version() -> str:
    """tlslite-ng's version without importing it: the distribution's metadata, else the module's own."""
    from importlib import metadata

    try:
        return metadata.version("tlslite-ng")
    except metadata.PackageNotFoundError:  # a copy without dist-info (e.g. on PYTHONPATH)
        import tlslite

        return str(tlslite.__version__)


@hookimpl
def hsd_backend_info() -> BackendInfo:
    version = _version()
    return BackendInfo(
        name=NAME,
        version=version,
        modes=frozenset(ALL_MODES),
        description="TLS 1.3 via tlslite-ng (pure Python), one record at a time, no session tickets",
        extra={"library": f"tlslite-ng {version}"},
    )


@hookimpl
def hsd_handshake(ctx: HandshakeContext) -> Session:
    handshake, _psk = _library()
    if ctx.mode.role is Role.SERVER:
        return handshake.server_handshake(ctx)
    return handshake.client_handshake(ctx)


@hookimpl
def hsd_psk_handshake(ctx: HandshakeContext, offer: PskOffer) -> Session:
    _handshake, psk = _library()
    if ctx.mode.role is Role.SERVER:
        return psk.server_psk_handshake(ctx, offer)
    return psk.client_psk_handshake(ctx, offer)
