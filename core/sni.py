"""Which server certificate a client gets: the [hsd.server.sni] pair its ClientHello's server_name selects.

Why in the core: the rule must be the same whichever backend runs, so the
dispatcher reads the ClientHello ahead (hsd.tls13.peek_client_hello, given
back to the socket for the library), chooses here, and hands the backend
credentials that already hold the chosen pair - a backend never sees, nor
decides on, a server name.

The rule: names are compared after hsd's one DNS-name normalisation
(x509verify.normalize_dns_name: lower case, A-labels, one trailing dot
dropped), on both the configured and the received side.  An exact name wins;
else "*.example.org" matches a name with exactly one more label
("a.example.org", never "a.b.example.org" nor "example.org").  A name that is
no valid DNS name (an address, garbage, overlong), no server_name at all, or
no match: None, and the caller uses tlshd's [authenticate.server] pair.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cryptography import x509

from .config import SniPair
from .x509verify import certificate_san_values, normalize_dns_name

MAX_SNI = 255  # bytes of host_name considered at all (a DNS name has at most 253)


def normalize_sni_name(text: str) -> str:
    """A configured [hsd.server.sni] name: a DNS name, or "*." and a DNS name of two labels or more;
    ValueError says why not."""
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError("an IP address is never a server_name (RFC 6066 sends DNS names only)")
    name = normalize_dns_name(text, wildcard=True)
    if "*" in name and (not name.startswith("*.") or "*" in name[2:] or name.count(".") < 2):
        raise ValueError('a wildcard is one leftmost "*" label before at least two others ("*.example.org")')
    return name


def received_name(host_name: bytes | None) -> str | None:
    """The ClientHello's host_name in comparison form; None when absent or no valid DNS name."""
    if not host_name or len(host_name) > MAX_SNI:
        return None
    try:
        return normalize_dns_name(host_name.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def choose(pairs: Sequence[SniPair], host_name: bytes | None) -> SniPair | None:
    """The pair for this server_name (exact name first, then a one-label wildcard), or None for the default."""
    name = received_name(host_name)
    if name is None or not pairs:
        return None
    for pair in pairs:
        if pair.name == name:
            return pair
    parent = name.partition(".")[2]
    if not parent:
        return None
    wildcard = f"*.{parent}"
    for pair in pairs:
        if pair.name == wildcard:
            return pair
    return None


def certificate_names(cert: x509.Certificate, name: str) -> bool:
    """Whether cert's DNS SANs name this configured name (itself, or one wildcard SAN covering it), as a
    client verifying the name will require; hsd check warns of a pair whose certificate does not."""
    sans = {san.value for san in certificate_san_values(cert) if san.kind == "dns"}
    return name in sans or (not name.startswith("*.") and f"*.{name.partition('.')[2]}" in sans)
