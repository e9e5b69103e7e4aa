"""What a backend hands back after a successful TLS 1.3 handshake.

A backend reports facts from its library - the suite, the traffic secrets,
the record counters, what the peer presented (certificates, or the PSK
identity it finished with), the record size limit the peer announced - and
the core decides the rest: it installs kTLS from the secrets and counters
(capping TX records to that limit), and it alone turns the facts into the identity
DONE reports (remote_auth).  Secrets are kept in bytearrays so
they can be overwritten as soon as the kernel has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .secret import wipe_all


@dataclass
class Session:
    cipher: str  # IANA suite name, e.g. "TLS_AES_128_GCM_SHA256"
    tx_secret: bytearray  # our application traffic secret (we write with it)
    rx_secret: bytearray  # the peer's application traffic secret (we read with it)
    tx_seq: int = 0  # records already sent under tx_secret
    rx_seq: int = 0  # records already read under rx_secret
    version: int = 0x0304  # the negotiated protocol version; kTLS is installed for TLS 1.3 only
    group: str | None = None  # key-exchange group, for logging (None: psk_ke, or the library cannot tell)
    peer_certificates: tuple[bytes, ...] = ()  # DER, leaf first, as the peer sent them (x509 modes)
    psk_identity: bytes | None = None  # PSK modes: the identity the library finished the handshake with
    # RFC 8449: the record_size_limit the peer announced in a negotiated extension (in TLS 1.3 it
    # counts the inner content type byte); the core limits kTLS TX records to it.  None: not agreed.
    peer_record_size_limit: int | None = None
    details: dict[str, str] = field(default_factory=dict)  # extra, loggable facts (never secrets)
    remote_auth: tuple[int, ...] = ()  # set by the core, never by a backend: the serials DONE reports

    def wipe(self) -> None:
        """Overwrite the secrets in place; the session is useless afterwards.

        Never raises: it runs in the dispatcher's `finally`, where a failure
        would cost the request its DONE.  A secret a plugin handed over as
        immutable bytes cannot be zeroed and is skipped."""
        wipe_all(self.tx_secret, self.rx_secret)

    def __repr__(self) -> str:  # never print secrets
        return f"Session(cipher={self.cipher!r}, group={self.group!r}, tx_seq={self.tx_seq}, rx_seq={self.rx_seq})"
