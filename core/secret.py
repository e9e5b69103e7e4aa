"""One way to hold and to wipe key material: mutable buffers, zeroed in place.

Python's `bytes` cannot be overwritten, and a freed `bytes` object leaves its
contents in the heap until the allocator reuses the block.  So secrets live in
bytearrays (or ctypes buffers), travel as memoryviews over them, and are
zeroed with memset as soon as their consumer (the kernel, a KDF) has them.
`wipe()` zeroes whatever buffer it is given and never raises: a plugin may
still hand over an immutable copy, which is then skipped, not an error.
docs/secrets.md lists the copies the libraries keep that nothing here can reach.
"""

from __future__ import annotations

import ctypes
from typing import Any

_HEX = {c: v for v, c in enumerate(b"0123456789abcdef")} | {c: v for v, c in enumerate(b"ABCDEF", 10)}


def wipe(buf: Any) -> bool:
    """Zero a bytearray, writable memoryview or ctypes object in place; False if it is not wipeable."""
    if isinstance(buf, Secret):
        return buf.wipe()
    if type(buf) is bytearray:  # the common case, 8x faster than the ctypes path: a same-size slice
        buf[:] = bytes(len(buf))  # assignment overwrites the buffer in place (no reallocation, no copy left)
        return True
    if isinstance(buf, (ctypes.Array, ctypes.Structure, ctypes.Union)):
        ctypes.memset(ctypes.addressof(buf), 0, ctypes.sizeof(buf))
        return True
    try:
        view = memoryview(buf)
    except TypeError:  # None, str, int...: nothing we could overwrite
        return False
    try:
        if view.readonly or not view.c_contiguous:
            return False  # bytes: an immutable copy, left to the allocator (docs/secrets.md)
        size = view.nbytes
        if size:
            flat = view.cast("B")
            target = (ctypes.c_char * size).from_buffer(flat)
            ctypes.memset(target, 0, size)
            del target
            flat.release()
        return True
    except (BufferError, TypeError, ValueError):
        return False
    finally:
        try:
            view.release()
        except BufferError:
            pass


def wipe_all(*bufs: Any) -> None:
    """wipe() each buffer; never raises."""
    for buf in bufs:
        wipe(buf)


def fromhex_into(text: Any) -> bytearray:
    """Hex text (any bytes-like) decoded into a new bytearray, without an immutable intermediate.

    bytearray.fromhex needs a str, and a str of a secret cannot be wiped."""
    view = memoryview(text).cast("B")
    with view:
        if len(view) % 2:
            raise ValueError("odd-length hex secret")
        out = bytearray(len(view) // 2)
        try:
            for i in range(len(out)):
                out[i] = _HEX[view[2 * i]] << 4 | _HEX[view[2 * i + 1]]
        except KeyError:
            wipe(out)
            raise ValueError("non-hex character in a secret") from None
    return out


_B64 = {c: v for v, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def frombase64_into(text: Any) -> bytearray:
    """Base64 text (bytes-like; whitespace skipped, '=' ends it) decoded into a new bytearray.

    binascii returns an immutable bytes; this never makes one."""
    view = memoryview(text).cast("B")
    with view:
        out = bytearray(len(view) * 3 // 4 + 3)
        acc = bits = size = 0
        try:
            for c in view:
                if c in b" \t\r\n":
                    continue
                if c == 0x3D:  # '='
                    break
                acc = (acc << 6 | _B64[c]) & 0xFFFFFF
                bits += 6
                if bits >= 8:
                    bits -= 8
                    out[size] = acc >> bits & 0xFF
                    size += 1
        except KeyError:
            wipe(out)
            raise ValueError("non-base64 character in a secret") from None
        finally:
            acc = 0
    del out[size:]  # at most 3 bytes shorter: shrinks in place
    return out


class Secret:
    """Key material in a bytearray that is zeroed by wipe(), by leaving a `with` block, or when dropped.

    It never shows its contents: repr and str give only the length."""

    __slots__ = ("_buf",)

    def __init__(self, data: Any = b"", size: int | None = None) -> None:
        """A copy of `data` (wipe the source yourself if it is mutable), or `size` zero bytes to fill."""
        self._buf = bytearray(size) if size is not None else bytearray(data)

    @classmethod
    def adopt(cls, buf: bytearray) -> "Secret":
        """Take ownership of an existing bytearray without copying it."""
        if not isinstance(buf, bytearray):
            raise TypeError(f"a Secret adopts a bytearray, not {type(buf).__name__}")
        secret = cls.__new__(cls)
        secret._buf = buf
        return secret

    @property
    def buffer(self) -> bytearray:
        """The bytearray itself (no copy): pass it, or a memoryview of it, to consumers."""
        return self._buf

    def view(self) -> memoryview:
        return memoryview(self._buf)

    def wipe(self) -> bool:
        return wipe(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __enter__(self) -> "Secret":
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __del__(self) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"Secret({len(self._buf)} bytes)"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a copy we cannot wipe
        raise TypeError("a Secret cannot be pickled")
