"""Logging what a peer sent without letting the peer size or pace hsd's logs.

Anything an unauthenticated peer chose (a PSK identity, a name, a parser's
complaint about its bytes) goes into a log line only through truncate() or
truncate_list(): printable, control characters escaped, cut at a bound with an
ellipsis and a count of what was cut.  Warnings a peer can trigger at will (one
per bad connection) go through a PeerRateLimiter: a token bucket per peer
address, so a peer that opens a thousand bad connections gets a few lines and,
on the next line it is allowed, "N similar messages suppressed".
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable

DEFAULT_LIMIT = 64  # characters of one peer-supplied value
DEFAULT_ITEMS = 4  # values of one peer-supplied list
ELLIPSIS = "\u2026"


def _printable(text: str) -> str:
    """Control, format and separator characters (newlines, ANSI escapes, RTL marks) as escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def truncate(value: bytes | bytearray | memoryview | str, limit: int = DEFAULT_LIMIT) -> str:
    """value as one printable line of at most `limit` characters plus, when cut, an ellipsis and its size.

    Only the head of the value is looked at (a 64 KiB identity costs no more
    than a short one); bytes are shown as UTF-8 with undecodable bytes escaped."""
    total = len(value)
    if isinstance(value, str):
        unit, head = "characters", value[: limit + 1]
        rendered = _printable(head)
    else:
        unit, head = "bytes", bytes(value[: 4 * limit + 4])  # enough for `limit` characters of any kind
        rendered = _printable(head.decode("utf-8", errors="backslashreplace"))
    if len(head) == total and len(rendered) <= limit:
        return rendered
    return f"{rendered[:limit]}{ELLIPSIS} ({total} {unit} in all)"


def truncate_list(values: Iterable[bytes | bytearray | memoryview | str], items: int = DEFAULT_ITEMS,
                  limit: int = DEFAULT_LIMIT) -> str:
    """The first `items` values, each truncated and quoted, then how many more there were."""
    shown: list[str] = []
    more = 0
    for value in values:
        if len(shown) < items:
            shown.append(f"'{truncate(value, limit)}'")
        else:
            more += 1
    if more:
        shown.append(f"{ELLIPSIS} (+{more} more)")
    return ", ".join(shown) or "none"


def peer_of(sock: socket.socket) -> str:
    """The peer's address without the port: what a rate limit is keyed by (one host, many connections)."""
    try:
        address = sock.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address) or "unknown"


class PeerRateLimiter:
    """A token bucket per peer: `burst` lines at once, then one per `interval` seconds; the rest counted.

    At most `max_peers` buckets are kept (least recently used dropped), so
    many addresses cannot grow it without bound; a dropped peer starts afresh.
    Thread-safe: handshakes run in parallel threads."""

    def __init__(self, burst: int = 5, interval: float = 60.0, max_peers: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self.max_peers = max_peers
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # peer -> [tokens, last refill, suppressed]
        self._lock = threading.Lock()

    def admit(self, peer: str) -> int | None:
        """None: drop this line (it is counted).  Otherwise log it; the number is how many were dropped before."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(peer)
            if bucket is None:
                bucket = [float(self.burst), now, 0.0]
                self._buckets[peer] = bucket
                while len(self._buckets) > self.max_peers:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(peer)
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) / self.interval)
                bucket[1] = now
            if bucket[0] < 1.0:
                bucket[2] += 1
                return None
            bucket[0] -= 1.0
            suppressed, bucket[2] = int(bucket[2]), 0.0
            return suppressed

    def warning(self, logger: logging.Logger, peer: str, message: str, *args: object) -> bool:
        """logger.warning(message % args) unless this peer is over its rate; True when it was logged."""
        suppressed = self.admit(peer)
        if suppressed is None:
            return False
        if suppressed:
            message += f" ({suppressed} similar messages from this peer suppressed)"
        logger.warning(message, *args)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
