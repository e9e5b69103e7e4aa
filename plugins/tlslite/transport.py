"""The socket tlslite gets: one record piece per refill, deadline- and size-bounded, never closed.

tlslite wraps whatever socket it is given in a buffer that asks for 4096
bytes at a time, which on a real socket would swallow records that follow the
peer's Finished (they belong to kTLS).  This object only ever hands out bytes
it has read through hsd.wire.RecordSocket.read_next() - a record header, then
that record's body when tlslite asks for more - so after the handshake
nothing past the last handshake record has left the kernel, tlslite judges
every header itself (and sends its own alert), and the handshake read limit
caps what tlslite's defragmenter can be made to buffer.  close() and shutdown() do nothing: the core owns the socket and must
still send DONE.
"""

from __future__ import annotations

from tlslite.constants import AlertDescription

from hsd.errors import PeerRejected
from hsd.wire import NOT_TLS, RecordSocket

ALERT = 21


class RecordTransport:
    """A socket-like object for tlslite over RecordSocket."""

    def __init__(self, records: RecordSocket, first: bytes = b"") -> None:
        self.records = records
        self._pending = bytearray(first)  # bytes of records already read, not yet given to tlslite
        self.records_read = 0  # pieces (record headers and bodies) read from the socket
        self.bytes_sent = 0

    def recv(self, bufsize: int) -> bytearray:
        if not self._pending:
            self._pending += self.records.read_next()
            self.records_read += 1
        chunk = self._pending[:bufsize]
        del self._pending[:bufsize]
        return chunk

    def send(self, data: bytes) -> int:
        self.records.write(bytes(data))
        self.bytes_sent += len(data)
        if self.records.saw_foreign_header and data[:1] == bytes([ALERT]):
            # tlslite has answered bytes that are no TLS record with its alert (now sent): end the
            # handshake with a reason that says so instead of tlslite's bare alert name
            alert = AlertDescription.toStr(data[6]) if len(data) >= 7 else "an alert"
            raise PeerRejected(f"{NOT_TLS} (tlslite answered {alert})")
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.send(data)

    @property
    def unread(self) -> int:
        """Bytes read from the socket that tlslite has not consumed (must be 0 after a handshake)."""
        return len(self._pending)

    def getpeername(self):
        return self.records.sock.getpeername()

    def getsockname(self):
        return self.records.sock.getsockname()

    def settimeout(self, value: float | None) -> None:
        """Ignored: the deadline bounds every read and write."""

    def gettimeout(self) -> float | None:
        return None

    def setsockopt(self, level: int, optname: int, value) -> None:
        """Ignored: socket options are the core's business."""

    def shutdown(self, how: int) -> None:
        """Never: the core still needs the connection (DONE, then kTLS)."""

    def close(self) -> None:
        """Never: the core owns the socket."""
