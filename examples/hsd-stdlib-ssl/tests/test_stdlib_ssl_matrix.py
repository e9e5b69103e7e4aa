"""hsd's interop matrix against this backend, through hsd's own test kit (pytest plugin `hsd`).

    pip install -e examples/hsd-stdlib-ssl && pytest examples/hsd-stdlib-ssl/tests
"""

from __future__ import annotations

import os
import stat
import sys

import pytest

pytestmark = pytest.mark.hsd_backend("stdlib-ssl")


def test_interop(hsd_case, hsd_run_case) -> None:
    """Every matrix case for client/unauth: real openssl/gnutls peers, kTLS data both ways, failures."""
    hsd_run_case(hsd_case)


WRITES: list[tuple[str, bool]] = []  # (path, is a pipe) for every file opened for writing while armed
ARMED = False


def _for_writing(mode: object, flags: object) -> bool:
    if isinstance(mode, str):
        return any(ch in mode for ch in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _audit(event: str, args: tuple) -> None:
    if ARMED and event == "open" and len(args) >= 3 and _for_writing(args[1], args[2]):
        if isinstance(args[0], int):  # an already open fd wrapped in a file object (a peer's stdin)
            WRITES.append((f"fd {args[0]}", stat.S_ISFIFO(os.fstat(args[0]).st_mode)))
            return
        path = os.fsdecode(args[0])
        WRITES.append((path, path.startswith("/proc/self/fd/") and stat.S_ISFIFO(os.stat(path).st_mode)))


sys.addaudithook(_audit)


def test_secrets_only_ever_go_through_a_pipe(hsd_daemon, hsd_pki) -> None:
    """Every file opened for writing during 3 handshakes is the keylog pipe, once per handshake."""
    global ARMED
    from hsd_kit import matrix

    case = next(c for c in matrix.MATRIX if c.name == "client-unauth-gnutls-aes-128-gcm-sha256")
    fds_before = len(os.listdir("/proc/self/fd"))
    ARMED = True
    try:
        for _ in range(3):
            matrix.run_case(hsd_daemon, case, hsd_pki, "stdlib-ssl")
    finally:
        ARMED = False
    keylogs = [path for path, _ in WRITES if path.startswith("/proc/self/fd/")]
    assert len(keylogs) == 3, WRITES  # the keylog is opened once per handshake
    assert all(is_pipe for _, is_pipe in WRITES), WRITES  # everything written is a pipe, never a file on disk
    assert len(os.listdir("/proc/self/fd")) == fds_before  # both pipe ends closed again
