"""Our own certificate chain and private key, put on an OpenSSL context."""

from __future__ import annotations

from OpenSSL import SSL, crypto

from hsd import pkcs11
from hsd.credentials import X509Credentials
from hsd.errors import CredentialError

from .driver import ssl_error_text
from .pq import install_both_identities


def install_identity(context: SSL.Context, creds: X509Credentials, role: str) -> None:
    """Leaf, intermediates and key (the core checked both are there); CredentialError if OpenSSL cannot use them.

    With an x509.pq.* pair configured, both identities go on the context and
    OpenSSL picks per handshake by the peer's signature algorithms (see pq.py).
    """
    if creds.pq_chain:
        install_both_identities(context, creds, role)
        return
    try:
        context.use_certificate(creds.chain[0])
        for extra in creds.chain[1:]:
            context.add_extra_chain_cert(extra)
        if isinstance(creds.key, pkcs11.TokenKey):
            pkcs11.install(context, creds.key)  # OpenSSL signs through pkcs11-provider, inside the token
        else:
            context.use_privatekey(creds.key)
        context.check_privatekey()
    except (SSL.Error, crypto.Error, TypeError, ValueError) as exc:
        raise CredentialError(f"{role} certificate/private key unusable: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """OpenSSL's error queue as words (not a list of tuples); a key that is not the certificate's, said so."""
    text = ssl_error_text(exc) if isinstance(exc, (SSL.Error, crypto.Error)) else str(exc)
    if "key values mismatch" in text:
        return f"the private key does not match the certificate ({text})"
    return text
