"""The VM image cache never keeps a live /proc inside a guest root (tests/vm/image.py).

mmdebstrap can end a successful build with "W: umount /proc failed"; a cache that kept that
mount made `cp -r tests` read every process's pagemap and fill the disk.  Real mounts (root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.vm import image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def test_a_proc_left_mounted_in_a_built_root_is_unmounted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = tmp_path / "root" / "proc"
    proc.mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        assert image._has_mounts(tmp_path)
        image._unmount_leftovers(tmp_path, log_to=None)
        assert not image._has_mounts(tmp_path)
        assert not (proc / "self").exists()
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False, capture_output=True)
    assert f"vm: unmounted {proc.resolve()}" in capsys.readouterr().out


def test_a_root_without_mounts_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "root" / "proc").mkdir(parents=True)
    image._unmount_leftovers(tmp_path, log_to=None)
    assert not image._has_mounts(tmp_path)
