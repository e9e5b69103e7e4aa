"""The tlslite HandshakeSettings every hsd handshake uses: TLS 1.3 only, kTLS suites, nothing extra.

Only suites the kernel can take over, in the OpenSSL backend's order; only
TLS 1.3 groups (tlslite's default list has the TLS 1.2 brainpool curves); no
session tickets, no certificate compression (OpenSSL peers and kTLS do not
need it, and it broke mTLS against OpenSSL), no heartbeat.  record_size_limit
(RFC 8449) is agreed: we announce the protocol's ceiling, 2^14+1 (kTLS RX reads
any record size), and the peer's own limit travels in Session.peer_record_size_limit
to the core, which caps the kernel's TX records (TLS_TX_MAX_PAYLOAD_LEN) to it.
"""

from __future__ import annotations

from tlslite.handshakesettings import CURVE_NAMES, TLS13_PERMITTED_GROUPS, HandshakeSettings

from hsd.psk import PskKey

# tlslite name -> IANA name, in order of preference
KTLS_SUITES = {
    "aes256gcm": "TLS_AES_256_GCM_SHA384",
    "chacha20-poly1305": "TLS_CHACHA20_POLY1305_SHA256",
    "aes128gcm": "TLS_AES_128_GCM_SHA256",
    "aes128ccm": "TLS_AES_128_CCM_SHA256",
}
BY_IANA = {iana: name for name, iana in KTLS_SUITES.items()}
KEY_SHARES = ("x25519", "secp256r1")
RECORD_SIZE_LIMIT_TLS13 = 2**14 + 1  # full-size records and their content type byte: we read any size


def tls13_settings(suites: tuple[str, ...] | None = None) -> HandshakeSettings:
    """Settings for one handshake; suites are IANA names (default: all four kTLS suites)."""
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    settings.versions = [(3, 4)]
    settings.cipherNames = [BY_IANA[s] for s in suites] if suites else list(KTLS_SUITES)
    settings.eccCurves = [name for name in CURVE_NAMES if name in TLS13_PERMITTED_GROUPS]
    settings.keyShares = [name for name in KEY_SHARES if name in settings.eccCurves]
    settings.ticketKeys = []
    settings.ticket_count = 0
    settings.certificate_compression_send = []
    settings.certificate_compression_receive = []
    settings.use_heartbeat_extension = False
    settings.record_size_limit = RECORD_SIZE_LIMIT_TLS13  # announced; the peer's: connection.py
    settings.pskConfigs = []
    return settings


def add_psks(settings: HandshakeSettings, keys: list[PskKey], modes: tuple[str, ...]) -> None:
    """External PSKs, in offer order, and the allowed PSK key-exchange modes."""
    settings.pskConfigs = [(bytearray(key.identity), bytearray(key.secret), key.hash) for key in keys]
    settings.psk_modes = list(modes)
