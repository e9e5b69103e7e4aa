"""A backend whose library is missing, as on Debian (no tlslite-ng there): reported, and refused when selected.

hsd runs as a real subprocess with a library made unimportable the way a
missing distribution package is (the import system raises ModuleNotFoundError
for it).  What is asserted is the operator's outcome: `hsd check` and `hsd
plugins` say which backend is unavailable and why, `hsd check` fails exactly
when hsd would refuse to start, and a start that selects a missing backend is
refused in one line before anything touches the kernel.  In the Debian roots
(tests/test_debian.py) the same tests also run where tlslite-ng is really
absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run hsd.cli with the named top-level modules unimportable (None in sys.modules makes
# every import of them raise ModuleNotFoundError, as a missing package does).
RUNNER = ("import sys\n"
          "for name in sys.argv[1].split(','):\n"
          "    if name: sys.modules[name] = None\n"
          "from hsd.cli import main\n"
          "sys.exit(main(sys.argv[2:]))\n")


def hsd_without(missing: tuple[str, ...], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(missing), *args], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tlshd.conf"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hsd: ") and "warning:" not in line]


def mode_lines(stdout: str) -> dict[str, str]:
    """`hsd check`'s per-mode lines: mode -> the rest of the line."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[mode] "):
            mode, _, rest = line.removeprefix("[mode] ").strip().partition(" ")
            out[mode] = rest.strip()
    return out


def test_check_without_tlslite_shows_it_unavailable_with_the_reason_and_passes(tmp_path: Path) -> None:
    result = hsd_without(("tlslite",), "check", "-c", config(tmp_path, "[hsd]\nbackend=openssl\n"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "[plugin] tlslite cannot be loaded: ModuleNotFoundError" in result.stdout
    assert "'tlslite'" in result.stdout
    modes = mode_lines(result.stdout)
    assert len(modes) == 5 and all(line == "backend=openssl ok" for line in modes.values()), modes
    assert result.stdout.rstrip().endswith("configuration OK")
    assert result.stderr == ""  # said once, in the report: not again by the log on stderr


def test_plugins_without_tlslite_lists_it_as_skipped_with_the_reason(tmp_path: Path) -> None:
    result = hsd_without(("tlslite",), "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.split()[:2] == ["tlslite", "SKIPPED:"]]
    assert skipped and "No module named 'tlslite'" in skipped[0], result.stdout


def test_check_fails_when_the_config_selects_a_backend_that_cannot_load(tmp_path: Path) -> None:
    cfg = config(tmp_path, "[hsd.backends]\nserver.x509=tlslite\n")
    result = hsd_without(("tlslite",), "check", "-c", cfg, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'tlslite'" in errors[0] and "selected for server/x509" in errors[0], result.stdout
    modes = mode_lines(result.stdout)
    assert modes["server/x509"].startswith("backend=tlslite unavailable: ") and "No module named" in modes["server/x509"]
    assert modes["client/x509"] == "backend=openssl ok"
    assert "configuration OK" not in result.stdout


def test_start_selecting_a_backend_that_cannot_load_is_refused_in_one_line(tmp_path: Path) -> None:
    """Refused before any kernel contact: the line names the backend and why, not CONFIG_NET_HANDSHAKE."""
    cfg = config(tmp_path, "[hsd.backends]\nclient.psk=tlslite\n")
    result = hsd_without(("tlslite",), "-c", cfg, "-s", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "'tlslite' is unavailable" in lines[0] and "No module named 'tlslite'" in lines[0], lines[0]
    assert "selected for client/psk" in lines[0]


def test_check_and_plugins_fail_when_no_backend_loads(tmp_path: Path) -> None:
    """pyOpenSSL missing as well: nothing can serve any mode, so neither command may say all is well."""
    missing = ("tlslite", "OpenSSL")
    check = hsd_without(missing, "check", "-c", config(tmp_path, ""), cwd=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "configuration FAILED" in check.stdout and "configuration OK" not in check.stdout
    assert all("unavailable" in line for line in mode_lines(check.stdout).values()), check.stdout
    plugins = hsd_without(missing, "plugins", cwd=tmp_path)
    assert plugins.returncode == 2, plugins.stdout + plugins.stderr
    assert "no configured mode has a backend that can serve it" in plugins.stdout
    assert "Traceback" not in check.stderr + plugins.stderr


def test_a_default_backend_that_cannot_be_imported_is_refused_at_start_as_check_reports_it(tmp_path: Path) -> None:
    """Debian trixie's libraries once made the default backend unimportable: the daemon must not say ready."""
    cfg = config(tmp_path, "")
    check = hsd_without(("OpenSSL",), "check", "-c", cfg, cwd=tmp_path)
    start = hsd_without(("OpenSSL",), "-c", cfg, "-s", cwd=tmp_path)
    assert check.returncode == 2 and start.returncode == 2, check.stdout + start.stderr
    errors = [line.removeprefix("error: ") for line in check.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("[hsd] backend = openssl: backend 'openssl' is unavailable")
    assert "No module named 'OpenSSL'" in errors[0]
    assert [line.removeprefix("hsd: ") for line in error_lines(start.stderr)] == errors
