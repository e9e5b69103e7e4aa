"""Reduce what the running daemon holds: capabilities to CAP_NET_ADMIN, no core dumps, no ptrace.

Why: hsd parses bytes from any TLS peer on the network.  If a parser bug were
ever exploited, the process should hold only what ACCEPT/DONE need
(CAP_NET_ADMIN), not the full root capability set; and the session secrets and
private keys in its memory must not end up in a core file or be readable
through /proc/PID/mem by a process of the same uid without CAP_SYS_PTRACE.

Capabilities are per thread on Linux: the drop must happen while the process
has one thread, before any other is started (serve_workers() and serve() do it
first), so every later thread and every forked worker inherits the reduced sets.

Under the shipped systemd unit the sets already fit (CapabilityBoundingSet=
CAP_NET_ADMIN) and capset(2) is denied by its system call filter (it is in
@privileged): each step is taken only when something is left to remove, and a
refused capset is tolerated when the sets are already within the bound.
Done with prctl/capset via ctypes; no libcap needed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource

log = logging.getLogger("hsd")

CAP_NET_ADMIN = 12
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
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
    """The kernel refused to reduce our privileges (we then refuse to run half-dropped)."""


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


def _mask_of(caps: tuple[int, ...]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def _drop_from_bounding_set(libc: ctypes.CDLL, keep_mask: int, bounding: int) -> None:
    # only what is still there: under systemd's CapabilityBoundingSet=CAP_NET_ADMIN the rest is
    # gone already, and so is CAP_SETPCAP, which PR_CAPBSET_DROP would need
    for cap in range(last_capability() + 1):
        if keep_mask & (1 << cap) or not bounding & (1 << cap):
            continue
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise PrivilegeError(err, f"cannot drop capability {cap} from the bounding set: {os.strerror(err)}")


def _set_thread_capabilities(libc: ctypes.CDLL, target: int, sets: dict[str, int]) -> None:
    """permitted = effective = target, inheritable empty; capset only if that changes anything."""
    if (sets.get("CapPrm", 0), sets.get("CapEff", 0), sets.get("CapInh", 0)) == (target, target, 0):
        return  # already so (the shipped unit): capset is not even called
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = target & 0xFFFFFFFF
    data[1].effective = data[1].permitted = target >> 32
    if libc.capset(ctypes.byref(header), data) == 0:
        return
    err = ctypes.get_errno()
    within = not ((sets.get("CapPrm", 0) | sets.get("CapEff", 0) | sets.get("CapInh", 0)) & ~target)
    if err == errno.EPERM and within:
        # a system call filter denies capset, but nothing beyond the kept set is held: nothing to drop
        log.debug("capset refused (EPERM); the capability sets are already within the kept set")
        return
    raise PrivilegeError(err, f"capset failed: {os.strerror(err)}")


def drop_all_but(keep: tuple[int, ...] = (CAP_NET_ADMIN,)) -> int:
    """Bounding set, ambient set, then permitted/effective/inheritable reduced to `keep`.

    Returns the mask kept (what of `keep` this thread was permitted).  Raises
    PrivilegeError if a step that had something to remove is refused."""
    libc = _libc()
    keep_mask = _mask_of(keep)
    sets = capability_sets("/proc/thread-self/status")
    _drop_from_bounding_set(libc, keep_mask, sets.get("CapBnd", 0))
    if sets.get("CapAmb", 0) and libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"cannot clear the ambient capabilities: {os.strerror(err)}")
    target = sets.get("CapPrm", 0) & keep_mask  # capset can only lower: never ask for more than permitted
    _set_thread_capabilities(libc, target, sets)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # no exec can give anything back
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"cannot set no_new_privs: {os.strerror(err)}")
    return target


def forbid_core_dumps() -> None:
    """Not dumpable (no core file, no ptrace or /proc/PID/mem without CAP_SYS_PTRACE), RLIMIT_CORE 0.

    Why: the daemon holds private keys and traffic secrets in memory; a crash
    must not write them to disk, and another process of the same uid must not
    read them.  Inherited by forked workers and isolated handshakes; an exec
    resets the dumpable flag, so a re-spawned worker calls this again."""
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"cannot clear the dumpable flag: {os.strerror(err)}")
    if resource.getrlimit(resource.RLIMIT_CORE) == (0, 0):
        return  # LimitCORE=0 in the unit: nothing to lower
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # hard 0 too: it cannot be raised again
    except (OSError, ValueError) as exc:
        raise PrivilegeError(errno.EPERM, f"cannot set RLIMIT_CORE to 0: {exc}") from None


def is_dumpable() -> bool:
    return _libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


def harden_process() -> bool:
    """The daemon's first start-up step, while it has one thread: no core dumps, then the capability drop.

    Returns True if capabilities were dropped, False if that was skipped (not
    root).  Raises PrivilegeError when a step is refused."""
    forbid_core_dumps()
    return drop_privileges()


def drop_privileges() -> bool:
    """Capabilities down to CAP_NET_ADMIN: True if dropped, False if skipped (not root)."""
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
