"""One handshake through a backend's hooks, without the dispatcher: for backend and policy plugin tests.

The daemon turns an ACCEPT into a HandshakeContext and hands it to the plugin
host, which routes it to the backend chosen for its mode (and for PSK to the
policy plugin first) under the rules every backend obeys.  These helpers do
exactly that on a socket the test connected itself (to a real peer), so a
plugin author can test one backend at a time and see the DONE status and
reason a failure gives.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials
from hsd.dispatcher import settings_of
from hsd.errors import HandshakeError
from hsd.plugins import PluginHost
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session

AUTH_MODES = {"unauth": AuthMode.UNAUTH, "x509": AuthMode.X509, "psk": AuthMode.PSK}


def plugin_host(*plugins: object, config: Config | None = None) -> PluginHost:
    """A plugin host with exactly these plugins (modules, classes or instances), no entry-point discovery.

    Each is checked as discovery would check it; a refused one raises (naming the plugin and why)."""
    host = PluginHost(config if config is not None else Config())
    for plugin in plugins:
        name = getattr(plugin, "__name__", type(plugin).__name__)
        if host.add(name, plugin) is None:
            raise ValueError(f"plugin {name} refused: {host.problems[-1].reason if host.problems else 'disabled'}")
    return host


plugin_manager = plugin_host  # the name API 1's test kit used


def handshake_context(sock: socket.socket, role: str, auth: str, *, backend: str, config: Config | None = None,
                      x509: X509Credentials | None = None, timeout: float = 10.0,
                      peername: str | None = "localhost", **request_fields: Any) -> HandshakeContext:
    """The context the dispatcher would build for an ACCEPT of this role ("client"/"server") and auth.

    config supplies what a plugin may see of it (ctx.settings); request_fields are
    further HandshakeRequest fields (peer_identities, keyring, ...)."""
    request = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AUTH_MODES[auth], timeout_ms=int(timeout * 1000), peername=peername, **request_fields)
    return HandshakeContext(request=request, sock=sock, deadline=time.monotonic() + timeout, backend=backend,
                            x509=x509 if x509 is not None else X509Credentials(),
                            settings=settings_of(config if config is not None else Config()))


def run_handshake(host: PluginHost, ctx: HandshakeContext) -> Session:
    """The request routed as the dispatcher routes it: to ctx.backend, through the core's rules."""
    return host.handshake(ctx)


def expect_handshake_error(status: int, reason: str, call: Callable[..., object], *args: Any,
                           error: type[HandshakeError] = HandshakeError, **kwargs: Any) -> HandshakeError:
    """call(*args, **kwargs) must raise error with this DONE status and reason among its words."""
    try:
        call(*args, **kwargs)
    except error as exc:
        assert exc.status == status, f"status {exc.status}, expected {status}: {exc}"
        assert reason in exc.reason, exc.reason
        return exc
    raise AssertionError(f"no {error.__name__} (expected status {status}, reason {reason!r})")
