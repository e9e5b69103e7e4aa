"""The capability drop where capset(2) is denied: tolerated only when nothing is left to drop.

systemd's SystemCallFilter=~@privileged (the shipped unit) makes capset fail
with EPERM.  Each case runs hsd's start-up hardening in a fresh child process,
with a real seccomp filter denying capset (libseccomp, loaded before hsd is
imported) and the capability sets set up by setpriv (util-linux), then reads
the sets the kernel reports for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from ctypes.util import find_library

import pytest

from hsd import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="capability sets of root (CI runs as root)")

NET_ADMIN_ONLY = 1 << privileges.CAP_NET_ADMIN

HARDEN_WITHOUT_CAPSET = textwrap.dedent('''
    import ctypes, errno, json
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # allow everything ...
    capset = lib.seccomp_syscall_resolve_name(b"capset")
    assert lib.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, capset, 0) == 0  # ... but capset: EPERM
    assert lib.seccomp_load(ctx) == 0
    from hsd import privileges
    refused = None
    try:
        privileges.harden_process()
    except privileges.PrivilegeError as exc:
        refused = exc.strerror
    print(json.dumps({"refused": refused, "sets": privileges.capability_sets(),
                      "dumpable": privileges.is_dumpable()}))
''')


def harden_under_denied_capset(setpriv_args: list[str]) -> dict:
    assert find_library("seccomp"), "libseccomp is not installed (scripts/setup installs libseccomp2)"
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv is not installed (scripts/setup installs util-linux)"
    prefix = [setpriv, *setpriv_args] if setpriv_args else []
    result = subprocess.run([*prefix, sys.executable, "-c", HARDEN_WITHOUT_CAPSET], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_sets_already_within_the_bound_start_although_capset_is_denied() -> None:
    """Regression: capset was called unconditionally, failed with EPERM, and hsd refused to start."""
    outcome = harden_under_denied_capset(["--bounding-set=-all,+net_admin", "--inh-caps=-all", "--ambient-caps=-all"])
    assert outcome["refused"] is None, outcome
    assert outcome["sets"]["CapEff"] == outcome["sets"]["CapPrm"] == outcome["sets"]["CapBnd"] == NET_ADMIN_ONLY
    assert outcome["dumpable"] is False


def test_a_denied_capset_that_was_needed_only_for_the_inheritable_set_within_the_bound_is_tolerated() -> None:
    """CapInh = CAP_NET_ADMIN asks for a capset; denied, but nothing beyond CAP_NET_ADMIN is held."""
    outcome = harden_under_denied_capset(["--bounding-set=-all,+net_admin", "--inh-caps=+net_admin",
                                          "--ambient-caps=-all"])
    assert outcome["sets"]["CapInh"] == NET_ADMIN_ONLY, "setpriv did not set up the case"
    assert outcome["refused"] is None, outcome
    assert outcome["sets"]["CapEff"] == outcome["sets"]["CapPrm"] == NET_ADMIN_ONLY


def test_a_denied_capset_with_wider_sets_is_refused_not_run_half_dropped() -> None:
    """Full root sets and no capset: the bounding set shrinks, but CapEff would stay wide - refuse."""
    assert privileges.capability_sets()["CapEff"] & ~NET_ADMIN_ONLY, "this test process must hold more"
    outcome = harden_under_denied_capset([])
    assert outcome["refused"] == "capset failed: Operation not permitted", outcome
    assert outcome["sets"]["CapEff"] & ~NET_ADMIN_ONLY, "the case is the one where capset had work to do"
    assert outcome["sets"]["CapBnd"] == NET_ADMIN_ONLY
