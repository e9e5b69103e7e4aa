"""DaemonProcesses: the real daemon in processes of its own, serving a simulator, read through /proc.

Why processes: their CPU time, RSS, fds and threads are then the daemon's alone, not the
simulator's or the load generator's (the benchmark, the soak, the leak and privilege tests).
The in-process runner is hsd_kit.harness.DaemonHarness; these two are the only ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


class DaemonProcesses:
    """`python -m ARGV... --simulator SOCK` in `processes` processes, all joining the simulator's group.

    argv names the entry and its options, e.g. ["hsd.cli", "-c", conf, "-s"] (the daemon as
    installed) or a kit child that calls serve() with in-test plugins.  Several processes all
    join the group; each READY reaches all of them and the kernel hands every request to exactly
    one ACCEPT.  stdout and stderr go to log_path (appended) or nowhere.  wait=True returns once
    every process has joined (start_to_ready is then set) and raises if one exits first."""

    def __init__(self, sim: Any, argv: list[str], *, processes: int = 1, log_path: str | None = None,
                 wait: bool = True, timeout: float = 30) -> None:
        self.sim = sim
        self.log_path = log_path
        self.start_to_ready: float | None = None
        started = time.perf_counter()
        before = sim.listeners()
        log: IO[bytes] | int = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.procs = [subprocess.Popen([sys.executable, "-m", *argv, "--simulator", sim.address],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                          for _ in range(processes)]
        finally:
            if not isinstance(log, int):
                log.close()  # each child has its own copy
        if wait:
            self.wait_joined(before + processes, timeout)
            self.start_to_ready = time.perf_counter() - started

    @property
    def proc(self) -> subprocess.Popen:
        """The first (often the only) process."""
        return self.procs[0]

    def wait_joined(self, listeners: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while self.sim.listeners() < listeners:
            if any(proc.poll() is not None for proc in self.procs) or time.monotonic() > end:
                self.stop()
                what = "exited before joining the group" if time.monotonic() <= end else \
                    f"did not join the group in {timeout:g} s"
                tail = f": {open(self.log_path).read()[-2000:]}" if self.log_path else ""
                raise RuntimeError(f"hsd {what}{tail}")
            time.sleep(0.001)

    def _status(self, proc: subprocess.Popen) -> dict[str, str]:
        with open(f"/proc/{proc.pid}/status") as handle:
            return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)

    def cpu(self) -> float:
        """User + system CPU seconds of all processes."""
        total = 0.0
        for proc in self.procs:
            with open(f"/proc/{proc.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def status_mb(self, key: str) -> float:
        """A /proc/PID/status figure (VmRSS, VmHWM) in MiB, summed over the processes."""
        return sum(int(self._status(proc)[key].split()[0]) for proc in self.procs) / 1024

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{proc.pid}/fd")) for proc in self.procs)

    def sample(self) -> tuple[int, int, int]:
        """(RSS KiB, open fds, threads) of the first process."""
        st = self._status(self.proc)
        return int(st["VmRSS"].split()[0]), len(os.listdir(f"/proc/{self.proc.pid}/fd")), int(st["Threads"])

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait (SIGKILL after timeout); the first process's exit status."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
