"""Drop every capability except CAP_NET_ADMIN once hsd has started.

Why: hsd parses bytes from any TLS peer on the network.  If a parser bug were
ever exploited, the process should hold only what ACCEPT/DONE need
(CAP_NET_ADMIN), not the full root capability set.  Everything that needs
more (binding the netlink socket, joining the group) is done before this.

Capabilities are per thread on Linux: call this from the thread that will
start the handshake workers, before it starts them (serve() does), so every
later thread inherits the reduced sets.  Done with prctl/capset via ctypes;
no libcap needed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

log = logging.getLogger("hsd")

CAP_NET_ADMIN = 12
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class PrivilegeError(OSError):
    """The kernel refused to reduce our capabilities (we then refuse to run half-dropped)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        return int(handle.read())


def capability_sets(status_path: str = "/proc/self/status") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a task, as integers."""
    sets: dict[str, int] = {}
    with open(status_path) as handle:
        for line in handle:
            if line.startswith("Cap"):
                name, value = line.split(":", 1)
                sets[name] = int(value.strip(), 16)
    return sets


def drop_all_but(keep: tuple[int, ...] = (CAP_NET_ADMIN,)) -> int:
    """Bounding set, ambient set, then permitted/effective/inheritable reduced to `keep`.

    Returns the mask kept.  Raises PrivilegeError if any step is refused."""
    libc = _libc()
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    # only what is still there: under systemd's CapabilityBoundingSet=CAP_NET_ADMIN the rest is
    # gone already, and so is CAP_SETPCAP, which PR_CAPBSET_DROP would need
    bounding = capability_sets("/proc/thread-self/status").get("CapBnd", 0)
    for cap in range(last_capability() + 1):
        if cap in keep or not bounding & (1 << cap):
            continue
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise PrivilegeError(err, f"cannot drop capability {cap} from the bounding set: {os.strerror(err)}")
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # kernels before 4.3 have no ambient set
            raise PrivilegeError(err, f"cannot clear the ambient capabilities: {os.strerror(err)}")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"capset failed: {os.strerror(err)}")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # no exec can give anything back
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"cannot set no_new_privs: {os.strerror(err)}")
    return mask


def drop_privileges() -> bool:
    """The daemon's start-up step: True if capabilities were dropped, False if skipped (not root)."""
    if os.geteuid() != 0:
        log.debug("not running as root: capabilities left as they are")
        return False
    mask = drop_all_but((CAP_NET_ADMIN,))
    log.info("dropped all capabilities except CAP_NET_ADMIN (bounding set included)")
    wider = threads_holding_more(mask)
    if wider:
        log.warning("%d thread(s) started before the drop keep wider capabilities: %s",
                    len(wider), ", ".join(map(str, wider)))
    return True


def threads_holding_more(mask: int) -> list[int]:
    """Task ids of this process whose effective set exceeds mask (capabilities are per thread)."""
    wider = []
    for tid in os.listdir("/proc/self/task"):
        try:
            sets = capability_sets(f"/proc/self/task/{tid}/status")
        except OSError:
            continue  # the thread ended meanwhile
        if sets.get("CapEff", 0) & ~mask:
            wider.append(int(tid))
    return sorted(wider)
