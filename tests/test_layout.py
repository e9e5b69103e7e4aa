"""The tree's layout holds: the daemon (core/) never imports the kit (kit/), the architecture doc's
module map names every module there is (and none that is gone), and the kit's pytest plugin does
nothing in a pytest run that uses none of its fixtures."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"core": "hsd", "kit": "hsd_kit", "plugins/openssl": "hsd_openssl", "plugins/tlslite": "hsd_tlslite",
           "plugins/psk": "hsd_psk"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


def _imported(path: Path, package: str) -> set[str]:
    """Every module name an import statement in path names, relative imports resolved against package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                if node.module:
                    names.add(f"{base}.{node.module}")
                else:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["core", "plugins/openssl", "plugins/tlslite", "plugins/psk"])
def test_the_daemon_and_its_plugins_never_import_the_kit(folder: str) -> None:
    offenders = {path.name: sorted(n for n in _imported(path, FOLDERS[folder]) if n.split(".")[0] == "hsd_kit")
                 for path in _modules(folder)}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"{folder} imports the kit: {offenders}"


def test_the_import_check_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The rule above must catch the forms a slip would take (guards against a check that sees nothing)."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from hsd_kit.harness import DaemonHarness\n    import hsd_kit\n"
                      "from . import config\n")
    assert _imported(sample, "hsd") == {"hsd_kit.harness", "hsd_kit", "hsd.config"}


def _documented() -> set[str]:
    """The paths the module map's tables name: `core/x.py` rows may use bare names, and a row's
    further bare names live in the folder of its first path (`plugins/openssl/identity.py`, `pq.py`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = "core"
        for name in re.findall(r"`([\w/]+\.py)`", line.split("|")[1]):
            if "/" in name:
                folder = name.rsplit("/", 1)[0]
                found.add(name)
            else:
                found.add(f"{folder}/{name}")
    return found


def test_the_module_map_names_every_module_and_only_those() -> None:
    present = {str(path.relative_to(ROOT)) for folder in FOLDERS for path in _modules(folder)}
    documented = _documented()
    assert not present - documented, f"modules missing from docs/architecture.md: {sorted(present - documented)}"
    assert not documented - present, f"docs/architecture.md names modules that do not exist: " \
                                     f"{sorted(documented - present)}"


def test_the_pytest_plugin_is_inert_until_a_fixture_is_used(tmp_path: Path) -> None:
    """pytest loads hsd's plugin in every run where hsd is installed: such a run must get no
    process keyring and import nothing of hsd beyond the plugin module itself."""
    (tmp_path / "test_other.py").write_text(textwrap.dedent("""
        import errno, sys

        def test_nothing_of_hsd_happened():
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("hsd", "hsd_kit", "hsd_openssl",
                                                                       "hsd_tlslite", "hsd_psk"))
            assert loaded == ["hsd_kit", "hsd_kit.pytest_plugin"], loaded
            from hsd import keyring
            try:
                serial = keyring.keyring_id(keyring.KEY_SPEC_PROCESS_KEYRING, create=False)
            except OSError as exc:
                assert exc.errno == errno.ENOKEY, exc
            else:
                raise AssertionError(f"a process keyring exists: {serial}")
    """))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "hsd_kit.pytest_plugin" in subprocess.run(
        [sys.executable, "-m", "pytest", "--trace-config", "--co", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout, "the plugin was not loaded"
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("argv", [["bench", "--quick"], ["bench", "startup"], ["demo"]])
def test_the_kit_commands_say_so_in_one_line_where_the_kit_is_missing(argv: list[str]) -> None:
    """A packager may ship the daemon without the kit: hsd bench/demo then fail with one clear line
    and exit 2, and the daemon's own commands still work (hsd --version imports nothing of the kit)."""
    blocker = textwrap.dedent(f"""
        import sys
        class NoKit:
            def find_spec(self, name, path=None, target=None):
                if name == "hsd_kit" or name.startswith("hsd_kit."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, NoKit())
        from hsd.cli import main
        sys.exit(main({argv!r}))
    """)
    run = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == ["hsd: this command needs hsd's kit (the Python package hsd_kit), "
                                               "which is not installed"], run.stderr
    assert "Traceback" not in run.stderr
    version = subprocess.run([sys.executable, "-c", blocker.replace(repr(argv), "['--version']")],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("hsd "), version.stdout + version.stderr
