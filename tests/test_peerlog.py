"""Peer data in logs is bounded in length and, per peer, in rate (hsd.peerlog and its PSK users).

The unit tests drive the helpers with a hand-wound clock.  The flood test
sends a thousand ClientHellos full of unknown PSK identities (one of them
15 KiB long) from one address at hsd as the daemon runs it, on both backends,
and counts what reached the log: every line short, the identities in a handful
of lines, a summary of the rest, and a second peer still heard.
"""

from __future__ import annotations

import errno
import logging
import socket

import pytest
from hypothesis import given, strategies as st

import hsd.psk
from hsd.peerlog import ELLIPSIS, PeerRateLimiter, peer_of, truncate, truncate_list
from hsd_kit.harness import DaemonHarness
from hsd_kit.keyrings import ThrowawayKeyring

LIMIT = 64
SUFFIX_MAX = len(f"{ELLIPSIS} (18446744073709551616 characters in all)")
FLOOD = 1000
BURST = 5
MAX_LINE = 1024  # no log line of the flood may be longer than this


class Clock:
    """A clock that moves only when the test says so (no sleeping, no timing in the assertions)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- truncate ------------------------------------------------------------------------------------

def test_short_values_are_shown_whole() -> None:
    assert truncate(b"NVMe0R01 host subsys") == "NVMe0R01 host subsys"
    assert truncate("plain") == "plain"
    assert truncate(b"") == ""


def test_a_64k_identity_becomes_one_bounded_line() -> None:
    shown = truncate(b"A" * 65535)
    assert shown == "A" * LIMIT + f"{ELLIPSIS} (65535 bytes in all)"


def test_control_characters_cannot_forge_lines_or_colours() -> None:
    shown = truncate(b"ok\nhsd[1]: handshake status=0 (ok)\x1b[2J\r\xff\xfe")
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert shown.isprintable()
    assert shown.startswith("ok\\nhsd[1]")
    assert truncate("a\u202eb") == "a\\u202eb"  # right-to-left override shown, not applied


@given(st.one_of(st.binary(max_size=3000), st.text(max_size=3000)), st.integers(1, 200))
def test_any_value_is_printable_and_bounded(value: bytes | str, limit: int) -> None:
    shown = truncate(value, limit)
    assert shown.isprintable()
    assert len(shown) <= limit + SUFFIX_MAX
    if ELLIPSIS in shown and not (isinstance(value, str) and ELLIPSIS in value):
        assert shown.endswith(f" ({len(value)} {'characters' if isinstance(value, str) else 'bytes'} in all)")


def test_lists_show_a_few_values_and_count_the_rest() -> None:
    shown = truncate_list([b"one", b"x" * 500, "three", b"four", b"five", b"six"])
    assert shown.startswith("'one', 'xxxx")
    assert shown.endswith(f"'four', {ELLIPSIS} (+2 more)")
    assert len(truncate_list([b"y" * 60000] * 5000)) < 6 * (LIMIT + SUFFIX_MAX)
    assert truncate_list([]) == "none"


# --- the rate limiter ----------------------------------------------------------------------------

def test_a_peer_gets_its_burst_then_a_summary_when_it_may_speak_again() -> None:
    clock = Clock()
    limiter = PeerRateLimiter(burst=3, interval=60, clock=clock)
    assert [limiter.admit("192.0.2.1") for _ in range(3)] == [0, 0, 0]
    assert [limiter.admit("192.0.2.1") for _ in range(500)] == [None] * 500
    clock.now += 59
    assert limiter.admit("192.0.2.1") is None
    clock.now += 1
    assert limiter.admit("192.0.2.1") == 501  # the next line carries the count of the dropped ones
    assert limiter.admit("192.0.2.1") is None


def test_one_flooding_peer_does_not_silence_another() -> None:
    limiter = PeerRateLimiter(burst=2, interval=60, clock=Clock())
    for _ in range(100):
        limiter.admit("192.0.2.1")
    assert limiter.admit("192.0.2.2") == 0
    assert limiter.admit("2001:db8::2") == 0


def test_many_addresses_cannot_grow_the_limiter_without_bound() -> None:
    limiter = PeerRateLimiter(burst=1, interval=60, max_peers=100, clock=Clock())
    for index in range(10_000):
        limiter.admit(f"10.{index >> 16}.{(index >> 8) & 255}.{index & 255}")
    assert len(limiter) == 100


def test_warning_appends_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = PeerRateLimiter(burst=1, interval=10, clock=clock)
    logger = logging.getLogger("hsd.test.peerlog")
    with caplog.at_level(logging.WARNING, logger="hsd.test.peerlog"):
        results = [limiter.warning(logger, "192.0.2.9", "bad hello from %s", "192.0.2.9") for _ in range(50)]
        clock.now += 10
        limiter.warning(logger, "192.0.2.9", "bad hello from %s", "192.0.2.9")
    assert results.count(True) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "bad hello from 192.0.2.9", "bad hello from 192.0.2.9 (49 similar messages from this peer suppressed)"]


def test_peer_of_is_the_address_without_the_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            server, _ = listener.accept()
            with server:
                assert peer_of(server) == "127.0.0.1"
    with socket.socket() as unconnected:
        assert peer_of(unconnected) == "unknown"


# --- a flood of bad connections through hsd --------------------------------------------------------

def _ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def hello_record(identities: list[bytes]) -> bytes:
    """One plaintext record holding a TLS 1.3 ClientHello whose PSK extension offers these identities."""
    listed = b"".join(len(i).to_bytes(2, "big") + i + bytes(4) for i in identities)
    binders = b"".join(b"\x20" + bytes(32) for _ in identities)
    extensions = (_ext(43, b"\x02\x03\x04") + _ext(45, b"\x01\x01")
                  + _ext(41, len(listed).to_bytes(2, "big") + listed + len(binders).to_bytes(2, "big") + binders))
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(extensions).to_bytes(2, "big") + extensions)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    assert len(message) <= 16384
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


FLOOD_HELLO = hello_record([b"flood-identity-" + b"Z" * 15000, b"flood-identity-2\n\x1b[31m", b"flood-3"])


def bad_connection(daemon: DaemonHarness, ring: ThrowawayKeyring, source: str = "127.0.0.1") -> int:
    """One connection from `source` that offers only unknown identities; returns DONE's status."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.socket()
        theirs.bind((source, 0))
        theirs.connect(listener.getsockname())
        mine, _ = listener.accept()
    with mine, theirs:
        request = daemon.server_hello_psk(mine, keyring=ring.serial, timeout_ms=5000)
        theirs.sendall(FLOOD_HELLO)
        done = daemon.finish(request)
        assert done.request.done_calls == 1 and done.remote_auth == ()
        return done.status


@pytest.mark.parametrize("backend", ["openssl", "tlslite"])
def test_a_flood_of_bad_connections_yields_a_bounded_log(backend: str, hsd_keyring: ThrowawayKeyring,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hsd_keyring.add("the-only-known-identity", bytes(32))
    clock = Clock()
    monkeypatch.setattr(hsd.psk, "UNKNOWN_IDENTITY_WARNINGS",
                        PeerRateLimiter(burst=BURST, interval=60, clock=clock), raising=False)
    with caplog.at_level(logging.DEBUG), DaemonHarness(backend=backend) as daemon:
        statuses = {bad_connection(daemon, hsd_keyring) for _ in range(FLOOD)}
        other_peer = bad_connection(daemon, hsd_keyring, source="127.0.0.2")
        clock.now += 60  # one token back for the flooding peer
        after_pause = bad_connection(daemon, hsd_keyring)
    assert statuses == {other_peer, after_pause} == {errno.EKEYREJECTED}
    lines = [record.getMessage() for record in caplog.records]
    longest = max(lines, key=len)
    assert len(longest) <= MAX_LINE, f"a {len(longest)}-character log line: {longest[:200]}..."
    with_identities = [line for line in lines if "flood-identity" in line]
    assert len(with_identities) == BURST + 2, with_identities  # the burst, the other peer, the summary
    assert "client 127.0.0.2 offered 3 PSK identities" in with_identities[BURST]
    assert with_identities[-1].endswith(f"({FLOOD - BURST} similar messages from this peer suppressed)")
    assert all("\x1b" not in line and "\n" not in line for line in with_identities)
    print(f"{backend}: {FLOOD + 2} bad connections, {len(lines)} log lines, {len(with_identities)} with the "
          f"peer's identities, longest line {len(longest)} characters")
