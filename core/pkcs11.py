"""Private keys (and certificates) held in a PKCS#11 token: RFC 7512 `pkcs11:` URIs through pkcs11-provider.

Why here, with ctypes: pyOpenSSL and cryptography's bindings have no OSSL_STORE
or OSSL_PROVIDER API, yet the OpenSSL they link can load pkcs11-provider and
open a token key as an EVP_PKEY whose operations run inside the token.  So the
key is opened with OSSL_STORE through ctypes against the very libcrypto that
cryptography uses, and handed to pyOpenSSL's SSL_CTX with SSL_CTX_use_PrivateKey
through cryptography's own bindings: OpenSSL then signs the handshake through
the provider, and the private key never leaves the token (only a handle and the
public half are in this process).

That works only where cryptography links a shared system libcrypto (Debian's
python3-cryptography).  A PyPI wheel carries its own, static OpenSSL, into
which no provider can be loaded: unavailable() detects that by comparing the
address of OpenSSL's version string as cryptography's bindings see it with
that of every libcrypto mapped into the process, and says so in one line.
The PIN (`pin-value=` in the URI) is never logged: messages show redact(uri).
"""

from __future__ import annotations

import ctypes
import re
import threading

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .errors import CredentialError

SCHEME = "pkcs11:"
_STORE_INFO_PKEY, _STORE_INFO_CERT = 4, 5  # OSSL_STORE_INFO_PKEY, OSSL_STORE_INFO_CERT (openssl/store.h)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "libcrypto": the ctypes CDLL, "why": the reason it cannot be used ("" = can)
_keys: dict[str, "TokenKey"] = {}  # URI -> opened key (a handle, no key material): one login per URI


def is_uri(value: str | None) -> bool:
    """Whether a configured x509.certificate / x509.private_key names a token object rather than a file."""
    return bool(value) and value.startswith(SCHEME)


def redact(uri: str) -> str:
    """The URI as it may appear in logs and messages: a pin-value's PIN replaced by ***."""
    return re.sub(r"(pin-value=)[^&;]*", r"\1***", uri)


def _bindings():
    from OpenSSL._util import ffi, lib  # cryptography's cffi bindings of the OpenSSL pyOpenSSL uses

    return ffi, lib


def _mapped_libcryptos() -> list[str]:
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ", 5)[-1].strip()
                if "/libcrypto.so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _find_libcrypto() -> tuple[ctypes.CDLL | None, str]:
    """The shared libcrypto cryptography's bindings run on, or None and why there is none."""
    ffi, lib = _bindings()
    theirs = int(ffi.cast("uintptr_t", lib.OpenSSL_version(0)))  # OPENSSL_VERSION: a static string in libcrypto
    version = ffi.string(lib.OpenSSL_version(0)).decode(errors="replace")
    for path in _mapped_libcryptos():
        try:
            candidate = ctypes.CDLL(path)
        except OSError:
            continue
        candidate.OpenSSL_version.restype = ctypes.c_void_p
        candidate.OpenSSL_version.argtypes = [ctypes.c_int]
        if candidate.OpenSSL_version(0) == theirs:
            return candidate, ""
    import cryptography

    return None, (f"cryptography {cryptography.__version__} carries its own {version} (a PyPI wheel), into which "
                  "no provider can be loaded: pkcs11: keys need hsd on the system OpenSSL "
                  "(Debian's hsd package, python3-cryptography) with pkcs11-provider")


def _declare(c: ctypes.CDLL) -> None:
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, restype, argtypes in (
            ("OSSL_PROVIDER_load", vp, [vp, cp]),
            ("OSSL_STORE_open", vp, [cp, vp, vp, vp, vp]),
            ("OSSL_STORE_expect", ctypes.c_int, [vp, ctypes.c_int]),
            ("OSSL_STORE_load", vp, [vp]),
            ("OSSL_STORE_eof", ctypes.c_int, [vp]),
            ("OSSL_STORE_close", ctypes.c_int, [vp]),
            ("OSSL_STORE_INFO_get_type", ctypes.c_int, [vp]),
            ("OSSL_STORE_INFO_get1_PKEY", vp, [vp]),
            ("OSSL_STORE_INFO_get1_CERT", vp, [vp]),
            ("OSSL_STORE_INFO_free", None, [vp]),
            ("i2d_PUBKEY", ctypes.c_int, [vp, ctypes.POINTER(vp)]),
            ("i2d_X509", ctypes.c_int, [vp, ctypes.POINTER(vp)]),
            ("X509_free", None, [vp]),
            ("EVP_PKEY_free", None, [vp]),
            ("ERR_get_error", ctypes.c_ulong, []),
            ("ERR_error_string_n", None, [ctypes.c_ulong, cp, ctypes.c_size_t])):
        function = getattr(c, name)
        function.restype, function.argtypes = restype, argtypes


def _errors(c: ctypes.CDLL) -> str:
    """OpenSSL's error queue as one line (emptied), without the URI's PIN."""
    texts = []
    while code := c.ERR_get_error():
        buf = ctypes.create_string_buffer(256)
        c.ERR_error_string_n(code, buf, len(buf))
        texts.append(buf.value.decode(errors="replace").split(":", 4)[-1])
    return "; ".join(dict.fromkeys(texts))


def unavailable() -> str | None:
    """Why this hsd cannot open pkcs11: URIs (one line), or None when it can; decided once per process."""
    with _lock:
        if "why" not in _state:
            c, why = _find_libcrypto()
            if c is not None:
                _declare(c)
                # loading any provider explicitly ends OpenSSL's implicit fallback to "default": load it too
                if not c.OSSL_PROVIDER_load(None, b"default") or not c.OSSL_PROVIDER_load(None, b"pkcs11"):
                    detail = _errors(c)
                    why = (f"the system OpenSSL cannot load pkcs11-provider (install the pkcs11-provider package)"
                           f"{': ' + detail if detail else ''}")
                else:
                    _state["libcrypto"] = c
            _state["why"] = why
        return _state["why"] or None


def _libcrypto() -> ctypes.CDLL:
    why = unavailable()
    if why:
        raise CredentialError(why)
    return _state["libcrypto"]  # type: ignore[return-value]


def _der(c: ctypes.CDLL, encode, obj: int) -> bytes:
    size = encode(obj, None)
    if size <= 0:
        raise CredentialError(f"OpenSSL cannot encode a token object: {_errors(c) or 'no reason given'}")
    buf = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buf))
    encode(obj, ctypes.byref(cursor))
    return buf.raw


def _open(uri: str, expect: int) -> list[int]:
    """The objects of that type the token gives for uri (EVP_PKEY* or X509*, owned by the caller)."""
    c = _libcrypto()
    store = c.OSSL_STORE_open(uri.encode(), None, None, None, None)
    if not store:
        raise CredentialError(f"{redact(uri)}: OpenSSL cannot open it ({_errors(c) or 'no token matches'})")
    found: list[int] = []
    try:
        c.OSSL_STORE_expect(store, expect)
        while not c.OSSL_STORE_eof(store):
            info = c.OSSL_STORE_load(store)
            if not info:
                break
            try:
                if c.OSSL_STORE_INFO_get_type(info) == expect:
                    get = c.OSSL_STORE_INFO_get1_PKEY if expect == _STORE_INFO_PKEY else c.OSSL_STORE_INFO_get1_CERT
                    found.append(get(info))
            finally:
                c.OSSL_STORE_INFO_free(info)
    finally:
        c.OSSL_STORE_close(store)
    _errors(c)  # a search leaves notes in the queue: none may reach a later, unrelated OpenSSL call
    return [obj for obj in found if obj]


class TokenKey:
    """A private key that stays in its token: an EVP_PKEY handle for OpenSSL, the public half for the checks."""

    def __init__(self, uri: str, address: int, public: PublicKeyTypes) -> None:
        self.uri = uri
        self.address = address  # EVP_PKEY* in the shared libcrypto
        self._public = public

    def public_key(self) -> PublicKeyTypes:
        """As cryptography's private keys answer: hsd matches it to the certificate and keys contexts by it."""
        return self._public

    def __repr__(self) -> str:
        return f"TokenKey({redact(self.uri)})"

    def __del__(self) -> None:
        c = _state.get("libcrypto") if _state is not None else None  # None: at interpreter exit, leave it
        if c is not None and self.address:
            c.EVP_PKEY_free(self.address)  # type: ignore[attr-defined]
            self.address = 0


def forget() -> None:
    """Drop the opened keys (start and reload): the next request opens each URI afresh."""
    with _lock:
        _keys.clear()


def load_key(uri: str) -> TokenKey:
    """The token's private key at uri, opened once per process (a handle: the key stays in the token)."""
    with _lock:
        if uri in _keys:
            return _keys[uri]
    c = _libcrypto()
    keys = _open(uri, _STORE_INFO_PKEY)
    if not keys:
        raise CredentialError(f"{redact(uri)}: no private key in a token matches it (token present? object name "
                              "and type=private right? PIN right?)")
    for extra in keys[1:]:
        c.EVP_PKEY_free(extra)
    public = serialization.load_der_public_key(_der(c, c.i2d_PUBKEY, keys[0]))
    key = TokenKey(uri, keys[0], public)
    with _lock:
        return _keys.setdefault(uri, key)


def load_certificates(uri: str) -> list[x509.Certificate]:
    """The certificate(s) stored in the token at uri (public data: read out, then used as from a file)."""
    c = _libcrypto()
    certs = _open(uri, _STORE_INFO_CERT)
    if not certs:
        raise CredentialError(f"{redact(uri)}: no certificate in a token matches it")
    try:
        return [x509.load_der_x509_certificate(_der(c, c.i2d_X509, cert)) for cert in certs]
    finally:
        for cert in certs:
            c.X509_free(cert)


def install(context, key: TokenKey) -> None:
    """Put the token key on a pyOpenSSL Context (SSL_CTX_use_PrivateKey, which takes its own reference)."""
    ffi, lib = _bindings()
    if lib.SSL_CTX_use_PrivateKey(context._context, ffi.cast("EVP_PKEY *", key.address)) != 1:
        raise CredentialError(f"{redact(key.uri)}: OpenSSL refuses the token key: "
                              f"{_errors(_libcrypto()) or 'no reason given'}")
