"""pyproject.toml's lower bounds are what is tested: hsd on exactly those versions, installed by pip.

A constraints file is generated from the bounds at test time
(tests/debian/lowest.py), a separate virtual environment gets exactly those
versions from the package index (cached under $XDG_CACHE_HOME, keyed by the
constraints and the Python), and hsd from the committed tree (`git archive
HEAD`) is installed into it afresh.

Which tests: the same set, by the same command, as in the Debian roots: the
autopkgtest debian/tests/unit (every unit and interop test, the VM, the roots,
this step and the checkout's own packaging and setup tests left out), run with
this venv's python3 first on PATH.  What only this step has: the bounds
resolved together by pip from a constraints file, on the oldest Python
requires-python allows (this interpreter), the index's wheels (cryptography
43's own OpenSSL 3.3, which has no ML-KEM and never retries a key share by its
own preference, instead of Debian's system OpenSSL 3.5) and tlslite-ng at its
bound (the roots get the newest from pip).  Why all of them: which tests
depend on those libraries is not something a list keeps up with (a list of
"the library tests" once left out test_sni, whose HelloRetryRequest test
assumed OpenSSL 3.5).  Tests whose optional library is missing at those
versions (ML-DSA before cryptography 47) are deselected and counted by
tests.debian.select_available.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.debian.chroot import committed_tree
from tests.debian.lowest import constraints_text, lowest_constraints, requirements
from tests.debian.roots import REPO

pytestmark = pytest.mark.lowest

PYPROJECT = REPO / "pyproject.toml"
# The autopkgtest the Debian roots run (tests/test_debian.py): the same tests, the same pytest options.
UNIT_TESTS = "debian/tests/unit"


def run(cmd: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, **kwargs)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsd-lowest-venv"


def lowest_venv(constraints: Path) -> tuple[Path, bool]:
    """A venv holding exactly the lowest versions (and a build backend); built once per constraints + Python."""
    python = sys.executable
    key = hashlib.sha256((constraints.read_text() + sys.version).encode()).hexdigest()[:16]
    venv = cache_root() / key
    if (venv / "complete").exists():
        return venv, True
    shutil.rmtree(cache_root(), ignore_errors=True)  # one venv at a time
    created = run([python, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    installed = run([*pip, "-c", str(constraints), *requirements(PYPROJECT)])
    assert installed.returncode == 0, f"pip cannot install the lowest versions:\n{installed.stdout}{installed.stderr}"
    backend = run([*pip, "setuptools>=77", "wheel"])  # to build hsd without network in later runs
    assert backend.returncode == 0, backend.stderr
    (venv / "complete").write_text("")
    return venv, False


def installed_versions(venv: Path) -> dict[str, str]:
    listed = run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"])
    assert listed.returncode == 0, listed.stderr
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, _, version in (line.partition("==") for line in listed.stdout.split())}


def test_every_requirement_has_a_lower_bound() -> None:
    pins = lowest_constraints(PYPROJECT)
    print("lowest: " + ", ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    for name in ("pluggy", "pyroute2", "pyopenssl", "cryptography", "stevedore", "tlslite-ng"):
        assert name in pins


def test_unit_and_interop_tests_pass_on_the_lowest_versions(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(constraints_text(PYPROJECT))
    started = time.monotonic()
    venv, cached = lowest_venv(constraints)
    venv_seconds = time.monotonic() - started
    python = str(venv / "bin" / "python")

    versions = installed_versions(venv)
    wrong = {name: (version, versions.get(name)) for name, version in lowest_constraints(PYPROJECT).items()
             if versions.get(name) not in (version, version + ".0", version + ".0.0")}
    assert not wrong, f"not the lowest versions (wanted, installed): {wrong}"

    tree = tmp_path / "tree"
    commit = committed_tree(tree)
    install = run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(tree)])
    assert install.returncode == 0, install.stdout + install.stderr
    where = run([python, "-c", "import hsd; print(hsd.__file__)"], cwd=tree)
    assert where.stdout.startswith(str(venv)), f"hsd imported from {where.stdout!r}, not the lowest venv"

    started = time.monotonic()
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}")  # its python3 is the venv's
    env.pop("PYTHONPATH", None)
    assert (tree / UNIT_TESTS).is_file(), f"{UNIT_TESTS} is not in the tree"
    tests = run(["sh", UNIT_TESTS], cwd=tree, env=env, timeout=2400)
    test_seconds = time.monotonic() - started
    counts = ", ".join(f"{n} {k}" for n, k in re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped)",
                                                          tests.stdout))
    selection = re.search(r"^select_available: (.*)$", tests.stdout, re.M)
    print(f"lowest @ {commit}: Python {sys.version.split()[0]}; venv "
          f"{'cached' if cached else f'built in {venv_seconds:.0f} s'}; tests {test_seconds:.0f} s: {counts}; "
          + (selection.group(1) if selection else "(no selection line)"))
    for line in re.findall(r"^(?:tlslite-ng|ML-DSA).*$", tests.stdout, re.M):
        print(f"  {line}")
    assert tests.returncode == 0, tests.stdout[-8000:] + tests.stderr[-2000:]
    assert selection and "tlslite" not in selection.group(1).split()[0], "tlslite-ng 0.8 must be tested too"
