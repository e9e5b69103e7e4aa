"""Turn a finished OpenSSL connection into the hsd Session the core installs."""

from __future__ import annotations

from OpenSSL import SSL, crypto
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


def group_reader() -> ServerHelloReader | None:
    """A ServerHello reader where the bindings cannot name the group, else None (no parsing per record)."""
    return None if hasattr(lib, "SSL_get0_group_name") else ServerHelloReader()


def peer_chain_der(conn: SSL.Connection) -> tuple[bytes, ...]:
    """The peer's certificates as sent, leaf first (OpenSSL omits the leaf on servers).

    Straight from OpenSSL's X509 to DER: going through cryptography objects
    encoded and parsed every certificate twice more, per handshake."""
    leaf = conn.get_peer_certificate()
    if leaf is None:
        return ()
    leaf_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)
    chain = [crypto.dump_certificate(crypto.FILETYPE_ASN1, cert) for cert in conn.get_peer_cert_chain() or ()]
    if not chain or chain[0] != leaf_der:
        chain.insert(0, leaf_der)
    return tuple(chain)


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
