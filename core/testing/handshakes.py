"""One handshake through a backend's hooks, without the dispatcher: for backend and policy plugin tests.

The daemon turns an ACCEPT into a HandshakeContext and calls ``hsd_handshake``
on every registered plugin.  These helpers do exactly that on a socket the test
connected itself (to a real peer), so a plugin author can test one backend at a
time with hsd's hookspecs, and see the DONE status and reason a failure gives.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import pluggy

from hsd.config import Config
from hsd.context import HandshakeContext
from hsd.credentials import X509Credentials
from hsd.errors import HandshakeError
from hsd.hookspecs import PROJECT, HookSpecs
from hsd.protocol import AuthMode, HandshakeRequest, MessageType
from hsd.session import Session

AUTH_MODES = {"unauth": AuthMode.UNAUTH, "x509": AuthMode.X509, "psk": AuthMode.PSK}


def plugin_manager(*plugins: object) -> pluggy.PluginManager:
    """hsd's hookspecs with exactly these plugins registered (no entry-point discovery)."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    for plugin in plugins:
        manager.register(plugin)
    return manager


def handshake_context(sock: socket.socket, role: str, auth: str, *, backend: str, config: Config | None = None,
                      x509: X509Credentials | None = None, hook: Any = None, timeout: float = 10.0,
                      peername: str | None = "localhost", **request_fields: Any) -> HandshakeContext:
    """The context the dispatcher would build for an ACCEPT of this role ("client"/"server") and auth.

    request_fields are further HandshakeRequest fields (peer_identities, keyring, ...)."""
    request = HandshakeRequest(
        sockfd=sock.fileno(),
        message_type=MessageType.CLIENTHELLO if role == "client" else MessageType.SERVERHELLO,
        auth_mode=AUTH_MODES[auth], timeout_ms=int(timeout * 1000), peername=peername, **request_fields)
    return HandshakeContext(request=request, sock=sock, deadline=time.monotonic() + timeout, backend=backend,
                            config=config if config is not None else Config(), x509=x509, hook=hook)


def run_handshake(manager: pluggy.PluginManager, ctx: HandshakeContext) -> Session:
    """hsd_handshake on every plugin, as the dispatcher calls it; a plugin must take the request."""
    if ctx.hook is None:
        ctx.hook = manager.hook  # policy plugins (PSK) call backends through it
    session = manager.hook.hsd_handshake(ctx=ctx)
    assert session is not None, f"no plugin took {ctx.backend} {ctx.request.role}/{ctx.request.auth}"
    return session


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
