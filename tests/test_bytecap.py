"""A peer that sends a huge handshake message cannot make hsd buffer it (security issue 16, point 7).

tlslite's defragmenter keeps whatever a peer declares: a 12 MiB ClientHello
grew the daemon by 12.5 MiB.  hsd.wire now charges every byte read from a
handshake's socket to a limit (256 KiB) and ends the request with EMSGSIZE.
Each test is a raw-socket peer streaming a 12 MiB handshake message in 16 KiB
records at the in-process daemon, and measures from the outside:
- what the daemon took off its socket: bytes the peer's kernel accepted minus
  what still sits in the two socket queues (SIOCOUTQNSD on the peer, SIOCINQ on
  the daemon's end) once the request is DONE;
- the process's peak RSS growth (VmHWM reset through /proc/self/clear_refs).
OpenSSL refuses these particular messages by its own size rules before the
limit (with its own alert, EACCES); a lowered limit shows the cap under
OpenSSL too, and under the PSK servers' ClientHello pre-readers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest

import hsd.wire
from hsd.errors import HandshakeTooLarge, PeerRejected
from hsd_kit.soak import tcp_pair

from test_hostile_peers import BACKENDS, WAIT, daemon, pki, still_serves  # noqa: F401 (pki is a fixture)

SIOCINQ = 0x541B  # FIONREAD: bytes in a socket's receive queue
SIOCOUTQNSD = 0x894B  # bytes in a socket's send queue not yet sent (sent, unacked ones are the peer's)
HUGE = 12 << 20
FRAGMENT = 16384
RSS_BOUND = 4 << 20
CLIENT_HELLO, SERVER_HELLO, CERTIFICATE = 1, 2, 11


def queued(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> None:
    """VmHWM := VmRSS now (Documentation/filesystems/proc.rst, clear_refs value 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def huge_message_records(msg_type: int, size: int) -> Iterator[bytes]:
    """A handshake message of `size` body bytes, as plaintext handshake records of FRAGMENT bytes."""
    start = bytes([msg_type]) + size.to_bytes(3, "big") + b"\x03\x03" + os.urandom(32)
    yield b"\x16\x03\x03" + len(start).to_bytes(2, "big") + start
    fill = b"\x16\x03\x03" + FRAGMENT.to_bytes(2, "big") + bytes(FRAGMENT)  # one buffer, sent again and again
    whole, rest = divmod(size + 4 - len(start), FRAGMENT)
    for _ in range(whole):
        yield fill
    yield b"\x16\x03\x03" + rest.to_bytes(2, "big") + bytes(rest)


class Flood:
    """Streams records into `sock` (non-blocking) until they run out, the daemon hangs up, or stop()."""

    def __init__(self, sock: socket.socket, records: Iterator[bytes], *, read_hello_first: bool) -> None:
        self.sock, self.records, self.read_hello_first = sock, records, read_hello_first
        self.sent = 0  # bytes the peer's kernel accepted
        self.hello = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.read_hello_first:  # a fake server: read hsd's ClientHello record, then answer
            self.sock.settimeout(WAIT)
            header = self.sock.recv(5, socket.MSG_WAITALL)
            self.hello = header + self.sock.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL)
        self.sock.setblocking(False)
        for rec in self.records:
            view = memoryview(rec)
            while view:
                if self._stop.is_set():
                    return
                try:
                    sent = self.sock.send(view)
                except BlockingIOError:
                    select.select([], [self.sock], [], 0.05)
                    continue
                except OSError:
                    return  # the daemon's end is gone
                self.sent += sent
                view = view[sent:]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


@contextmanager
def flooded_request(sim, role: str, msg_type: int, size: int = HUGE, psk: bool = False):
    """A request on a TCP pair whose peer streams a `size`-byte handshake message of msg_type.

    Yields a dict that, after the block, holds status, consumed bytes and peak RSS growth."""
    mine, theirs = tcp_pair()
    result: dict = {}
    try:
        reset_peak_rss()
        rss_before = memory_kib("VmRSS")
        flood = Flood(theirs, huge_message_records(msg_type, size), read_hello_first=role == "client")
        if role == "server":
            req = sim.server_hello_psk(mine, timeout_ms=10000) if psk else sim.server_hello_x509(mine, timeout_ms=10000)
        else:
            req = sim.client_hello_anon(mine, peername="localhost", timeout_ms=10000)
        result["status"] = req.wait(WAIT)[0]
        flood.stop()
        result["done_calls"] = req.done_calls
        result["ktls_tx"] = req.ktls_tx
        result["consumed"] = flood.sent - queued(theirs, SIOCOUTQNSD) - queued(mine, SIOCINQ)
        result["sent"] = flood.sent
        result["rss_growth"] = (memory_kib("VmHWM") - rss_before) * 1024
        yield result
    finally:
        mine.close()
        theirs.close()


def limit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "handshake read limit" in r.getMessage()]


CASES = [("server", CLIENT_HELLO), ("client", SERVER_HELLO), ("client", CERTIFICATE)]
CASE_IDS = ["server-clienthello", "client-serverhello", "client-certificate"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("role,msg_type", CASES, ids=CASE_IDS)
def test_a_12_mib_handshake_message_is_not_buffered(pki, caplog, backend: str, role: str, msg_type: int) -> None:
    caplog.set_level(logging.INFO)
    with daemon(pki, backend) as (sim, running):
        # one real handshake per role first: the backend's library is imported at its first request
        # (tlslite-ng lazily, several MiB) - a one-time cost, not what the peer made the daemon buffer
        still_serves(sim, pki)
        warm = len(running.outcomes)
        with flooded_request(sim, role, msg_type) as got:
            pass
    assert got["done_calls"] == 1 and got["ktls_tx"] is None
    assert got["consumed"] <= hsd.wire.HANDSHAKE_READ_LIMIT, got
    assert got["rss_growth"] < RSS_BOUND, got
    line = running.outcomes[warm].line()
    if backend == "tlslite":  # tlslite has no size rule of its own: the limit stops it
        assert got["status"] == HandshakeTooLarge.status == errno.EMSGSIZE, line
        assert got["consumed"] > hsd.wire.HANDSHAKE_READ_LIMIT - 2 * (FRAGMENT + 5), got  # it read up to the limit
        assert len(limit_lines(caplog)) == 1, caplog.text
    else:  # OpenSSL refuses a hello over its size limit (or a Certificate before ServerHello) at once
        assert got["status"] == PeerRejected.status, line
        assert got["consumed"] < 2 * (FRAGMENT + 5), got
        assert limit_lines(caplog) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("psk", [False, True], ids=["x509", "psk"])
def test_the_limit_holds_under_both_libraries_and_the_psk_pre_readers(pki, caplog, monkeypatch, backend: str,
                                                                       psk: bool) -> None:
    """A 100 KiB ClientHello is within OpenSSL's own limit (128 KiB) and the PSK readers' (128 KiB);
    with the limit lowered to 64 KiB it is hsd.wire that ends the request, whoever reads."""
    caplog.set_level(logging.INFO)
    limit = 64 * 1024
    monkeypatch.setattr(hsd.wire, "HANDSHAKE_READ_LIMIT", limit)
    with daemon(pki, backend, psk=psk) as (sim, running):
        with flooded_request(sim, "server", CLIENT_HELLO, size=100 * 1024, psk=psk) as got:
            pass
    assert got["done_calls"] == 1 and got["ktls_tx"] is None
    assert got["status"] == errno.EMSGSIZE, running.outcomes[0].line()
    assert limit - 2 * (FRAGMENT + 5) < got["consumed"] <= limit, got
    assert len(limit_lines(caplog)) == 1, caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_limit_holds_in_the_client_role_under_both_libraries(pki, caplog, monkeypatch, backend: str) -> None:
    """The client role's reads are charged too: a 15000-byte ServerHello is within OpenSSL's own limit
    for that message (20000), so with the limit lowered to 8 KiB it is hsd.wire that ends the request."""
    caplog.set_level(logging.INFO)
    limit = 8 * 1024
    monkeypatch.setattr(hsd.wire, "HANDSHAKE_READ_LIMIT", limit)
    with daemon(pki, backend) as (sim, running):
        with flooded_request(sim, "client", SERVER_HELLO, size=15000) as got:
            pass
    assert got["done_calls"] == 1 and got["ktls_tx"] is None
    assert got["status"] == errno.EMSGSIZE, running.outcomes[0].line()
    assert got["consumed"] <= limit, got
    assert len(limit_lines(caplog)) == 1, caplog.text


def test_the_budget_belongs_to_the_socket_not_to_one_reader() -> None:
    """A ClientHello pre-reader and the library after it (two RecordSockets) share one limit."""
    import time

    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"\x16\x03\x03\x00\x10" + bytes(16))
        first = hsd.wire.RecordSocket(a, time.monotonic() + 5)
        assert len(first.read_record()) == 21
        second = hsd.wire.RecordSocket(a, time.monotonic() + 5)
        assert second.bytes_read == first.bytes_read == 21
        second.budget.limit = 30
        b.sendall(b"\x16\x03\x03\x00\x10" + bytes(16))
        assert len(second.read_next()) == 5  # header: 26 of 30
        with pytest.raises(HandshakeTooLarge):
            second.read_next()  # the 16-byte body would pass the limit: refused before it is read
        assert queued(a, SIOCINQ) == 16
