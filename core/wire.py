"""Deadline- and size-bounded TLS record I/O on the handed-over socket, shared by backends.

Backends read the peer's byte stream through this one piece at a time - a
record header, then (only if the library asks for more) the body that header
announced - so no byte meant for kTLS (anything after the peer's Finished) is
ever consumed in user space, a silent peer costs a poll() with a deadline, and
the library judges every header itself: it answers a zero-length, non-TLS,
SSLv2 or oversized record with whatever alert it would send on a socket of
its own.

Every read is also charged to the socket's handshake read limit: a peer can
make hsd read at most HANDSHAKE_READ_LIMIT bytes before the handshake is over
(a TLS library's defragmenter would otherwise buffer a 16 MiB handshake message
for it).  The budget belongs to the socket, not to one RecordSocket, so a
ClientHello pre-reader and the library after it share it.  So does what hsd
read ahead (hsd.tls13.peek_client_hello, for the server name): give_back()
leaves those pieces with the socket, and the next read_next() on it - the
library's - replays them in order before it reads on, so the library sees
exactly the byte stream it would have seen.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field

from .errors import HandshakeTimeout, HandshakeTooLarge, PeerClosed, PeerRejected

RECORD_HEADER = 5
MAX_RECORD = 16384 + 256  # TLSCiphertext limit (RFC 8446 5.2)
TLS_CONTENT_TYPES = (20, 21, 22, 23, 24)  # the five a TLS record header may carry (24: heartbeat)
NOT_TLS = "peer sent something that is not TLS"
HANDSHAKE_READ_LIMIT = 256 * 1024  # bytes one handshake may read from its peer; read when a socket is first used


def announced_body(header: bytes) -> int:
    """How many bytes follow these 5 header bytes in the record they start.

    An SSLv2-compatible ClientHello has a 2-byte header with a 15-bit length
    (so 3 of the 5 bytes already belong to its body); anything else is framed
    like a TLS record, as OpenSSL and tlslite frame it: length in bytes 3-4."""
    if header[0] & 0x80:
        return max(0, ((header[0] & 0x7F) << 8 | header[1]) + 2 - RECORD_HEADER)
    return int.from_bytes(header[3:5], "big")


def is_tls_framing(header: bytes) -> bool:
    """A TLS record header (any of the five content types, version 3.x) or an SSLv2-compatible hello."""
    return bool(header[0] & 0x80) or (header[0] in TLS_CONTENT_TYPES and header[1] == 3)


@dataclass
class ReadBudget:
    """What one handshake's socket may still deliver to user space."""

    limit: int
    used: int = 0
    replay: list[bytes] = field(default_factory=list)  # pieces read ahead by hsd, not yet given to the library
    replay_owed: int = 0  # body bytes of the last replayed header still on the socket
    replay_foreign: bool = False  # a replayed header was no TLS record header


_budgets: "weakref.WeakKeyDictionary[socket.socket, ReadBudget]" = weakref.WeakKeyDictionary()
_budgets_lock = threading.Lock()


def _budget_for(sock: socket.socket) -> ReadBudget:
    with _budgets_lock:
        budget = _budgets.get(sock)
        if budget is None:
            budget = _budgets[sock] = ReadBudget(HANDSHAKE_READ_LIMIT)
        return budget


class RecordSocket:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.budget = _budget_for(sock)
        self._owed = 0  # body bytes of the record whose header read_next() returned last
        self.saw_foreign_header = False  # read_next() handed the library bytes that are no TLS record header
        sock.setblocking(False)

    @property
    def bytes_read(self) -> int:
        """Bytes this handshake has taken off the socket so far (every RecordSocket on it)."""
        return self.budget.used

    def _wait(self, events: int) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeTimeout("handshake timed out")
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if not poller.poll(remaining * 1000):
            raise HandshakeTimeout("handshake timed out waiting for the peer")

    def _charge(self, n: int) -> None:
        """Refuse, before reading, what would take the handshake past its read limit."""
        budget = self.budget
        if budget.used + n > budget.limit:
            raise HandshakeTooLarge(f"peer sent more than the handshake read limit of {budget.limit} bytes "
                                    f"before the handshake completed ({budget.used} read)")

    def _recv_exact(self, n: int, *, first: bool = False) -> bytes:
        self._charge(n)
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLIN)
                continue
            except ConnectionResetError:
                raise PeerClosed("peer reset the connection") from None
            except OSError as exc:
                raise PeerClosed(f"receive failed: {exc.strerror}") from None
            if not chunk:
                raise PeerClosed("peer closed the connection" + ("" if first and not buf else " mid-record"))
            buf += chunk
            self.budget.used += len(chunk)
        return bytes(buf)

    def read_next(self) -> bytes:
        """The next piece of the peer's stream for a TLS library: a record header, or that record's body.

        Never reads past the record in progress, and hands a header over before
        its body, so the library answers a header it refuses (oversized,
        not TLS) at once, as it would on its own socket.  Pieces read ahead
        and given back (give_back) come first, in the order they were read."""
        budget = self.budget
        if budget.replay:
            piece = budget.replay.pop(0)
            if not budget.replay:
                self._owed, budget.replay_owed = budget.replay_owed, 0
                self.saw_foreign_header |= budget.replay_foreign
            return piece
        if self._owed:
            owed, self._owed = self._owed, 0
            return self._recv_exact(owed)
        header = self._recv_exact(RECORD_HEADER, first=True)
        self._owed = announced_body(header)
        if not is_tls_framing(header):
            self.saw_foreign_header = True
        return header

    def give_back(self, pieces: list[bytes]) -> None:
        """Leave pieces this RecordSocket returned from read_next() (all of them, in order) with the socket,
        for the next read_next() on it to replay, with the state of the record in progress."""
        budget = self.budget
        if not pieces:
            return
        if budget.replay:
            raise RuntimeError("give_back() while pieces given back earlier are still unread")
        budget.replay = list(pieces)
        budget.replay_owed, self._owed = self._owed, 0
        budget.replay_foreign = self.saw_foreign_header

    def read_record(self) -> bytes:
        """One whole TLS record (header + body), for hsd's own parsing before a library runs.

        Refuses (without an alert) what is not a TLS record header or announces
        more than a record may hold: hsd cannot judge those bytes and must not
        wait for a body no TLS peer sends.  A zero-length record is returned:
        the library the records are handed to decides about it."""
        if self._owed or self.budget.replay:
            raise RuntimeError("read_record() after read_next() returned a header, or with pieces given back")
        header = self._recv_exact(RECORD_HEADER, first=True)
        length = int.from_bytes(header[3:5], "big")
        if header[0] & 0x80 or not is_tls_framing(header):
            raise PeerRejected(NOT_TLS)
        if length > MAX_RECORD:
            raise PeerRejected(f"peer sent an oversized record ({length} bytes)")
        return header + self._recv_exact(length)

    def discard_arrived(self) -> None:
        """Read and drop what the peer has sent so far, without waiting, within the read limit.

        For a server that answers before it reads (a fatal alert, then DONE): a
        socket closed with unread bytes sends a reset instead of a FIN, and a
        reset can cost the peer the alert still on its way to it."""
        budget = self.budget
        while budget.used < budget.limit:
            try:
                chunk = self.sock.recv(min(65536, budget.limit - budget.used))
            except OSError:  # BlockingIOError: nothing more yet; anything else: nothing more ever
                return
            if not chunk:
                return
            budget.used += len(chunk)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT)
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise PeerClosed("peer closed the connection") from None
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    raise PeerClosed("peer closed the connection") from None
                raise PeerClosed(f"send failed: {exc.strerror}") from None
            view = view[sent:]
