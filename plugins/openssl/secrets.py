"""Capture the TLS 1.3 application traffic secrets through OpenSSL's keylog callback.

The keylog line is the only place pyOpenSSL exposes them.  Only the two
application secrets are kept, in bytearrays the core wipes after kTLS has them;
the line itself is never logged or stored.

A context shared by many connections (plugins/openssl/contexts.py) gets one
routing callback that hands each line to the sink of the connection it
belongs to (conn.get_app_data()), so one handshake's secrets never reach another.
"""

from __future__ import annotations

from OpenSSL import SSL

from hsd.errors import HandshakeError

CLIENT_LABEL = b"CLIENT_TRAFFIC_SECRET_0"
SERVER_LABEL = b"SERVER_TRAFFIC_SECRET_0"


class TrafficSecrets:
    """Collects CLIENT/SERVER_TRAFFIC_SECRET_0 of the one connection on a context."""

    def __init__(self) -> None:
        self.client: bytearray | None = None
        self.server: bytearray | None = None

    def attach(self, context: SSL.Context) -> None:
        """For a context of this one connection (PSK): the sink is fixed."""
        context.set_keylog_callback(self._on_keylog)

    def _on_keylog(self, conn: SSL.Connection, line: bytes) -> None:
        label, _, rest = line.partition(b" ")
        if label not in (CLIENT_LABEL, SERVER_LABEL):
            return
        secret = bytearray.fromhex(rest.rpartition(b" ")[2].decode("ascii"))
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
        for buf in (self.client, self.server):
            if buf is not None:
                buf[:] = bytes(len(buf))


def route_keylog(context: SSL.Context) -> None:
    """For a shared context: each line goes to its own connection's sink, or nowhere."""
    context.set_keylog_callback(_route_line)


def _route_line(conn: SSL.Connection, line: bytes) -> None:
    # No sink (should not happen): drop the line; the handshake then fails for want of secrets.
    sink = getattr(conn.get_app_data(), "secrets", None)
    if isinstance(sink, TrafficSecrets):
        sink._on_keylog(conn, line)
