"""The worked third-party plugin (examples/hsd-stdlib-ssl) and two broken ones, installed for real.

They are installed from their own pyproject.toml into a throwaway venv that
chains this environment's packages (hsd included), so the test environment
itself never changes.  Then: `hsd plugins` lists the example with its mode and
reports the broken ones, selection by --backend and [hsd.backends] works, and
the test kit's interop matrix (the example's own few-line test file) passes.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from hsd_kit import peers

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hsd-stdlib-ssl"
BROKEN = ROOT / "examples" / "hsd-broken"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A venv over this environment's site-packages with the example plugins installed; removed afterwards."""
    where = tmp_path_factory.mktemp("plugin-venv")
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True, timeout=120)
    python = str(where / "venv" / "bin" / "python")
    # --system-site-packages would only reach the base interpreter's packages, not this venv's (where hsd
    # is installed, editable): chain this environment's site directories instead, .pth files included.
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    chain = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    Path(purelib, "zz-hsd-test-parent.pth").write_text(chain)
    env = dict(os.environ, XDG_CACHE_HOME=str(where / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(EXAMPLE), str(BROKEN)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"python": python, **{f"env:{k}": v for k, v in env.items()}}


def run(venv: dict[str, str], *args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k[4:]: v for k, v in venv.items() if k.startswith("env:")}
    return subprocess.run([venv["python"], *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def test_hsd_plugins_lists_the_example_and_skips_the_broken_ones(venv, tmp_path) -> None:
    result = run(venv, "-m", "hsd.cli", "plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"stdlib-ssl\s+0\.1\.0\s+backend\s+API 2\s+modes: client/unauth$", out, re.M), out
    assert re.search(r"broken-import\s+SKIPPED: cannot be loaded: ImportError", out), out
    assert re.search(r"wrong-api\s+SKIPPED: it targets plugin API 999, this hsd provides API 2$", out, re.M), out
    assert re.search(r"old-api\s+SKIPPED: it targets plugin API 1, this hsd provides API 2 \(API 2: hsd_handshake "
                     r"is called only on the backend chosen for the mode", out), out
    assert re.search(r"openssl\s+\S+\s+backend", out)  # the built-in backends still load


def test_selecting_the_example_by_flag_and_by_mode(venv, tmp_path) -> None:
    by_flag = run(venv, "-m", "hsd.cli", "--backend", "stdlib-ssl", "plugins", cwd=tmp_path)
    assert re.search(r"client/unauth\s+stdlib-ssl$", by_flag.stdout, re.M), by_flag.stdout
    assert "backend 'stdlib-ssl' does not serve client/x509" in by_flag.stdout
    conf = tmp_path / "hsd.conf"
    conf.write_text("[hsd.backends]\nclient.unauth=stdlib-ssl\n", encoding="utf-8")
    by_mode = run(venv, "-m", "hsd.cli", "-c", str(conf), "plugins", cwd=tmp_path)
    assert re.search(r"client/unauth\s+stdlib-ssl$", by_mode.stdout, re.M), by_mode.stdout
    assert re.search(r"client/x509\s+openssl$", by_mode.stdout, re.M)  # other modes keep the default


@pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-serv")),
                    reason="needs the openssl and gnutls-bin command-line tools")
def test_the_interop_matrix_passes_on_the_example_with_broken_plugins_installed(venv, tmp_path) -> None:
    """The example's own test file is the test kit's matrix (client/unauth cases) plus its keylog check."""
    result = run(venv, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(EXAMPLE / "tests"),
                 cwd=tmp_path)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 14 and "failed" not in summary and "skipped" not in summary, summary
    for name in ("client-unauth-openssl-aes-256-gcm-sha384", "fail-client-untrusted-ca",
                 "fail-client-peer-never-answers", "cross-client-unauth-vs-openssl-server",
                 "test_secrets_only_ever_go_through_a_pipe"):
        assert re.search(rf"PASSED .*{re.escape(name)}", result.stdout), name
    assert "aes-128-ccm" not in result.stdout  # the plugin declared it cannot offer CCM: not asked to


# ---------------------------------------------------------------- docs/plugins.md runs as written

GUIDE = ROOT / "docs" / "plugins.md"


def guide_blocks(language: str) -> list[str]:
    """The guide's fenced blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", GUIDE.read_text(encoding="utf-8"), re.M | re.S)


@pytest.mark.skipif(not peers.tool_available("openssl"), reason="the guide's test-kit snippets use openssl s_server")
def test_every_python_block_of_the_plugin_guide_runs_as_written(venv, tmp_path) -> None:
    """Top to bottom as one script, with the example plugin installed as a reader following the guide would
    have it; each assert in the blocks must hold.  A block that stops running fails here."""
    blocks = guide_blocks("python")
    assert len(blocks) >= 5, "the guide lost its Python examples"
    script = tmp_path / "guide.py"
    script.write_text("\n\n".join(blocks) + "\nprint('guide ran:', len(%r))\n" % blocks, encoding="utf-8")
    result = run(venv, str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"guide ran: {len(blocks)}" in result.stdout


def test_the_guides_config_and_registration_blocks_are_what_hsd_and_the_example_use() -> None:
    from hsd.config import parse

    (toml,) = guide_blocks("toml")
    assert toml.strip() in (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    (ini,) = guide_blocks("ini")
    cfg = parse(ini, "docs/plugins.md")
    assert cfg.backend_for("client", "unauth") == "stdlib-ssl" and cfg.backend_for("server", "x509") == "openssl"
    assert cfg.disable_plugins == ["tlslite"] and "stdlib-ssl" in cfg.enable_plugins
    matrix = (EXAMPLE / "tests" / "test_stdlib_ssl_matrix.py").read_text(encoding="utf-8")
    pytest_block = next(block for block in guide_blocks("python") if "hsd_run_case" in block)
    for line in ('pytestmark = pytest.mark.hsd_backend("stdlib-ssl")', "hsd_run_case(hsd_case)"):
        assert line in pytest_block and line in matrix
