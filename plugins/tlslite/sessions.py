"""Turn a finished tlslite connection into the hsd Session the core installs.

Secrets come from tlslite's session (cl_app_secret / sr_app_secret), the
record counters from its record layer, so a record tlslite already sent or
read under the application keys (it sends none) would still be accounted for.
Once hsd has its own copies, tlslite's are zeroed (ObservedConnection.wipe_secrets):
the connection is never used again.
"""

from __future__ import annotations

from tlslite.constants import CipherSuite, GroupName

from hsd.errors import HandshakeError
from hsd.session import Session

from .connection import ObservedConnection
from .identity import chain_der


def record_states(conn: ObservedConnection):
    """(write, read) ConnectionState of tlslite's record layer (private names of tlslite-ng 0.8)."""
    layer = conn._recordLayer
    return layer._writeState, layer._readState


def build_session(conn: ObservedConnection, role: str) -> Session:
    """hsd's Session from the finished connection; tlslite's secrets are zeroed whatever happens."""
    try:
        return _extract(conn, role)
    finally:
        conn.wipe_secrets()


def _extract(conn: ObservedConnection, role: str) -> Session:
    if conn.version != (3, 4):
        raise HandshakeError(f"negotiated version {conn.version}, only TLS 1.3 is supported")
    session = conn.session
    client, server = bytearray(session.cl_app_secret), bytearray(session.sr_app_secret)
    tx, rx = (server, client) if role == "server" else (client, server)
    write, read = record_states(conn)
    peer = session.clientCertChain if role == "server" else session.serverCertChain
    group = GroupName.toRepr(conn.ecdhCurve) if conn.ecdhCurve is not None else None
    return Session(
        cipher=CipherSuite.ietfNames[session.cipherSuite],
        tx_secret=tx,
        rx_secret=rx,
        tx_seq=write.seqnum,
        rx_seq=read.seqnum,
        group=group,
        peer_certificates=chain_der(peer),
        peer_record_size_limit=conn.peer_record_size_limit,
        details={"backend": "tlslite"},
    )
