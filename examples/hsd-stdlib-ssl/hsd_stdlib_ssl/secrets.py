"""TLS 1.3 traffic secrets from SSLContext.keylog_filename, pointed at a pipe - never a file on disk.

Python's ssl has no keylog callback, only a file name, which it opens (mode
"a") the moment it is set.  /proc/self/fd/N of a pipe's write end opens the
pipe itself: the secrets go from OpenSSL into a kernel buffer and out again
here.  A pipe is not seekable, so ssl writes no header.  Setting the name to
None closes ssl's copy, so the read end sees EOF.
"""

from __future__ import annotations

import os
import ssl

from hsd.errors import HandshakeError
from hsd.secret import fromhex_into, wipe

WANTED = ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")


class KeylogPipe:
    """One handshake's keylog: a pipe opened when entered, closed (both ends) when left."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.read_fd = -1

    def __enter__(self) -> "KeylogPipe":
        self.read_fd, write_fd = os.pipe()
        try:
            self.context.keylog_filename = f"/proc/self/fd/{write_fd}"
        finally:
            os.close(write_fd)  # ssl holds its own descriptor now
        return self

    def collect(self) -> dict[str, bytearray]:
        """The application traffic secrets (stops ssl writing, reads to EOF, wipes what it read).

        The keylog text is read into bytearrays and decoded in place with
        hsd.secret (no immutable bytes or str of a secret is made), then zeroed."""
        self.context.keylog_filename = None
        raw, chunk = bytearray(), bytearray(4096)
        found: dict[str, bytearray] = {}
        try:
            while got := os.readv(self.read_fd, [chunk]):
                raw += memoryview(chunk)[:got]
            pos = 0
            while pos < len(raw):
                end = raw.find(b"\n", pos)
                end = len(raw) if end < 0 else end
                label = bytes(raw[pos:max(pos, raw.find(b" ", pos, end))]).decode(errors="replace")  # not secret
                if label in WANTED:
                    with memoryview(raw) as view:
                        found[label] = fromhex_into(view[raw.rfind(b" ", pos, end) + 1:end])
                pos = end + 1
        finally:
            wipe(raw)
            wipe(chunk)
        missing = [name for name in WANTED if name not in found]
        if missing:
            raise HandshakeError(f"the keylog did not carry {', '.join(missing)}")
        return found

    def __exit__(self, *exc: object) -> None:
        self.context.keylog_filename = None
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
