"""Kernel keyrings through the raw syscalls, on the real kernel.

PSKs and keyring-held certificates reach the daemon through these calls, and
the kernel's answers (ENOKEY, EACCES, possession rules) decide what the daemon
can read.  Every test works in a throwaway keyring linked from this process's
keyring, so the keys are "possessed" by the test and nothing outlives it.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator

import pytest

from hsd import keyring as kr
from hsd.keyring import KeyringError

KEY_POS_ALL = 0x3F000000
KEY_USR_VIEW = 0x00010000
POS_VIEW, POS_READ, POS_WRITE, POS_SEARCH, POS_LINK, POS_SETATTR = (x << 24 for x in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20))


def _name(tag: str) -> str:
    return f"hsd-test:{tag}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ring() -> Iterator[int]:
    """A fresh keyring in the process keyring; unlinking it at the end frees it and every key in it."""
    serial = kr.add_key("keyring", _name("ring"), b"", kr.KEY_SPEC_PROCESS_KEYRING)
    yield serial
    kr.unlink(serial, kr.keyring_id(kr.KEY_SPEC_PROCESS_KEYRING))


@pytest.fixture
def other_ring() -> Iterator[int]:
    serial = kr.add_key("keyring", _name("other"), b"", kr.KEY_SPEC_PROCESS_KEYRING)
    yield serial
    kr.unlink(serial, kr.keyring_id(kr.KEY_SPEC_PROCESS_KEYRING))


# ---------------------------------------------------------------- add, read, describe


def test_add_and_read_back_a_user_key(ring: int) -> None:
    payload = bytes(range(48))
    serial = kr.add_key("user", _name("psk"), payload, ring)
    assert serial > 0
    got = kr.read_key(serial)
    assert isinstance(got, bytearray) and got == payload
    got[:] = bytes(len(got))  # the caller can wipe its copy; the key is unaffected
    assert kr.read_key(serial) == payload


def test_read_a_key_larger_than_a_page(ring: int) -> None:
    payload = os.urandom(20000)
    assert kr.read_key(kr.add_key("user", _name("big"), payload, ring)) == payload


def test_adding_the_same_description_updates_in_place(ring: int) -> None:
    name = _name("upd")
    first = kr.add_key("user", name, b"one", ring)
    second = kr.add_key("user", name, b"two!", ring)
    assert first == second
    assert kr.read_key(first) == b"two!"


def test_describe_reports_type_owner_perm_and_description(ring: int) -> None:
    name = _name("desc")
    serial = kr.add_key("user", name, b"x", ring)
    assert kr.describe_key(serial) == ("user", os.getuid(), os.getgid(), KEY_POS_ALL | KEY_USR_VIEW, name)
    assert kr.describe_key(ring)[0] == "keyring"


def test_describe_keeps_semicolons_in_the_description(ring: int) -> None:
    # the kernel's description format is "type;uid;gid;perm;description": only the first four ';' split
    serial = kr.add_key("user", "nvme;host;nqn.2014-08.org.nvmexpress", b"x", ring)
    assert kr.describe_key(serial)[4] == "nvme;host;nqn.2014-08.org.nvmexpress"


def test_keyring_id_of_the_process_keyring() -> None:
    first = kr.keyring_id(kr.KEY_SPEC_PROCESS_KEYRING, create=True)
    assert first > 0 and kr.keyring_id(kr.KEY_SPEC_PROCESS_KEYRING) == first
    assert kr.describe_key(first)[0] == "keyring"


# ---------------------------------------------------------------- search


def test_search_by_type_and_description(ring: int) -> None:
    name = _name("find")
    serial = kr.add_key("user", name, b"x", ring)
    assert kr.search(ring, "user", name) == serial
    assert kr.search(ring, "user", name + "-nope") is None
    assert kr.search(ring, "logon", name) is None  # same description, other type
    assert kr.search(ring, "keyring", name) is None


def test_search_descends_into_linked_keyrings(ring: int) -> None:
    inner = kr.add_key("keyring", _name("inner"), b"", ring)
    name = _name("deep")
    serial = kr.add_key("user", name, b"x", inner)
    assert kr.search(ring, "user", name) == serial
    assert kr.search(ring, "keyring", kr.describe_key(inner)[4]) == inner


# ---------------------------------------------------------------- link / unlink


def test_link_and_unlink(ring: int, other_ring: int) -> None:
    name = _name("link")
    serial = kr.add_key("user", name, b"shared", ring)
    assert kr.search(other_ring, "user", name) is None
    kr.link(serial, other_ring)
    assert kr.search(other_ring, "user", name) == serial
    kr.unlink(serial, other_ring)
    assert kr.search(other_ring, "user", name) is None
    assert kr.read_key(serial) == b"shared"  # still held by the first keyring
    with pytest.raises(KeyringError) as info:
        kr.unlink(serial, other_ring)
    assert info.value.errno == errno.ENOENT and "unlink" in str(info.value)


def test_a_keyring_linked_into_ours_is_searched(ring: int, other_ring: int) -> None:
    # what tlshd does with the ACCEPT keyring attribute: link it, search through it, unlink it
    name = _name("via")
    serial = kr.add_key("user", name, b"psk", other_ring)
    assert kr.search(ring, "user", name) is None
    kr.link(other_ring, ring)
    assert kr.search(ring, "user", name) == serial
    kr.unlink(other_ring, ring)
    assert kr.search(ring, "user", name) is None


def test_a_key_unlinked_from_our_keyrings_is_no_longer_ours(ring: int) -> None:
    serial = kr.add_key("user", _name("gone"), b"x", ring)
    assert kr.read_key(serial) == b"x"
    kr.unlink(serial, ring)
    with pytest.raises(KeyringError) as info:
        kr.read_key(serial)
    # not possessed any more (EACCES: the default perm gives its user only "view"),
    # or already collected by the kernel's key garbage collector (ENOKEY)
    assert info.value.errno in (errno.EACCES, errno.ENOKEY)


# ---------------------------------------------------------------- permissions and possession


def test_set_perm_is_reported_by_describe(ring: int) -> None:
    serial = kr.add_key("user", _name("perm"), b"x", ring)
    kr.set_perm(serial, KEY_POS_ALL)
    assert kr.describe_key(serial)[3] == KEY_POS_ALL


def test_possessor_rights_alone_are_enough_for_our_own_keys(ring: int) -> None:
    # no user/group/other rights at all: readable only because this process possesses it
    serial = kr.add_key("user", _name("pos"), b"possessed", ring)
    kr.set_perm(serial, KEY_POS_ALL)
    assert kr.read_key(serial) == b"possessed"


def test_without_search_the_key_is_not_possessed_and_not_readable(ring: int) -> None:
    name = _name("deny")
    serial = kr.add_key("user", name, b"hidden", ring)
    kr.set_perm(serial, POS_VIEW | POS_WRITE | POS_LINK | POS_SETATTR)
    for call in (lambda: kr.read_key(serial), lambda: kr.describe_key(serial), lambda: kr.search(ring, "user", name)):
        with pytest.raises(KeyringError) as info:
            call()
        assert info.value.errno == errno.EACCES


def test_set_perm_on_a_missing_key(ring: int) -> None:
    with pytest.raises(KeyringError) as info:
        kr.set_perm(0x7FFFFFF0, KEY_POS_ALL)
    assert info.value.errno == errno.ENOKEY and "setperm" in str(info.value)


# ---------------------------------------------------------------- invalidate


def test_invalidate(ring: int) -> None:
    name = _name("inval")
    serial = kr.add_key("user", name, b"x", ring)
    kr.invalidate(serial)
    with pytest.raises(KeyringError) as info:
        kr.read_key(serial)
    # ENOKEY while the invalidated key is still linked; EACCES once the key garbage
    # collector has unlinked it (then it is no longer possessed) - a race with the kernel
    assert info.value.errno in (errno.ENOKEY, errno.EACCES)
    assert kr.search(ring, "user", name) is None


# ---------------------------------------------------------------- errors carry errno


def test_errors_are_oserrors_with_errno_and_a_message() -> None:
    with pytest.raises(KeyringError) as info:
        kr.read_key(0x7FFFFFF0)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOKEY
    assert "read key" in str(err) and os.strerror(errno.ENOKEY) in str(err)


@pytest.mark.parametrize("key_type,payload,code", [
    ("no-such-type", b"x", errno.ENODEV),
    ("user", b"", errno.EINVAL),  # user keys need 1..32767 bytes
    ("user", b"x" * 32768, errno.EINVAL),
    (".dot", b"x", errno.EPERM),  # types starting with '.' are kernel-internal
])
def test_add_key_errors(ring: int, key_type: str, payload: bytes, code: int) -> None:
    with pytest.raises(KeyringError) as info:
        kr.add_key(key_type, _name("err"), payload, ring)
    assert info.value.errno == code and key_type in str(info.value)


def test_add_key_into_a_missing_keyring() -> None:
    with pytest.raises(KeyringError) as info:
        kr.add_key("user", _name("nowhere"), b"x", 0x7FFFFFF0)
    assert info.value.errno == errno.ENOKEY


def test_link_into_a_non_keyring(ring: int) -> None:
    a = kr.add_key("user", _name("a"), b"x", ring)
    b = kr.add_key("user", _name("b"), b"x", ring)
    with pytest.raises(KeyringError) as info:
        kr.link(a, b)
    assert info.value.errno == errno.ENOTDIR


def test_search_of_a_missing_keyring_finds_nothing() -> None:
    # the kernel answers ENOKEY both for "no such keyring" and "no such key": search() cannot tell them apart
    assert kr.search(0x7FFFFFF0, "user", "anything") is None
