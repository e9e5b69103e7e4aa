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
"""

from __future__ import annotations

import os
import stat
import threading

_warned: set[str] = set()
_warned_lock = threading.Lock()


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
    found = problems(path, what, secret=secret)
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
