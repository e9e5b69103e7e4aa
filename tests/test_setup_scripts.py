"""README's commands: `scripts/run` installs only what running needs, quietly, and only once.

Run on this very checkout and its .venv (what README's commands use): the
set-up has already happened (scripts/test ran scripts/setup), so these runs
must find everything in place and install nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import hsd

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup"
VM_AND_TEST_TOOLS = {"qemu-system-x86", "mmdebstrap", "busybox-static", "xz-utils", "cpio", "man-db",
                     "libseccomp2", "python3-pip", "keyutils"}


def setup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SETUP), *args], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)


def test_running_needs_no_vm_or_test_tools() -> None:
    run = setup("--list", "--run")
    full = setup("--list")
    assert run.returncode == 0 and full.returncode == 0, run.stderr + full.stderr
    run_packages, test_packages = set(run.stdout.split()), set(full.stdout.split())
    assert {"python3", "python3-venv", "openssl", "gnutls-bin"} <= run_packages  # hsd demo's real peers
    assert not run_packages & VM_AND_TEST_TOOLS, run_packages & VM_AND_TEST_TOOLS
    assert run_packages <= test_packages and VM_AND_TEST_TOOLS <= test_packages  # the test command keeps them


def test_scripts_run_sets_up_for_running_only() -> None:
    calls = [line.strip() for line in (ROOT / "scripts" / "run").read_text().splitlines()
             if "scripts/setup" in line and not line.lstrip().startswith("#")]
    assert calls == ["./scripts/setup --run"]
    test_calls = [line.strip() for line in (ROOT / "scripts" / "test").read_text().splitlines()
                  if "scripts/setup" in line and not line.lstrip().startswith("#")]
    assert test_calls == ["./scripts/setup"]


def test_a_second_set_up_installs_nothing_and_prints_one_line() -> None:
    for args in ((), ("--run",)):  # normally up to date already; installs once if pyproject.toml changed since
        first = setup(*args)
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stderr == "" and all(line.startswith("setup: ") for line in first.stdout.splitlines()), \
            first.stdout  # no tool noise, also when it installs
    log = ROOT / ".venv" / "pip-install.log"
    stamps = sorted((ROOT / ".venv").glob("hsd-setup.*"))
    assert stamps, "set-up leaves a stamp saying what it installed"
    before = (os.stat(log).st_mtime_ns if log.exists() else None, [s.read_text() for s in stamps])
    for args in (("--run",), ()):
        again = setup(*args)
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"setup: up to date (hsd {hsd.__version__})\n" and again.stderr == "", again.stdout
    after = (os.stat(log).st_mtime_ns if log.exists() else None, [s.read_text() for s in stamps])
    assert after == before, "pip ran again although nothing changed"


def test_an_unknown_option_is_one_line() -> None:
    result = setup("--frobnicate")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "setup: unknown option --frobnicate (use --run or --list)\n"
