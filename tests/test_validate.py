"""hsd.validate: a plugin's Session is checked field by field before the core uses it.

Each malformed field must fail the request with EIO, name the backend and the
field, and never put secret bytes into the message; a well-formed Session (the
shapes the built-in backends return) passes unchanged.
"""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from hsd.errors import HandshakeError
from hsd.session import Session
from hsd.validate import MalformedSession, check_session, scrub

SECRET = b"\xab" * 32


def good(**fields) -> Session:
    base = Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(SECRET), rx_secret=bytearray(SECRET),
                   group="x25519", remote_auth=(7,), peer_certificates=(b"\x30\x03der",),
                   details={"backend": "x"})
    return replace(base, **fields)


def test_well_formed_sessions_pass_unchanged():
    for session in (good(), good(cipher="TLS_AES_256_GCM_SHA384", tx_secret=bytearray(48),
                                 rx_secret=bytearray(48), group=None, remote_auth=(), peer_certificates=())):
        assert check_session(session, "plug") is session


@pytest.mark.parametrize("fields,field", [
    ({"tx_secret": SECRET}, "tx_secret is bytes, not bytearray"),
    ({"rx_secret": memoryview(bytearray(SECRET))}, "rx_secret is memoryview"),
    ({"tx_secret": bytearray(SECRET[:16])}, "tx_secret is 16 bytes, the suite's traffic secrets are 32"),
    ({"cipher": "TLS_AES_256_GCM_SHA384"}, "tx_secret is 32 bytes, the suite's traffic secrets are 48"),
    ({"cipher": "TLS_FUTURE_SUITE", "tx_secret": bytearray(65)}, "tx_secret is 65 bytes, not 1..64"),
    ({"cipher": b"TLS_AES_128_GCM_SHA256"}, "cipher is bytes, not str"),
    ({"tx_seq": -1}, "tx_seq is not a record count"),
    ({"rx_seq": 1 << 64}, "rx_seq is not a record count"),
    ({"rx_seq": True}, "rx_seq is not a record count"),
    ({"version": "1.3"}, "version is str, not int"),
    ({"group": 29}, "group is int, not str or None"),
    ({"remote_auth": ("7",)}, "remote_auth is not a tuple of key serials"),
    ({"remote_auth": [7]}, "remote_auth is not a tuple of key serials"),
    ({"remote_auth": (1 << 32,)}, "remote_auth is not a tuple of key serials"),
    ({"peer_certificates": [b"der"]}, "peer_certificates is not a tuple"),
    ({"peer_certificates": ("MIIB...",)}, "peer_certificates is not a tuple"),
    ({"peer_certificates": (b"",)}, "peer_certificates is not a tuple"),
    ({"psk_identity": "NVMe0R01 host subsys"}, "psk_identity is str, not bytes or None"),
    ({"details": {"k": 1}}, "details is not a dict of str to str"),
])
def test_each_malformed_field_is_eio_naming_backend_and_field(fields, field):
    with pytest.raises(MalformedSession) as raised:
        check_session(good(**fields), "third-party")
    assert isinstance(raised.value, HandshakeError) and raised.value.status == errno.EIO
    assert raised.value.reason.startswith("backend 'third-party' returned a malformed session: ")
    assert field in raised.value.reason
    assert "abab" not in raised.value.reason and "\\xab" not in raised.value.reason  # no secret bytes


@pytest.mark.parametrize("result", [{"cipher": "TLS_AES_128_GCM_SHA256"}, ("a", "b"), "session", 0])
def test_anything_but_a_session_is_refused(result):
    with pytest.raises(MalformedSession, match=f"a {type(result).__name__}, not a Session"):
        check_session(result, "third-party")


def test_every_problem_is_reported_in_one_line(caplog):
    with pytest.raises(MalformedSession) as raised:
        check_session(good(tx_secret=SECRET, remote_auth=["x"]), "third-party")
    assert "tx_secret" in raised.value.reason and "remote_auth" in raised.value.reason
    assert [r.getMessage() for r in caplog.records] == [raised.value.reason]  # logged once, naming the plugin


def test_scrub_zeroes_what_can_be_zeroed_and_never_raises():
    bad = good(rx_secret=SECRET)  # bytes: cannot be wiped; the bytearray beside it still is
    scrub(bad)
    assert bad.tx_secret == bytearray(32)
    scrub(object())
    scrub(None)
