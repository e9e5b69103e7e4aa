"""hsd as Debian ships it: the .deb built, linted, installed and tested in clean trixie and forky roots.

Per suite, one root (mmdebstrap, cached by suite + package list under
$XDG_CACHE_HOME) is copied afresh, the committed tree (`git archive HEAD`) is
put in it, and these steps run inside it by chroot, each timed:
dpkg-buildpackage -us -uc -b, lintian, `apt-get install ./hsd_*.deb` (beside
ktls-utils), a look at what got installed, hsd's own report without
tlslite-ng, the unit and interop tests on Debian's libraries without
tlslite-ng (the tests needing it deselected and counted by
tests.debian.select_available), `pip install --break-system-packages
tlslite-ng` as docs/packaging.md tells an operator, and then only the tests
the first run left out (`--only-needing tlslite`): every test runs once per
root.  Both suites run side by side (threads): the steps mostly wait.
A root that cannot be built fails these tests; nothing here is ever skipped.
"""

from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.debian.chroot import SOURCE_DIR, TESTS_DIR, RootCopy, Step, head_commit, pip_env
from tests.debian.lowest import lowest_constraints
from tests.debian.roots import REPO, SUITES, RootError, ensure_root

pytestmark = pytest.mark.deb

DEBIAN_LIBRARIES = ("python3-openssl", "python3-cryptography", "python3-pyroute2", "python3-pluggy",
                    "python3-stevedore")
# Debian package -> the pyproject requirement it stands for (runtime libraries, then the test tools)
DEBIAN_VERSIONS = {"python3-openssl": "pyopenssl", "python3-cryptography": "cryptography",
                   "python3-pyroute2": "pyroute2", "python3-pluggy": "pluggy", "python3-stevedore": "stevedore",
                   "python3-pytest": "pytest", "python3-hypothesis": "hypothesis"}
UNIT = "/usr/lib/systemd/system/hsd.service"
TEMPLATE = "/usr/lib/systemd/system/hsd@.service"  # one instance per network namespace: installed, not enabled
PACKAGING_DOC = REPO / "docs" / "packaging.md"
# The unit and interop tests against the installed package: debian/tests/unit (the autopkgtest) says which.
# Once on Debian's libraries alone; after `pip install tlslite-ng` only the tests that run left out.
PYTEST = f"cd {TESTS_DIR} && sh debian/tests/unit"
PYTEST_TLSLITE_ONLY = f"{PYTEST} --only-needing tlslite"
# A client key generated in a SoftHSM2 token serves mutual TLS through pkcs11-provider (the system OpenSSL
# only: test_pkcs11.py covers the wheel's refusal); not a test_*.py file, so it runs here alone.
TOKEN_TESTS = f"cd {TESTS_DIR} && python3 -m pytest -q -p no:cacheprovider -rA tests/debian/token_mtls.py"
STEP_TIMEOUT = 1500
SELECT_TLSLITE_CONF = "[hsd]\nbackend=tlslite\n"


def tlslite_requirement() -> str:
    """The tlslite extra's requirement, as pyproject.toml states it (what the operator is told to install)."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = extras["tlslite"]
    return requirement


STEPS: tuple[tuple[str, str], ...] = (
    ("build", f"cd {SOURCE_DIR} && dpkg-buildpackage -us -uc -b"),
    ("lintian", "cd /build && lintian --pedantic --fail-on error --no-tag-display-limit hsd_*.changes"),
    ("install", "cd /build && apt-get install -y --no-install-recommends ./hsd_*_all.deb"),
    ("inspect", "cd /build && dpkg-deb -f hsd_*_all.deb Depends Suggests Enhances Conflicts Breaks Replaces\n"
                "echo '--- files'; dpkg -L hsd\n"
                "echo '--- ktls-utils conffiles'; dpkg-query -W -f='${Conffiles}\\n' ktls-utils | awk 'NF {print $1}'\n"
                "echo '--- enabled'; systemctl is-enabled hsd.service || true\n"
                "echo '--- template enabled'; systemctl is-enabled hsd@.service || true\n"
                "echo '--- execstart'; sed -n 's/^ExecStart=//p' " + UNIT + "\n"
                "echo '--- running'; for p in $(pgrep -x hsd); do [ /proc/$p/root -ef / ] && echo $p; done | grep . || echo none\n"
                "echo '--- check'; hsd check 2>/dev/null | head -1\n"
                "echo '--- versions'; dpkg-query -W -f='${Package} ${Version}\\n' " + " ".join(DEBIAN_VERSIONS)),
    ("without-tlslite", "rc=0; hsd plugins || rc=$?; echo \"plugins rc=$rc\"\n"
                        "rc=0; hsd check >/tmp/check.out || rc=$?; echo \"check rc=$rc\"\n"
                        "grep -E '^\\[(mode|plugin)\\]' /tmp/check.out\n"
                        f"printf '{SELECT_TLSLITE_CONF}' >/tmp/tlslite.conf\n"
                        "rc=0; hsd -c /tmp/tlslite.conf -s 2>/tmp/start.err || rc=$?; echo \"start rc=$rc\"\n"
                        "grep '^hsd: ' /tmp/start.err || true"),
    ("tests-without-tlslite", PYTEST),
    ("token", TOKEN_TESTS),
    ("pip-tlslite", f"pip install --break-system-packages '{tlslite_requirement()}'\n"
                    "python3 -c 'import tlslite, sys; print(\"tlslite-ng\", tlslite.__version__, tlslite.__file__)'"),
    ("tests-with-tlslite", PYTEST_TLSLITE_ONLY),
)
ESSENTIAL = {"build", "install", "pip-tlslite"}  # later steps mean nothing after these fail


@dataclass
class SuiteRun:
    suite: str
    commit: str
    root_seconds: float
    root_cached: bool
    steps: dict[str, Step] = field(default_factory=dict)
    seconds: float = 0.0  # in the root, all steps
    error: str = ""  # the root could not be built

    def step(self, name: str) -> Step:
        assert name in self.steps, f"{self.suite}: step {name} did not run (an earlier step failed: " \
                                   f"{[s.name for s in self.steps.values() if s.rc]})"
        return self.steps[name]

    def ok(self, name: str) -> Step:
        step = self.step(name)
        assert step.rc == 0, f"{self.suite}: {name} exited {step.rc}:\n{step.output[-6000:]}"
        return step

    def section(self, name: str, title: str) -> str:
        text = self.ok(name).output
        match = re.search(rf"^--- {re.escape(title)}\n(.*?)(?=^--- |\Z)", text, re.M | re.S)
        assert match, f"{self.suite}: {name} printed no '{title}' section:\n{text[-3000:]}"
        return match.group(1).strip()


def _setup_host() -> None:
    proc = subprocess.run([str(REPO / "scripts" / "setup-debian")], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"scripts/setup-debian failed:\n{proc.stdout}{proc.stderr}")


def _run_suite(name: str, log: Path, commit: str) -> SuiteRun:
    """Every step in a fresh copy of the suite's root; a root that cannot be built is run.error."""
    suite = SUITES[name]
    started = time.monotonic()
    try:
        root = ensure_root(suite, log)
    except RootError as exc:
        return SuiteRun(suite.name, "", time.monotonic() - started, False, error=str(exc))
    started = time.monotonic()
    with RootCopy(root, commit) as copy:
        run = SuiteRun(suite.name, copy.commit, root.seconds, not root.built_now)
        for step_name, script in STEPS:
            # pip's settings for the steps that reach the index: pip-tlslite, and the tests (the
            # example plugin's tests pip-install it into a venv, with its build backend)
            step = copy.run(step_name, script, timeout=STEP_TIMEOUT,
                            env=pip_env() if step_name.startswith(("pip-", "tests-")) else None)
            run.steps[step_name] = step
            if step.rc and step_name in ESSENTIAL:
                break
    run.seconds = time.monotonic() - started
    return run


_RUNS: dict[str, SuiteRun] = {}


def _all_suites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SuiteRun]:
    """Both suites at once, each in its own thread: the steps wait on peers and the network far more than
    they compute, so two roots side by side take little longer than one (2 cores)."""
    if not _RUNS:
        _setup_host()
        started = time.monotonic()
        commit = head_commit()  # both roots test the same commit, however HEAD moves meanwhile
        logs = {name: tmp_path_factory.mktemp(f"deb-{name}") / "mmdebstrap.log" for name in SUITES}
        with ThreadPoolExecutor(max_workers=len(SUITES)) as pool:
            futures = {name: pool.submit(_run_suite, name, logs[name], commit) for name in SUITES}
            _RUNS.update({name: future.result() for name, future in futures.items()})
        for name in sorted(SUITES, reverse=True):
            run = _RUNS[name]
            if run.error:
                print(f"{name}: the root cannot be built ({run.root_seconds:.0f} s)")
                continue
            timing = ", ".join(f"{s.name} {s.seconds:.0f} s" for s in run.steps.values())
            origin = "cached" if run.root_cached else f"built in {run.root_seconds:.0f} s"
            print(f"{name} @ {run.commit}: root {origin}; in the root {run.seconds:.0f} s ({timing})")
        print(f"deb: both suites in {time.monotonic() - started:.0f} s (side by side)")
    return _RUNS


@pytest.fixture(scope="module", params=sorted(SUITES, reverse=True))  # trixie first: the oldest libraries
def suite_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    run = _all_suites(tmp_path_factory)[request.param]
    if run.error:
        pytest.fail(f"the {run.suite} root cannot be built: {run.error}")
    return run


def test_builds_with_dpkg_buildpackage(suite_run: SuiteRun) -> None:
    suite_run.ok("build")


def test_lintian_reports_no_errors_and_every_warning_is_documented(suite_run: SuiteRun) -> None:
    output = suite_run.ok("lintian").output
    tags = sorted(set(re.findall(r"^([EWIPX]): hsd[^:]*: (\S+)", output, re.M)))
    print(f"{suite_run.suite}: lintian " + (", ".join(f"{kind}: {tag}" for kind, tag in tags) or "clean"))
    assert not [t for k, t in tags if k == "E"], output
    documented = PACKAGING_DOC.read_text()
    undocumented = [tag for kind, tag in tags if kind == "W" and f"`{tag}`" not in documented]
    assert not undocumented, f"lintian warnings not listed with a reason in docs/packaging.md: {undocumented}"


def test_depends_name_debians_libraries_and_nothing_conflicts_with_ktls_utils(suite_run: SuiteRun) -> None:
    fields = dict(re.findall(r"^(\w+): (.*)$", suite_run.ok("inspect").output, re.M))
    depends = {d.strip().split(" ")[0] for d in fields.get("Depends", "").split(",")}
    assert set(DEBIAN_LIBRARIES) <= depends, fields
    assert not any("tlslite" in d for d in depends), f"tlslite-ng is not in Debian, yet: {fields['Depends']}"
    assert "ktls-utils" in fields.get("Suggests", "") and "ktls-utils" in fields.get("Enhances", ""), fields
    for relation in ("Conflicts", "Breaks", "Replaces"):
        assert relation not in fields, f"hsd must install beside ktls-utils, yet {relation}: {fields[relation]}"


def test_installs_beside_ktls_utils_and_reads_its_config_without_owning_it(suite_run: SuiteRun) -> None:
    """trixie's ktls-utils 1.0.0 ships /etc/tlshd.conf, forky's 1.4.0 /etc/tlshd/config: hsd reads either."""
    files = suite_run.section("inspect", "files").splitlines()
    conffiles = suite_run.section("inspect", "ktls-utils conffiles").splitlines()
    tlshd_config = [c for c in conffiles if c in ("/etc/tlshd/config", "/etc/tlshd.conf")]
    assert tlshd_config, f"ktls-utils (installed in the root) ships no tlshd config: {conffiles}"
    assert not any(f.startswith(("/etc/tlshd", "/etc/hsd")) for f in files), files
    assert not set(conffiles) & set(files), "hsd ships a file of ktls-utils"
    assert suite_run.section("inspect", "check") == f"config file: {tlshd_config[0]}"
    print(f"{suite_run.suite}: ktls-utils owns {tlshd_config[0]}; hsd check reads it")


def test_unit_is_enabled_not_started_and_starts_the_installed_binary(suite_run: SuiteRun) -> None:
    files = suite_run.section("inspect", "files").splitlines()
    execstart = suite_run.section("inspect", "execstart")
    assert execstart.split()[0] in files, f"ExecStart={execstart} is not a file of the package"
    assert UNIT in files and "/usr/bin/hsd-sim" not in files
    assert suite_run.section("inspect", "enabled") == "enabled"
    assert TEMPLATE in files, "the package lacks the per-namespace template"
    assert suite_run.section("inspect", "template enabled") != "enabled", "the template was enabled at install"
    assert suite_run.section("inspect", "running") == "none", "the install started hsd inside the root"
    for page in ("/usr/share/man/man8/hsd.8.gz", "/usr/share/man/man5/hsd.conf.5.gz",
                 "/usr/share/doc/hsd/examples/hsd.conf.example"):
        assert page in files


def _release(version: str) -> tuple[int, ...]:
    """Upstream release of a Debian or pip version: epoch, revision and +dfsg dropped; 1.5 == 1.5.0."""
    upstream = version.split(":")[-1].rsplit("-", 1)[0].split("+")[0].split("~")[0]
    parts = [int(p) for p in re.findall(r"\d+", upstream)]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_trixie_has_exactly_pyprojects_lower_bounds_and_forky_no_less(suite_run: SuiteRun) -> None:
    """tests/test_lowest_versions.py leans on this: the trixie root runs the whole set on the bounds."""
    bounds = lowest_constraints(REPO / "pyproject.toml")
    installed = dict(line.split(" ", 1) for line in suite_run.section("inspect", "versions").splitlines())
    assert set(installed) == set(DEBIAN_VERSIONS), installed
    for package, name in DEBIAN_VERSIONS.items():
        have, bound = _release(installed[package]), _release(bounds[name])
        if suite_run.suite == "trixie":
            assert have == bound, f"trixie's {package} {installed[package]} is not the bound {name}>={bounds[name]}"
        else:
            assert have >= bound, f"{suite_run.suite}'s {package} {installed[package]} is below {name}>={bounds[name]}"
    print(f"{suite_run.suite}: " + ", ".join(f"{p} {v}" for p, v in sorted(installed.items())))


def test_without_tlslite_hsd_reports_it_unavailable_and_refuses_to_start_on_it(suite_run: SuiteRun) -> None:
    output = suite_run.ok("without-tlslite").output
    assert "plugins rc=0" in output and "check rc=0" in output, output
    assert re.search(r"^  tlslite\s+SKIPPED: cannot be loaded: ModuleNotFoundError: No module named 'tlslite'",
                     output, re.M), output
    assert re.search(r"^\[plugin\] tlslite cannot be loaded: ModuleNotFoundError", output, re.M), output
    assert len(re.findall(r"^\[mode\] \S+\s+backend=openssl ok$", output, re.M)) == 5, output
    assert "start rc=2" in output, output
    start_errors = re.findall(r"^hsd: .*$", output, re.M)
    assert len(start_errors) == 1 and "'tlslite' is unavailable" in start_errors[0], output


def test_a_client_key_in_a_softhsm2_token_serves_mutual_tls_and_never_leaves_it(suite_run: SuiteRun) -> None:
    """x509.private_key = pkcs11:... on Debian's python3-cryptography (system OpenSSL) with pkcs11-provider."""
    output = suite_run.ok("token").output
    passed = re.findall(r"^PASSED tests/debian/token_mtls.py::(\S+)", output, re.M)
    assert len(passed) == 3 and "failed" not in output.splitlines()[-1], output[-6000:]
    assert re.search(r"kTLS verified: \d+ records each way", output), output[-3000:]
    verdict = re.search(r"token key: (.*never extractable.*)$", output, re.M)
    assert verdict, output[-3000:]
    print(f"{suite_run.suite}: {verdict.group(0)}")


def _failures(output: str, limit: int = 12000) -> str:
    """pytest's FAILURES section (what went wrong), then the summary: the tail alone is statistics."""
    start = output.find("= FAILURES =")
    end = output.find("= Hypothesis Statistics =")
    body = output[output.rfind("\n", 0, start) + 1:end if end > start else None] if start >= 0 else ""
    return body[:limit] + "\n[...]\n" + output[-2000:]


def _pytest_summary(suite_run: SuiteRun, name: str) -> tuple[str, dict[str, str]]:
    step = suite_run.step(name)
    output = step.output
    counts = dict((kind, n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|deselected|skipped)", output))
    selection = re.search(r"^select_available: (.*)$", output, re.M)
    print(f"{suite_run.suite} {name}: {', '.join(f'{v} {k}' for k, v in counts.items())} in {step.seconds:.0f} s; "
          + (selection.group(1) if selection else "(no selection line)"))
    for line in re.findall(r"^(?:tlslite-ng|ML-DSA).*$", output, re.M):
        print(f"  {line}")
    assert step.rc == 0, f"{suite_run.suite}: {name} exited {step.rc}:\n{_failures(output)}"
    assert selection, output[-3000:]
    return selection.group(1), counts


def test_unit_and_interop_tests_pass_without_tlslite(suite_run: SuiteRun) -> None:
    selection, counts = _pytest_summary(suite_run, "tests-without-tlslite")
    assert "tlslite" in selection.split()[0], f"tlslite-ng was importable in the root: {selection}"
    assert int(counts.get("passed", 0)) > 0 and "failed" not in counts


def test_unit_and_interop_tests_pass_with_tlslite_from_pypi(suite_run: SuiteRun) -> None:
    """The tests the run on Debian's libraries alone left out, and only those, once tlslite-ng is there."""
    print(suite_run.ok("pip-tlslite").output.strip().splitlines()[-1])
    without, _ = _pytest_summary(suite_run, "tests-without-tlslite")
    selection, counts = _pytest_summary(suite_run, "tests-with-tlslite")
    fields = dict(item.split("=", 1) for item in selection.split())
    left_out = dict(item.split("=", 1) for item in without.split())
    assert fields.get("only") == "tlslite", selection
    assert int(fields["selected"]) >= max(int(left_out["deselected"]), 1), (selection, without)
    assert int(counts.get("passed", 0)) == int(fields["selected"]) and "failed" not in counts, counts
