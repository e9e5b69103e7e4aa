"""PSK hash choice from identities and key lengths, and the ClientHello identity reader."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from hsd.errors import CredentialError
from hsd.tls13 import MalformedClientHello, client_hello_length, offered_psks
from hsd_psk.identity import nvme_hash, psk_hash

HOST = "nqn.2014-08.org.nvmexpress:uuid:0f3a"
SUBSYS = "nqn.2024-01.org.example:subsys"


@pytest.mark.parametrize(("identity", "length", "expected"), [
    (f"NVMe0R01 {HOST} {SUBSYS}", 32, "sha256"),
    (f"NVMe0R02 {HOST} {SUBSYS}", 48, "sha384"),
    (f"NVMe1R01 {HOST} {SUBSYS} ZGlnZXN0", 32, "sha256"),
    (f"NVMe1G02 {HOST} {SUBSYS} ZGlnZXN0", 48, "sha384"),
    (f"NVMe0R02 {HOST} {SUBSYS}", 32, "sha384"),  # the identity names the hash, not the length
    (f"NVMe0R01 {HOST} {SUBSYS}", 48, "sha256"),
    ("plain-identity", 32, "sha256"),
    ("plain-identity", 48, "sha384"),
    (f"NVMe0R00 {HOST} {SUBSYS}", 48, "sha384"),  # hh names no hash: the length decides
    ("NVMe0R01", 48, "sha384"),  # no space after hh: not an NVMe identity
])
def test_hash_choice(identity: str, length: int, expected: str) -> None:
    assert psk_hash(identity, length) == expected


@pytest.mark.parametrize(("identity", "length"), [
    ("plain-identity", 16), ("plain-identity", 64), ("plain-identity", 0),
    (f"NVMe0R01 {HOST} {SUBSYS}", 0), (f"NVMe0R01 {HOST} {SUBSYS}", 49),
    (f"NVMe0R03 {HOST} {SUBSYS}", 24),
])
def test_unusable_lengths_are_credential_errors(identity: str, length: int) -> None:
    with pytest.raises(CredentialError) as info:
        psk_hash(identity, length)
    assert info.value.status == 5  # EIO, like tlshd for an unloadable key


def test_nvme_hash_needs_the_exact_prefix() -> None:
    assert nvme_hash("NVMe0R01 h s") == "sha256"
    assert nvme_hash("nvme0R01 h s") is None
    assert nvme_hash("NVMe0X01 h s") is None
    assert nvme_hash(" NVMe0R01 h s") is None


@given(st.text(max_size=300), st.integers(min_value=-1, max_value=200))
def test_any_description_gives_a_hash_or_a_credential_error(identity: str, length: int) -> None:
    try:
        result = psk_hash(identity, length)
    except CredentialError as exc:
        assert exc.status == 5
        return
    assert result in ("sha256", "sha384")
    assert 0 < length <= 48


def _client_hello(extensions: bytes) -> bytes:
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(extensions).to_bytes(2, "big") + extensions)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def _psk_ext(identities: list[bytes]) -> bytes:
    listed = b"".join(len(i).to_bytes(2, "big") + i + bytes(4) for i in identities)
    binders = b"".join(b"\x20" + bytes(32) for _ in identities)
    return _ext(41, len(listed).to_bytes(2, "big") + listed + len(binders).to_bytes(2, "big") + binders)


def test_client_hello_identities_in_order() -> None:
    hello = _client_hello(_ext(45, b"\x02\x01\x00") + _psk_ext([b"first", b"NVMe0R01 h s", b"last"]))
    offered = offered_psks(hello)
    assert offered.identities == (b"first", b"NVMe0R01 h s", b"last")
    assert offered.modes == (1, 0)
    assert client_hello_length(hello + b"trailing") == len(hello)


def test_client_hello_without_psk() -> None:
    assert offered_psks(_client_hello(_ext(0, b""))).identities == ()


@given(st.binary(max_size=400))
def test_garbage_is_rejected_cleanly(data: bytes) -> None:
    try:
        offered = offered_psks(b"\x01" + len(data).to_bytes(3, "big") + data)
    except MalformedClientHello:
        return
    assert all(isinstance(i, bytes) for i in offered.identities)


@given(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=5), st.integers(0, 40))
def test_truncated_hellos_never_pass_as_complete(identities: list[bytes], cut: int) -> None:
    hello = _client_hello(_psk_ext(identities))
    assert offered_psks(hello).identities == tuple(identities)
    if cut:
        truncated = hello[: len(hello) - cut]
        with pytest.raises(MalformedClientHello):
            offered_psks(truncated[:4] + truncated[4:])  # length field still claims the full body
