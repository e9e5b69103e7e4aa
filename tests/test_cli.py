"""The `hsd` command line as an operator meets it: run as a real subprocess.

Expected failures must be one readable line and a non-zero exit, never a
traceback; tlshd's flags must keep working.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import hsd
from hsd.hookspecs import ENTRY_POINT_GROUP

TLSHD_FLAGS = ("-c", "--config", "-s", "--stderr", "-v", "--version", "-h", "--help")


def hsd_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m hsd.cli ARGS` the way a shell would, with no stdin and a hard time limit."""
    return subprocess.run([sys.executable, "-m", "hsd.cli", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    """The lines hsd itself prints on failure (log lines from plugins carry a timestamp instead)."""
    return [line for line in stderr.splitlines() if line.startswith("hsd: ") and "warning:" not in line]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tlshd.conf"
    path.write_text(text, encoding="utf-8")
    return path


def test_help_lists_every_tlshd_flag(tmp_path: Path) -> None:
    result = hsd_cli("-h", cwd=tmp_path)
    assert result.returncode == 0
    words = set(result.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    missing = [flag for flag in TLSHD_FLAGS if flag not in words]
    assert not missing, f"hsd -h lacks tlshd's flags {missing}:\n{result.stdout}"


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version_flag_prints_the_package_version(tmp_path: Path, flag: str) -> None:
    result = hsd_cli(flag, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"hsd {hsd.__version__}"


def test_unknown_key_warns_with_file_and_line_and_check_passes(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[debug]\nloglevel=0\nfrobnicate=3\n[hsd]\nbackend=openssl\n")
    result = hsd_cli("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{config}:3" in result.stderr
    assert "frobnicate" in result.stderr
    assert "configuration OK" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_accepts_config_before_the_subcommand_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[hsd]\nmax_inflight=7\n")
    result = hsd_cli("-c", str(config), "check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_inflight=7" in result.stdout


@pytest.mark.parametrize("text, line, words", [
    ("[hsd]\nmax_inflight=lots\n", 2, "not an integer"),
    ("[debug]\nloglevel=99\n", 2, "outside"),
    ("[hsd.backends]\nclient.psk=openssl\nserver.tls=openssl\n", 3, "is not a mode"),
    ("[hsd.server]\nrequire_client_certificate=perhaps\n", 2, "not a boolean"),
    ("[hsd.psk]\nmodes=psk_magic\n", 2, "psk modes"),
    ("loglevel=1\n", 1, "outside any [section]"),
])
def test_invalid_value_is_one_line_naming_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    config = write_config(tmp_path, text)
    result = hsd_cli("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{config}:{line}" in lines[0]
    assert words in lines[0]


def test_unreadable_config_is_one_line(tmp_path: Path) -> None:
    result = hsd_cli("check", "-c", str(tmp_path / "absent.conf"), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "absent.conf" in lines[0], result.stderr


def _kernel_has_handshake_family() -> bool:
    from hsd.netlink_channel import KernelUnsupported, resolve_family

    try:
        resolve_family()
    except KernelUnsupported:
        return False
    return True


def test_serving_a_kernel_without_the_handshake_family_fails_in_one_line(tmp_path: Path) -> None:
    if _kernel_has_handshake_family():
        pytest.skip("this kernel has the handshake family; the VM scenarios cover serving it")
    result = hsd_cli("--backend", "openssl", "-s", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "CONFIG_NET_HANDSHAKE" in lines[0]


def test_unknown_backend_names_the_installed_ones(tmp_path: Path) -> None:
    result = hsd_cli("--backend", "nosuch", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "'nosuch' is not installed" in lines[0]
    assert "openssl" in lines[0]


def test_plugins_lists_every_installed_backend_and_every_mode(tmp_path: Path) -> None:
    result = hsd_cli("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.split()}
    registered = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered <= listed, f"registered {sorted(registered)}, listed {sorted(listed)}"
    assert any(line.split()[:3] == ["openssl", hsd_openssl_version(), "backend"]
               for line in result.stdout.splitlines() if line.strip()), result.stdout
    for mode in ("client/unauth", "client/x509", "client/psk", "server/x509", "server/psk"):
        assert mode in result.stdout


def hsd_openssl_version() -> str:
    import hsd_openssl

    return hsd_openssl.hsd_backend_info().version


def test_a_missing_simulator_socket_is_named_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.sock"
    result = hsd_cli("--simulator", str(missing), cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # the system cannot serve: nothing to fix in the config
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert lines == [f"hsd: cannot connect to the simulator at {missing}: No such file or directory "
                     f"(start it first: hsd-sim --socket {missing})"], result.stderr


# hsd(8) EXIT STATUS: one table for every command
EXIT_CASES = [
    ("check of a good config", ["check"], "", 0),
    ("unknown option", ["--no-such-option"], "", 2),
    ("invalid value", ["check"], "[hsd]\nmax_inflight=lots\n", 2),
    ("typo in an hsd section", ["check"], "[hsd.sever]\nrequire_client_certificate=1\n", 2),
    ("daemon with an invalid value", ["-s"], "[hsd]\nworkers=0\n", 2),
    ("daemon with an unknown backend", ["-s"], "[hsd]\nbackend=nosuch\n", 2),
    ("check of an unknown backend", ["check"], "[hsd]\nbackend=nosuch\n", 2),
    ("plugins with nothing enabled", ["plugins"], "[hsd]\nenable_plugins=nosuch\n", 2),
    ("daemon with a missing key file", ["-s"], "[authenticate.server]\nx509.certificate=/nonexistent/c.pem\n"
                                               "x509.private_key=/nonexistent/k.pem\n", 2),
]


@pytest.mark.parametrize("args, text, code", [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES])
def test_exit_status_follows_the_man_page_table(tmp_path: Path, args: list[str], text: str, code: int) -> None:
    config = write_config(tmp_path, text)
    result = hsd_cli("-c", str(config), *args, cwd=tmp_path)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_man_page_documents_the_exit_status_table() -> None:
    page = (Path(__file__).parent.parent / "docs" / "hsd.8.md").read_text()
    table = page.split("# EXIT STATUS", 1)[1].split("\n# ", 1)[0]
    for code in ("**0**", "**1**", "**2**"):
        assert code in table
    two = table.split("**2**", 1)[1]
    for cause in ("strict_permissions", "hsd check", "[hsd", "private key"):
        assert cause in two, cause


def test_the_operators_guide_has_the_same_exit_status_table() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "operators-guide.md").read_text()
    table = guide.split("| exit status |", 1)[1].split("\n\n", 1)[0]  # the exit-status table alone
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip() in ("0", "1", "2")}
    assert set(rows) == {"0", "1", "2"}
    assert "hsd check" in rows["2"] and "strict_permissions" in rows["2"]
    assert "handshake" in rows["1"] and "simulator" in rows["1"]


def test_check_shows_the_command_line_overrides_as_the_effective_settings(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[hsd]\nworkers=2\nmax_inflight=5\nbackend=openssl\n")
    result = hsd_cli("-c", str(config), "--workers", "3", "--max-inflight", "9", "--backend", "tlslite", "check",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[hsd] backend=tlslite (--backend) max_inflight=9 handshake_timeout=10000ms workers=3" in result.stdout
