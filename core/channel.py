"""The edge between the dispatcher and the kernel: one small interface, two implementations.

`hsd.netlink_channel.NetlinkChannel` talks to the real `handshake` family;
`hsd.sim_channel.SimChannel` talks to the kernel simulator.  The dispatcher
cannot tell them apart.  A channel may be used from several threads: accept()
from the dispatcher loop, done() from handshake workers.
"""

from __future__ import annotations

from typing import Protocol

from .ktls import KtlsInstaller
from .protocol import Done, HandshakeRequest

# wait_ready() result meaning "notifications were lost: drain the queue"
OVERRUN = -1


class Channel(Protocol):
    ktls: KtlsInstaller  # where this kernel takes session keys

    def wait_ready(self, timeout: float | None) -> int:
        """Block until READY notifications arrive; return how many, 0 on timeout, OVERRUN if some were lost."""

    def accept(self) -> HandshakeRequest | None:
        """ACCEPT the head of the queue: the request (its sockfd now open in this process), or None (EAGAIN).

        Raises hsd.protocol.ProtocolError for a malformed reply (with `.sockfd` set when known)."""

    def done(self, done: Done) -> int:
        """Send DONE; return 0 or the positive errno the kernel answered."""

    def close(self) -> None: ...
