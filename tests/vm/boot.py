"""Boot a guest once under systemd, run scenarios inside it, and collect one verdict per scenario.

Why one boot per call: booting costs tens of seconds under emulation while the
scenarios clean up after themselves, so a run lists several.  The guest's
userspace boots twice in that one QEMU process: systemd's first boot installs
hsd's .deb with apt, then `systemctl soft-reboot` boots userspace again so
that systemd itself starts hsd.service and the fstab NFS mount (guest/runner.sh).
Verdicts come back through the per-run 9p share (results/NAME.rc); the console
markers are the fallback when the guest died before it could write them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .deb import Deb
from .image import CACHE, HERE, Image

REPO = HERE.parent.parent
SCENARIOS = HERE / "scenarios"
BOOT_ALLOWANCE = 420  # seconds for two boots, the .deb's install and power-off, on top of the scenario limits
FIRST = ("systemd-boot",)  # reads what the boot itself did: runs before anything else (runner.sh quiesces after)
RUNNER_UNIT = """[Unit]
Description=hsd VM harness: install hsd's .deb, then run the scenarios
After=multi-user.target
RequiresMountsFor=/hsdrun

[Service]
Type=exec
ExecStart=/bin/bash /hsdrun/guest/runner.sh
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
"""
# units that run once after /usr changed (ConditionNeedsUpdate=): every boot of a read-only cached
# root is such a first boot, and under emulation they cost ~25 s of it; masked
FIRST_BOOT_ONLY = ("ldconfig.service", "systemd-journal-catalog-update.service", "systemd-update-done.service",
                   "systemd-hwdb-update.service",
                   # and units with nothing to do in this guest (no fabrics config, no console login,
                   # no pNFS block layouts, no ext4): each costs seconds of emulated CPU per boot
                   "nvmf-autoconnect.service", "getty-static.service", "nfs-blkmap.service", "e2scrub_reap.service")
FSTAB = """# the per-run share (results, scenarios, the .deb) and the tmpfs the NFS server exports
hsdrun /hsdrun 9p trans=virtio,version=9p2000.L,msize=512000 0 0
export /srv/export tmpfs size=512m,mode=0755 0 0
"""
EXPORTS = "/srv/export 127.0.0.0/8(rw,fsid=0,insecure,no_root_squash,no_subtree_check,sync,xprtsec=tls:mtls)\n"
# a short grace period for the loopback server nfs-server.service starts at boot (no clients to reclaim)
NFS_CONF = "[nfsd]\ngrace-time=10\nlease-time=10\nvers3=n\n"
DEFAULT_LIMIT = 600
KEEP_RUNS = 10
PROBE_TIMEOUT = 60
MARKS = ("HSD-VM-BOOTED", "HSD-VM-SOFT-REBOOT ", "HSD-VM-BOOTED")  # first boot, install done, second boot


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
    boot_seconds: float | None  # host start -> systemd's first boot reached the harness's unit
    install_seconds: float | None  # host start -> .deb installed, boot configured (soft-reboot issued)
    reboot_seconds: float | None  # host start -> the second boot reached the harness's unit
    accel: str
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


def _new_run_dir() -> Path:
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted(runs.iterdir())
    for stale in old[: max(0, len(old) - KEEP_RUNS + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    run = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir()
    return run


def write_etc(run_dir: Path) -> None:
    """Files the initramfs copies over the guest's /etc before systemd starts (see initramfs.py)."""
    etc = run_dir / "etc"
    unit_dir = etc / "systemd" / "system"
    (unit_dir / "multi-user.target.wants").mkdir(parents=True)
    (unit_dir / "hsd-vm.service").write_text(RUNNER_UNIT)
    (unit_dir / "multi-user.target.wants" / "hsd-vm.service").symlink_to("/etc/systemd/system/hsd-vm.service")
    (etc / "fstab").write_text(FSTAB)
    (etc / "exports").write_text(EXPORTS)
    (etc / "nfs.conf.d").mkdir()
    (etc / "nfs.conf.d" / "hsd-vm.conf").write_text(NFS_CONF)
    (etc / "hostname").write_text("hsd-vm\n")
    for unit in FIRST_BOOT_ONLY:
        (unit_dir / unit).symlink_to("/dev/null")


def accelerator(image: Image, log_to=sys.stdout) -> str:
    """kvm when it really boots this guest's kernel, tcg otherwise; HSD_VM_ACCEL=kvm|tcg forces one.

    Why a probe: on some hosts /dev/kvm opens but cannot run a stock kernel (the guest dies in its
    decompressor).  The probe boots the kernel and initramfs to the initramfs's first line, once per
    host kernel, QEMU and guest kernel; the answer is cached."""
    wanted = os.environ.get("HSD_VM_ACCEL", "auto")
    if wanted in ("kvm", "tcg"):
        return wanted
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        print("vm: accel tcg (/dev/kvm cannot be opened)", file=log_to)
        return "tcg"
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256(f"{os.uname().release}\0{qemu}\0{image.kernel_release}\0{image.initramfs.name}".encode())
    answer = CACHE / f"accel-{key.hexdigest()[:12]}"
    if not answer.exists():
        cmd = qemu_command(image, None, "kvm", memory_mb=512, cpus=1, append="hsd.probe")
        try:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT).stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
        answer.write_text("kvm\n" if b"HSD-VM-PROBE-OK" in out else "tcg\n")
    accel = answer.read_text().strip()
    print(f"vm: accel {accel} ({'KVM boots the guest kernel' if accel == 'kvm' else '/dev/kvm exists but cannot boot the guest kernel'}; "
          f"probed once, cached in {answer.name})", file=log_to)
    return accel


def qemu_command(image: Image, run_dir: Path | None, accel: str, memory_mb: int = 2048, cpus: int = 2,
                 append: str = "") -> list[str]:
    shares = ["-virtfs", f"local,path={run_dir},mount_tag=hsdrun,security_model=none"] if run_dir else []
    return [
        "qemu-system-x86_64", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none", "-monitor", "none", "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 quiet panic=-1 loglevel=4 systemd.show_status=error {append}".strip(),
        "-virtfs", f"local,path={image.root},mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        *shares,
    ]


def run_scenarios(image: Image, deb: Deb, scenarios: list[str], echo: bool = True, log_to=sys.stdout,
                  accel: str | None = None) -> RunResult:
    unknown = unknown_scenarios(scenarios)
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; have:\n" + "\n".join(describe_scenarios()))
    if len(set(scenarios)) != len(scenarios):
        raise ValueError("a scenario is listed twice: its results would overwrite each other")
    for spec in scenarios[1:]:
        if split_scenario(spec)[0] in FIRST:
            raise ValueError(f"{spec} reads what the boot did: list it first")
    accel = accel or accelerator(image, log_to)
    run_dir = _new_run_dir()
    (run_dir / "deb").mkdir()
    shutil.copy(deb.path, run_dir / "deb" / deb.path.name)
    shutil.copytree(HERE / "guest", run_dir / "guest", ignore=shutil.ignore_patterns("__pycache__"))
    write_etc(run_dir)
    (run_dir / "guest.txt").write_text(f"{image.guest.name} {image.kernel_release} accel={accel}\n")
    shutil.copytree(SCENARIOS, run_dir / "scenarios", ignore=shutil.ignore_patterns("__pycache__"))
    if os.environ.get("HSD_VM_BENCH_CYCLES", "").isdigit():  # bench-nfs reads it from the run share
        (run_dir / "bench_cycles").write_text(os.environ["HSD_VM_BENCH_CYCLES"] + "\n")
    limits = {name: scenario_limit(name) for name in scenarios}
    (run_dir / "scenarios.txt").write_text("".join(f"{n} {limits[n]}\n" for n in scenarios))
    timeout = BOOT_ALLOWANCE + sum(limits.values()) + 10 * len(scenarios)

    console_path = run_dir / "console.log"
    started = time.monotonic()
    booted: list[float] = []
    proc = subprocess.Popen(qemu_command(image, run_dir, accel), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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
                if len(booted) < len(MARKS) and MARKS[len(booted)] in line:
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
    marks = booted + [None] * (3 - len(booted))
    return RunResult(_verdicts(run_dir, scenarios, lines), run_dir, marks[0], marks[1], marks[2], accel, total,
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
