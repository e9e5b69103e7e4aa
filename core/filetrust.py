"""Whether a file hsd trusts could have been written by someone else: one rule for every such file.

Why: the config file, trust stores, CRLs, certificates and private keys decide
which peers hsd accepts and which identity it presents.  Whoever can write one
of them - or replace it, by writing a directory above it - decides that
instead of the administrator; whoever can read a private key can impersonate us.

The rule (docs/operators-guide.md, "File permissions"):
  * the file is owned by root or by the daemon's own uid, and is not writable by
    group or others;
  * a private key is not accessible by group or others at all;
  * every directory from / down to the file (for a symlink: to its target) is
    owned by root or the daemon's uid and not writable by group or others - a
    sticky directory (like /tmp) is accepted, nobody else may rename or remove
    the entries there that they do not own.
`[hsd] strict_permissions = true` refuses such a file; otherwise hsd warns once
per file and problem and goes on.

The check runs every time a file is used (every handshake), so a file that
passed is remembered by its identity - device, inode, size, mode, owner,
modification and change times (a chmod or chown changes the last) - and not
walked again while that identity is unchanged, for at most CLEAN_FOR seconds
(docs/performance.md, "Per-handshake cost").  This keeps the rule: replacing
or rewriting the file changes its identity and is checked at once, before the
file is used; what can go unseen for up to a second is a directory opened up
later above an unchanged file, which nobody can have used yet to replace it
(that would change the file).  Only a clean verdict is remembered: a file with
a problem is checked again every time, so fixing a directory is seen at once.
"""

from __future__ import annotations

import os
import stat
import threading
import time

_warned: set[str] = set()
_warned_lock = threading.Lock()

CLEAN_FOR = 1.0  # seconds a file that passed is not walked again while its identity is unchanged
_clean: dict[tuple[str, bool, int], tuple[tuple[int, ...], float]] = {}
_clean_lock = threading.Lock()


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _who(mode: int, group_bits: int, other_bits: int) -> str:
    return " and ".join(who for who, bits in (("group", group_bits), ("others", other_bits)) if mode & bits)


def _directories(path: str) -> list[str]:
    """Every directory above the file as given and above its resolved target, nearest first, once each."""
    found: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        current = os.path.dirname(start)
        while True:
            if current not in found:
                found.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return found


def _directory_problem(directory: str) -> str | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not _trusted_owner(st.st_uid):
        return f"its directory {directory} is owned by uid {st.st_uid}"
    if mode & 0o022 and not mode & stat.S_ISVTX:
        return f"its directory {directory} is writable by {_who(mode, 0o020, 0o002)} (mode {mode:04o})"
    return None


def problems(path: str, what: str, *, secret: bool = False) -> list[str]:
    """What is wrong with trusting path (empty: nothing; a missing file is the reader's to report)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    mode = stat.S_IMODE(st.st_mode)
    found = []
    if not _trusted_owner(st.st_uid):
        found.append(f"{path}: {what} file is owned by uid {st.st_uid}, not root; chown root it")
    if secret and mode & 0o077:
        found.append(f"{path}: {what} file is accessible by {_who(mode, 0o070, 0o007)} (mode {mode:04o}); "
                     "chmod 600 it")
    elif mode & 0o022:
        found.append(f"{path}: {what} file is writable by {_who(mode, 0o020, 0o002)} (mode {mode:04o}); "
                     "chmod go-w it")
    for directory in _directories(path):
        problem = _directory_problem(directory)
        if problem:
            found.append(f"{path}: {problem}; others can replace the {what} file")
            break  # the nearest one names the fix; the others follow once it is fixed
    return found


def enforce(path: str, what: str, strict: bool, *, refuse: type[Exception], secret: bool = False) -> str | None:
    """Raise refuse(message) when strict and path is not trustworthy; else the warning, the first time only.

    Returns None when the file is fine or this very warning was already given
    (the caller logs what it gets: once per file and problem, not per handshake)."""
    key = (path, secret, os.geteuid())
    try:
        st = os.stat(path)
        identity: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_uid,
                                            st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        identity = None
    now = time.monotonic()
    with _clean_lock:
        seen = _clean.get(key)
        if identity is not None and seen is not None and seen[0] == identity and now - seen[1] < CLEAN_FOR:
            return None
    found = problems(path, what, secret=secret)
    with _clean_lock:
        if found or identity is None:
            _clean.pop(key, None)
        else:  # identity taken before the walk: a change during it is a mismatch next time
            _clean[key] = (identity, now)
    if not found:
        return None
    text = "; ".join([found[0], *(item.removeprefix(f"{path}: ") for item in found[1:])])
    if strict:
        raise refuse(f"{text} ([hsd] strict_permissions refuses it)")
    with _warned_lock:
        if text in _warned:
            return None
        _warned.add(text)
    return text
