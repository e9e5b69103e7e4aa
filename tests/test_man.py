"""The man pages: docs/build_man.py --check catches a malformed page, and hsd-sim has one that ships.

The malformed page below is the hsd(8) SYNOPSIS as it once was: the --workers
text inside SYNOPSIS (so OPTIONS lacked it) and a --simulator line without
`hsd`.  It rendered, and the old --check passed it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def build_man():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("build_man", DOCS / "build_man.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_page_is_well_formed_and_current() -> None:
    result = subprocess.run([sys.executable, str(DOCS / "build_man.py"), "--check"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(build_man().PAGES) == {"hsd.8.md", "hsd.conf.5.md", "hsd-sim.1.md"}


def test_the_old_malformed_synopsis_is_caught(tmp_path: Path) -> None:
    page = (DOCS / "hsd.8.md").read_text(encoding="utf-8")
    synopsis, rest = page.split("# DESCRIPTION", 1)
    head, _ = synopsis.split("# SYNOPSIS", 1)
    broken_synopsis = (
        "# SYNOPSIS\n**hsd** [**-c** *FILE*] [**-s**] [**--workers** *N*]\n\n"
        "**hsd** **--workers** *N*\n: Serve the queue with *N* daemon processes.\n\n"
        "**--simulator** *SOCKET* [*options*]\n\n")
    options_without_workers = rest.replace("**--workers** *N*\n: Serve the queue", "**--workers-gone** *N*\n: Serve")
    problems = build_man().lint(head + broken_synopsis + "# DESCRIPTION" + options_without_workers, "hsd.8.md",
                                ROOT / "core" / "cli.py")
    joined = "\n".join(problems)
    assert "SYNOPSIS holds a description" in joined
    assert "SYNOPSIS line '**--simulator** *SOCKET* [*options*]' does not start with **hsd**" in joined
    assert "--workers is in SYNOPSIS but documented under no OPTIONS or COMMANDS term" in joined
    assert "cli.py defines --workers, which no OPTIONS or COMMANDS term documents" in joined
    assert "OPTIONS documents --workers-gone, which cli.py does not define" in joined


def test_check_exits_non_zero_on_a_malformed_source(tmp_path: Path) -> None:
    """The command itself, not just lint(): a copy of docs/ whose hsd-sim page lost an option."""
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    for program in ("core/cli.py", "kit/simulator.py"):  # build_man.PROGRAMS, relative to the tree
        (tmp_path / program).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / program, tmp_path / program)
    page = copy / "hsd-sim.1.md"
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace("**--once**\n: Exit when", "Once\n: Exit when"), encoding="utf-8")
    result = subprocess.run([sys.executable, str(copy / "build_man.py"), "--check"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "simulator.py defines --once, which no OPTIONS or COMMANDS term documents" in result.stderr


def test_a_page_without_required_sections_is_caught() -> None:
    page = "---\ntitle: x\nsection: 1\ndate: 2026\nsource: hsd\nmanual: m\n---\n# NAME\nx - y\n"
    problems = build_man().lint(page, "x.1.md", ROOT / "kit" / "simulator.py")
    assert {p.split(": ", 1)[1] for p in problems if p.startswith("x.1.md: no ")} == {
        "no SYNOPSIS section", "no DESCRIPTION section", "no SEE ALSO section", "no OPTIONS section"}


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is installed by scripts/setup (man-db)")
def test_hsd_sim_page_renders_without_warnings() -> None:
    checked = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(DOCS / "man" / "hsd-sim.1")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_hsd_sim_page_ships_in_the_wheel_and_the_debian_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "hsd-sim.1" in pyproject["tool"]["setuptools"]["package-data"]["hsd.data.man"]
    manpages = (ROOT / "debian" / "hsd.manpages").read_text(encoding="utf-8").split()
    assert "docs/man/hsd-sim.1" in manpages
    assert (DOCS / "man" / "hsd-sim.1").is_file()
