"""hsd's .deb for a guest, built by `dpkg-buildpackage -us -uc -b` in a clean root of the guest's suite.

Why the Debian roots of tests/debian (reused, not copied): they are the same
clean build roots the package steps use (cached as tarballs, so CI builds them
once for both), and building in the guest's own suite gives the .deb the
${python3:Depends} that suite resolves.  The package is what HEAD says
(`git archive HEAD`), like every .deb: commit before a VM run.  The .deb is
cached by suite and commit, so a second run of the same commit skips the build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.debian.chroot import SOURCE_DIR, RootCopy
from tests.debian.roots import SUITES, RootError, ensure_root

from .image import CACHE, BuildError

DEB_CACHE = CACHE / "debs"
KEEP_DEBS = 4  # per suite


@dataclass(frozen=True)
class Deb:
    path: Path
    commit: str
    root_seconds: float  # building the clean root (0 when cached)
    build_seconds: float  # dpkg-buildpackage and its copy of the root (0 when cached)


def head_commit() -> str:
    from .image import REPO

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def ensure_deb(suite: str, log_to=sys.stderr) -> Deb:
    """The .deb of HEAD built in suite's clean root; BuildError when it cannot be built."""
    commit = head_commit()
    out_dir = DEB_CACHE / f"{suite}-{commit}"
    cached = sorted(out_dir.glob("hsd_*_all.deb"))
    if cached:
        return Deb(cached[0], commit, 0.0, 0.0)
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    log = DEB_CACHE / f"{suite}-build.log"
    log.write_text("")
    try:
        root = ensure_root(SUITES[suite], log)
    except RootError as exc:
        raise BuildError(f"the {suite} build root cannot be built: {exc}") from None
    if root.built_now:
        print(f"vm: {suite} build root built in {root.seconds:.0f} s", file=log_to)
    started = time.monotonic()
    with RootCopy(root) as copy:
        step = copy.run("build", f"cd {SOURCE_DIR} && dpkg-buildpackage -us -uc -b", timeout=1200)
        with log.open("a") as out:
            out.write(step.output)
        debs = sorted(copy.path("/build").glob("hsd_*_all.deb"))
        if step.rc or not debs:
            tail = "".join(step.output.splitlines(True)[-30:])
            raise BuildError(f"dpkg-buildpackage failed in the {suite} root (exit {step.rc}); see {log}\n{tail}")
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        shutil.copy(debs[0], partial / debs[0].name)
        partial.rename(out_dir)
    for old in sorted(DEB_CACHE.glob(f"{suite}-*/"), key=lambda p: p.stat().st_mtime)[:-KEEP_DEBS]:
        shutil.rmtree(old, ignore_errors=True)
    seconds = time.monotonic() - started
    print(f"vm: {suite} .deb of {commit} built in {seconds:.0f} s", file=log_to)
    return Deb(out_dir / debs[0].name, commit, root.seconds, seconds)
