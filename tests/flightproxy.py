"""A TLS-record-level man in the middle for fault and hostile-peer tests.

It sits between hsd's socket and a real peer (openssl s_server/s_client),
forwards whole records, and counts flights (a flight = consecutive records in
one direction).  At a chosen flight it can cut the connection on hsd's side
(close with FIN, reset with RST, or stall: forward nothing more), optionally
after half of the first record; and it can rewrite records on the way
(flip a byte, split a handshake message into 1-byte fragments).
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Callable

HEADER = 5

# (flight number, index of the record within the flight, direction, record) -> records to send instead
Mutator = Callable[[int, int, str, bytes], list[bytes]]


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FlightProxy:
    """Listens on loopback; each connection is relayed to `upstream` record by record.

    hsd_is_client: True when hsd's socket connects to the proxy (hsd plays the
    TLS client), False when the proxy connects to hsd (hsd plays the server)."""

    def __init__(self, upstream: tuple[str, int], *, hsd_is_client: bool, cut_flight: int | None = None,
                 action: str = "close", partial: bool = False, mutate: Mutator | None = None) -> None:
        assert action in ("close", "reset", "stall")
        self.upstream = upstream
        self.hsd_is_client = hsd_is_client
        self.cut_flight = cut_flight
        self.action = action
        self.partial = partial
        self.mutate = mutate
        self.flights: list[tuple[str, int]] = []  # (direction, records) as seen
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="flight-proxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _run(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                inbound, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                reset(inbound)
                continue
            self._sockets += [inbound, outbound]
            hsd, peer = (inbound, outbound) if self.hsd_is_client else (outbound, inbound)
            self._relay(hsd, peer)
            return  # one connection per proxy

    def _relay(self, hsd: socket.socket, peer: socket.socket) -> None:
        buffers = {hsd: bytearray(), peer: bytearray()}
        names = {hsd: "from-hsd", peer: "to-hsd"}
        other = {hsd: peer, peer: hsd}
        last_dir: str | None = None
        flight = 0
        index = 0
        open_ends = {hsd, peer}
        while not self._stop.is_set() and open_ends:
            ready, _, _ = select.select(list(open_ends), [], [], 0.2)
            for src in ready:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    open_ends.discard(src)
                    try:
                        other[src].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                buf = buffers[src]
                buf += data
                while len(buf) >= HEADER and len(buf) >= HEADER + int.from_bytes(buf[3:5], "big"):
                    size = HEADER + int.from_bytes(buf[3:5], "big")
                    record = bytes(buf[:size])
                    del buf[:size]
                    direction = names[src]
                    if direction != last_dir:
                        flight, index, last_dir = flight + 1, 0, direction
                        self.flights.append((direction, 0))
                    self.flights[-1] = (direction, self.flights[-1][1] + 1)
                    if self.cut_flight == flight:
                        self._cut(hsd, peer, record if direction == "to-hsd" else b"")
                        return
                    out = self.mutate(flight, index, direction, record) if self.mutate else [record]
                    index += 1
                    try:
                        other[src].sendall(b"".join(out))
                    except OSError:
                        open_ends.discard(other[src])

    def _cut(self, hsd: socket.socket, peer: socket.socket, record: bytes) -> None:
        if self.partial and record:
            try:
                hsd.sendall(record[: max(1, len(record) // 2)])
            except OSError:
                pass
        self.cut.set()
        if self.action == "stall":
            self._stop.wait()
            return
        if self.action == "reset":
            reset(hsd)
        else:
            hsd.shutdown(socket.SHUT_RDWR)
            hsd.close()
        peer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "FlightProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
