"""Clean Debian roots (trixie, forky) for building and testing the .deb: made by mmdebstrap, cached as tarballs.

Why a cache: mmdebstrap needs the network and ~1 minute per suite; its result
only changes when the suite, the package list or the options do.  The tarball
name carries a hash of exactly those inputs (the package list includes the
Build-Depends read from debian/control), so editing any of them rebuilds.
The .deb itself is built and tested afresh in every run, never cached.
A root that cannot be built raises RootError: the tests fail, never skip.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.image import BuildError, host_mirror

REPO = Path(__file__).resolve().parents[2]
CONTROL = REPO / "debian" / "control"
BUILD_TIMEOUT = 1200

# Debian's own libraries (what ${python3:Depends} resolves to) and test tools, preinstalled so
# that `apt-get install ./hsd_*.deb` resolves offline against what the root already has;
# the Build-Depends come from debian/control, build-essential from the buildd variant.
RUNTIME_PACKAGES = ("python3-openssl", "python3-cryptography", "python3-pyroute2", "python3-pluggy",
                    "python3-stevedore")
TEST_PACKAGES = ("python3-pytest", "python3-hypothesis", "python3-prometheus-client", "python3-pip", "openssl",
                 "gnutls-bin", "keyutils", "iproute2", "procps", "ca-certificates", "lintian", "systemd", "ktls-utils",
                 "python3-venv", "softhsm2", "pkcs11-provider", "opensc")  # the last three: tests/debian/token_mtls.py


@dataclass(frozen=True)
class Suite:
    name: str
    apt_options: tuple[str, ...] = ()


SUITES = {
    "trixie": Suite("trixie"),
    # forky's Release file on the mirror is past its Valid-Until date
    "forky": Suite("forky", ('Acquire::Check-Valid-Until "false"',)),
}


class RootError(RuntimeError):
    """A root cannot be built: the Debian tests must fail loudly."""


def build_depends() -> list[str]:
    """Package names of the source stanza's Build-Depends (versions and alternatives' extras dropped)."""
    text = CONTROL.read_text()
    match = re.search(r"^Build-Depends:(.*?)(?=^\S)", text, re.M | re.S)
    if not match:
        raise RootError(f"{CONTROL} has no Build-Depends")
    names = []
    for item in match.group(1).replace("\n", " ").split(","):
        name = item.split("|")[0].strip().split(" ")[0].split("(")[0].strip()
        if name and not name.startswith("debhelper-compat"):
            names.append(name)
    return ["debhelper", *names]


def packages() -> list[str]:
    return sorted({*build_depends(), *RUNTIME_PACKAGES, *TEST_PACKAGES})


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsd-debian-roots"


def cache_key(suite: Suite) -> str:
    digest = hashlib.sha256("\0".join([suite.name, *suite.apt_options, "buildd", *packages()]).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Root:
    suite: Suite
    tarball: Path
    built_now: bool
    seconds: float  # time spent building it in this run (0 when cached)


def ensure_root(suite: Suite, log: Path) -> Root:
    """The cached tarball for suite, built first when its inputs changed; RootError if that fails."""
    tarball = cache_dir() / f"{suite.name}-{cache_key(suite)}.tar"
    if tarball.exists():
        return Root(suite, tarball, False, 0.0)
    if shutil.which("mmdebstrap") is None:
        raise RootError("mmdebstrap is not installed (scripts/setup-debian installs it)")
    if os.geteuid() != 0:
        raise RootError("building a Debian root needs root (mmdebstrap --mode=root)")
    try:
        mirror = host_mirror()
    except BuildError as exc:
        raise RootError(str(exc)) from None
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    cmd = ["mmdebstrap", "--mode=root", "--variant=buildd", f"--include={','.join(packages())}"]
    cmd += [f"--aptopt={option}" for option in suite.apt_options]
    cmd += [suite.name, str(partial), mirror]
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RootError(f"mmdebstrap {suite.name} took more than {BUILD_TIMEOUT} s; see {log}") from None
    if proc.returncode:
        partial.unlink(missing_ok=True)
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise RootError(f"mmdebstrap {suite.name} failed (exit {proc.returncode}); see {log}\n{tail}")
    partial.rename(tarball)
    for old in tarball.parent.glob(f"{suite.name}-*.tar"):  # keep one root per suite: each is ~700 MB
        if old != tarball:
            old.unlink(missing_ok=True)
    return Root(suite, tarball, True, time.monotonic() - started)
