"""Deadline-bounded TLS record I/O on the handed-over socket, shared by backends.

Backends read exactly one TLS record at a time through this, so no byte meant
for kTLS (anything after the peer's Finished) is ever consumed in user space,
and a silent peer costs a poll() with a deadline, never a stuck thread.
"""

from __future__ import annotations

import errno
import select
import socket
import time

from .errors import HandshakeTimeout, PeerClosed, PeerRejected

RECORD_HEADER = 5
MAX_RECORD = 16384 + 256  # TLSCiphertext limit (RFC 8446 5.2)


class RecordSocket:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        sock.setblocking(False)

    def _wait(self, events: int) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeTimeout("handshake timed out")
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        if not poller.poll(remaining * 1000):
            raise HandshakeTimeout("handshake timed out waiting for the peer")

    def _recv_exact(self, n: int, *, first: bool = False) -> bytes:
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
        return bytes(buf)

    def read_record(self) -> bytes:
        """One whole TLS record (header + body)."""
        header = self._recv_exact(RECORD_HEADER, first=True)
        length = int.from_bytes(header[3:5], "big")
        if header[0] not in (20, 21, 22, 23) or header[1] != 3:
            raise PeerRejected("peer sent something that is not TLS")
        if length == 0:  # RFC 8446 5.1: no zero-length handshake/alert fragments; 5.2: AEAD needs a tag
            raise PeerRejected("peer sent an empty TLS record")
        if length > MAX_RECORD:
            raise PeerRejected(f"peer sent an oversized record ({length} bytes)")
        return header + self._recv_exact(length)

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
