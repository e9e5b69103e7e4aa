"""A throw-away copy of a cached root, with the committed tree in it, and steps run inside it by chroot.

Why a copy from `git archive HEAD` (resolved once per run): other work in the checkout (uncommitted
edits) must not leak into what is built and tested; the package is what the
commit says.  Why chroot rather than mmdebstrap hooks: the root is reused from
the cache, so nothing here needs the network except the step that asks pip
for tlslite-ng, the way an operator would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.image import _has_mounts

from .roots import REPO, Root

SOURCE_DIR = "/build/hsd"  # dpkg-buildpackage runs here; the .deb lands in /build
TESTS_DIR = "/srv/hsd-tests"  # a second, untouched copy of the tree: tests run against the installed package
HOST_CA = "/usr/local/share/ca-certificates-host.crt"  # the host's CA bundle, for pip only (see pip_env)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Step:
    name: str
    rc: int
    seconds: float
    output: str


def head_commit() -> str:
    """HEAD's commit id, resolved once per run: every root and step then tests the same commit."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def committed_tree(dest: Path, commit: str | None = None) -> str:
    """Extract the commit's files (HEAD's by default) into dest; return the commit id."""
    dest.mkdir(parents=True, exist_ok=True)
    commit = commit or head_commit()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise RuntimeError("git archive HEAD failed")
    return commit


class RootCopy:
    """Extracted root with /proc, /sys, /dev mounted; steps run by chroot; removed on exit."""

    def __init__(self, root: Root, commit: str | None = None) -> None:
        self.root = root
        self.dir = Path(tempfile.mkdtemp(prefix=f"hsd-deb-{root.suite.name}-", dir="/var/tmp"))
        self.mounts: list[Path] = []
        self.commit = commit or ""

    def __enter__(self) -> "RootCopy":
        subprocess.run(["tar", "-x", "-C", str(self.dir), "-f", str(self.root.tarball)], check=True)
        for kind, source, target in (("proc", "proc", "proc"), ("sysfs", "sysfs", "sys"),
                                     ("bind", "/dev", "dev"), ("bind", "/dev/pts", "dev/pts")):
            path = self.dir / target
            path.mkdir(parents=True, exist_ok=True)
            args = ["--bind", source] if kind == "bind" else ["-t", kind, source]
            subprocess.run(["mount", *args, str(path)], check=True)
            self.mounts.append(path)
        shutil.copy("/etc/resolv.conf", self.dir / "etc" / "resolv.conf")
        host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
        if host_ca.exists():
            shutil.copy(host_ca, self.dir / HOST_CA.lstrip("/"))
        self.commit = committed_tree(self.dir / SOURCE_DIR.lstrip("/"), self.commit or None)
        committed_tree(self.dir / TESTS_DIR.lstrip("/"), self.commit)
        return self

    def __exit__(self, *_exc: object) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)
        if not _has_mounts(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, name: str, script: str, timeout: float = 900, env: dict[str, str] | None = None) -> Step:
        """Run a shell script as root inside the root; never raises for a failing script."""
        base = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
                "TERM": "dumb"}
        started = time.monotonic()
        try:
            proc = subprocess.run(["chroot", str(self.dir), "/bin/sh", "-ec", script], env={**base, **(env or {})},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=timeout)
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rc, output = 124, out + f"\n(timed out after {timeout:.0f} s)"
        return Step(name, rc, time.monotonic() - started, output)

    def path(self, inside: str) -> Path:
        return self.dir / inside.lstrip("/")


def pip_env() -> dict[str, str]:
    """pip inside the root reaches the index only with the host's CA bundle, and without host pip settings."""
    return {"PIP_CERT": HOST_CA, "SSL_CERT_FILE": HOST_CA, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CONFIG_FILE": os.devnull, "PIP_ROOT_USER_ACTION": "ignore"}
