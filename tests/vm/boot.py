"""Boot the guest once, run scenarios inside it, and collect one verdict per scenario.

Why one boot per call: booting costs ~10-20 s under emulation while the
scenarios clean up after themselves, so a run lists several.  Verdicts come
back through the per-run 9p share (results/NAME.rc); the console markers are
the fallback when the guest died before it could write them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .image import CACHE, HERE, Image

REPO = HERE.parent.parent
SCENARIOS = HERE / "scenarios"
BOOT_ALLOWANCE = 180  # seconds for boot, hsd install and power-off, on top of the scenario limits
DEFAULT_LIMIT = 600
KEEP_RUNS = 10


@dataclass
class Verdict:
    scenario: str
    rc: int | None  # None: the guest never reported
    seconds: float | None
    log: Path

    @property
    def passed(self) -> bool:
        return self.rc == 0

    def describe(self) -> str:
        if self.rc is None:
            return f"{self.scenario}: NO VERDICT (guest crashed or timed out); see {self.log}"
        state = "PASS" if self.rc == 0 else ("TIMEOUT" if self.rc == 124 else f"FAIL (exit {self.rc})")
        return f"{self.scenario}: {state} in {self.seconds:.1f} s"


@dataclass
class RunResult:
    verdicts: list[Verdict]
    run_dir: Path
    boot_seconds: float | None  # host start -> guest init running
    total_seconds: float
    console: str

    @property
    def passed(self) -> bool:
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIOS.glob("*.sh") if not p.name.startswith("_"))


def split_scenario(spec: str) -> tuple[str, str | None]:
    """`NAME@VARIANT` runs NAME's script with HSD_VARIANT=VARIANT (e.g. the backend); `NAME` alone, none."""
    name, _, variant = spec.partition("@")
    return name, (variant or None)


def scenario_variants(name: str) -> list[str]:
    """A scenario declares the variants it accepts with a `# variants: A B ...` line (first = default)."""
    match = re.search(r"^# variants:\s*(.+)$", (SCENARIOS / f"{name}.sh").read_text(), re.M)
    return match.group(1).split() if match else []


def scenario_limit(spec: str) -> int:
    """A scenario declares its own bound with a `# limit: SECONDS` line."""
    name, _ = split_scenario(spec)
    match = re.search(r"^# limit:\s*(\d+)", (SCENARIOS / f"{name}.sh").read_text(), re.M)
    return int(match.group(1)) if match else DEFAULT_LIMIT


def describe_scenarios() -> list[str]:
    """One line per scenario: its name and, where it has any, the variants it accepts."""
    lines = []
    for name in available_scenarios():
        variants = scenario_variants(name)
        lines.append(name + (f"  (variants: {' '.join(f'{name}@{v}' for v in variants)})" if variants else ""))
    return lines


def unknown_scenarios(specs: list[str]) -> list[str]:
    bad = []
    for spec in specs:
        name, variant = split_scenario(spec)
        if name not in available_scenarios() or (variant is not None and variant not in scenario_variants(name)):
            bad.append(spec)
    return bad


def build_hsd_wheel(dest: Path) -> Path:
    """hsd from this checkout's working tree (uncommitted edits included), never from a registry."""
    src = dest / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for item in _source_dirs():
        shutil.copytree(REPO / item, src / item, ignore=ignore, dirs_exist_ok=True)
    for item in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in"):
        if (REPO / item).exists():
            shutil.copy(REPO / item, src / item)
    # build isolation: pyproject's build requirements (a setuptools that knows PEP 639 licence
    # strings), not whatever setuptools the host happens to have; hsd's own code comes from src
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest / "dist"),
                           str(src)],
                          capture_output=True, text=True)
    wheels = sorted((dest / "dist").glob("hsd-*.whl"))
    if proc.returncode or not wheels:
        raise RuntimeError(f"cannot build hsd's wheel from the checkout:\n{proc.stdout}{proc.stderr}")
    shutil.rmtree(src)
    return wheels[0]


def _source_dirs() -> list[str]:
    """The top-level directories pyproject's package-dir maps packages from."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    tops = {Path(path).parts[0] for path in mapping.values() if path}
    return sorted(top for top in tops if (REPO / top).is_dir()) or ["core", "plugins"]


def _new_run_dir() -> Path:
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted(runs.iterdir())
    for stale in old[: max(0, len(old) - KEEP_RUNS + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    run = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir()
    return run


def qemu_command(image: Image, run_dir: Path, memory_mb: int = 2048, cpus: int = 2) -> list[str]:
    return [
        "qemu-system-x86_64", "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-display", "none", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", "console=ttyS0 quiet panic=-1 loglevel=4",
        "-virtfs", f"local,path={image.root},mount_tag=hostroot,security_model=none,readonly=on",
        "-virtfs", f"local,path={run_dir},mount_tag=hsdrun,security_model=none",
    ]


def run_scenarios(image: Image, scenarios: list[str], echo: bool = True, log_to=sys.stdout) -> RunResult:
    unknown = unknown_scenarios(scenarios)
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; have:\n" + "\n".join(describe_scenarios()))
    if len(set(scenarios)) != len(scenarios):
        raise ValueError("a scenario is listed twice: its results would overwrite each other")
    run_dir = _new_run_dir()
    build_hsd_wheel(run_dir)
    for helper in ("init.sh", "install_wheel.py"):
        shutil.copy(HERE / "guest" / helper, run_dir / helper)
    shutil.copytree(SCENARIOS, run_dir / "scenarios", ignore=shutil.ignore_patterns("__pycache__"))
    if os.environ.get("HSD_VM_BENCH_CYCLES", "").isdigit():  # bench-nfs reads it from the run share
        (run_dir / "bench_cycles").write_text(os.environ["HSD_VM_BENCH_CYCLES"] + "\n")
    limits = {name: scenario_limit(name) for name in scenarios}
    (run_dir / "scenarios.txt").write_text("".join(f"{n} {limits[n]}\n" for n in scenarios))
    timeout = BOOT_ALLOWANCE + sum(limits.values()) + 10 * len(scenarios)

    console_path = run_dir / "console.log"
    started = time.monotonic()
    booted: list[float] = []
    proc = subprocess.Popen(qemu_command(image, run_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        with console_path.open("w") as console:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                console.write(line + "\n")
                console.flush()
                if "HSD-VM-BOOTED" in line and not booted:
                    booted.append(time.monotonic() - started)
                if echo:
                    print(f"vm| {line}", file=log_to, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        lines.append(f"HSD-VM-HOST: qemu killed after {timeout} s")
        print(f"vm: the guest did not finish within {timeout} s; killed", file=log_to)
    reader.join(timeout=5)
    total = time.monotonic() - started
    return RunResult(_verdicts(run_dir, scenarios, lines), run_dir, booted[0] if booted else None, total,
                     "\n".join(lines))


def _verdicts(run_dir: Path, scenarios: list[str], console: list[str]) -> list[Verdict]:
    markers = {}
    for line in console:
        m = re.search(r"HSD-VM-VERDICT (\S+) (\d+) (\d+)ms", line)
        if m:
            markers[m.group(1)] = (int(m.group(2)), int(m.group(3)) / 1000)
    verdicts = []
    for name in scenarios:
        log = run_dir / "results" / f"{name}.log"
        rc_file = run_dir / "results" / f"{name}.rc"
        rc: int | None = None
        seconds: float | None = None
        if rc_file.exists():
            fields = rc_file.read_text().split()
            if fields:
                rc, seconds = int(fields[0]), int(fields[1]) / 1000
        elif name in markers:
            rc, seconds = markers[name]
        verdicts.append(Verdict(name, rc, seconds, log))
    return verdicts
