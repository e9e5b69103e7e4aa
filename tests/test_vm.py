"""hsd on a real Linux 6.12 kernel under QEMU: `pytest -m vm`.

Why one boot for all scenarios: booting and installing hsd costs ~15 s under
emulation and every scenario cleans up after itself.  The harness runs as a
subprocess (python3 -m tests.vm), exactly as a developer would run it; a
guest that cannot be built fails the test (exit 2), it is never skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("tlshd-nfs", "ktls-matrix", "hsd-nfs", "nvme-psk", "bench-nfs")
HARNESS_TIMEOUT = 3600  # the harness bounds every boot itself; this only guards against a hung host

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm_run() -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.vm", "run", "--quiet", *SCENARIOS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=HARNESS_TIMEOUT)
    output = proc.stdout + proc.stderr
    print(output)
    if proc.returncode == 2:
        pytest.fail(f"the VM harness cannot build or start the guest:\n{output}")
    return proc.returncode, output


def _verdict(output: str, scenario: str) -> str:
    match = re.search(rf"^vm: {re.escape(scenario)}: (.*)$", output, re.M)
    assert match, f"the harness printed no verdict for {scenario}:\n{output[-4000:]}"
    return match.group(1)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_passes_on_real_kernel(vm_run: tuple[int, str], scenario: str) -> None:
    _, output = vm_run
    verdict = _verdict(output, scenario)
    if not verdict.startswith("PASS"):
        log = re.search(rf"^vm: .*files in (\S+)$", output, re.M)
        detail = ""
        if log:
            path = Path(log.group(1)) / "results" / f"{scenario}.log"
            if path.exists():
                detail = "".join(path.read_text().splitlines(True)[-60:])
        pytest.fail(f"{scenario}: {verdict}\n{detail}")


def test_harness_exit_code_matches_verdicts(vm_run: tuple[int, str]) -> None:
    rc, output = vm_run
    all_passed = all(_verdict(output, s).startswith("PASS") for s in SCENARIOS)
    assert rc == (0 if all_passed else 1)
