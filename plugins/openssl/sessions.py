"""Turn a finished OpenSSL connection into the hsd Session the core installs."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from hsd.errors import HandshakeError
from hsd.session import Session

from .hello import ServerHelloReader
from .secrets import TrafficSecrets


def negotiated_group(conn: SSL.Connection, hello: ServerHelloReader | None = None) -> str | None:
    """The key-exchange group's name, as OpenSSL names it; where the bindings cannot ask
    (cryptography 43's, Debian trixie's, have no SSL_get0_group_name nor any other call that
    names the group) the group the ServerHello's key_share named.  None: no key exchange (psk_ke)."""
    if not hasattr(lib, "SSL_get0_group_name"):
        return hello.group if hello is not None else None
    name = lib.SSL_get0_group_name(conn._ssl)
    return ffi.string(name).decode() if name != ffi.NULL else None


def peer_chain_der(conn: SSL.Connection) -> tuple[bytes, ...]:
    """The peer's certificates as sent, leaf first (OpenSSL omits the leaf on servers)."""
    leaf = conn.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return ()
    chain = list(conn.get_peer_cert_chain(as_cryptography=True) or [])
    if not chain or chain[0] != leaf:
        chain.insert(0, leaf)
    return tuple(cert.public_bytes(Encoding.DER) for cert in chain)


def build_session(conn: SSL.Connection, secrets: TrafficSecrets, role: str,
                  hello: ServerHelloReader | None = None) -> Session:
    """Cipher, secrets and counters: nothing was sent or read under the app secrets yet."""
    if conn.get_protocol_version_name() != "TLSv1.3":
        raise HandshakeError(f"negotiated {conn.get_protocol_version_name()}, only TLS 1.3 is supported")
    tx, rx = secrets.for_role(role)
    return Session(
        cipher=conn.get_cipher_name(),
        tx_secret=tx,
        rx_secret=rx,
        tx_seq=0,
        rx_seq=0,
        group=negotiated_group(conn, hello),
        peer_certificates=peer_chain_der(conn),
        details={"backend": "openssl"},
    )
