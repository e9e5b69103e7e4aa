"""DaemonProcesses: the real daemon in processes of its own, serving a simulator, read through /proc.

Why processes: their CPU time, RSS, fds and threads are then the daemon's alone, not the
simulator's or the load generator's (the benchmark, the soak, the leak and privilege tests).
The in-process runner is hsd_kit.harness.DaemonHarness; these two are the only ones.
"""

from __future__ import annotations

import os
import socket
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
    every process has joined (start_to_ready is then set) and raises if one exits first.

    notify_socket: a path where this runner plays systemd: it binds a datagram socket there
    (`notify`, for the test to read STATUS= and the like), gives the daemon NOTIFY_SOCKET, and
    wait=True then also waits for READY=1 (the first message).  env and cwd go to the processes."""

    def __init__(self, sim: Any, argv: list[str], *, processes: int = 1, log_path: str | None = None,
                 wait: bool = True, timeout: float = 30, env: dict[str, str] | None = None,
                 cwd: str | None = None, notify_socket: str | None = None) -> None:
        self.sim = sim
        self.log_path = log_path
        self.start_to_ready: float | None = None
        self.notify: socket.socket | None = None
        environment = {**os.environ, **(env or {})}
        if notify_socket is not None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(notify_socket)
            self.notify.settimeout(timeout)
            environment["NOTIFY_SOCKET"] = notify_socket
        started = time.perf_counter()
        before = sim.listeners()
        log: IO[bytes] | int = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.procs = [subprocess.Popen([sys.executable, "-m", *argv, "--simulator", sim.address],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
                                           cwd=cwd)
                          for _ in range(processes)]
        finally:
            if not isinstance(log, int):
                log.close()  # each child has its own copy
        if wait:
            self.wait_joined(before + processes, timeout)
            if self.notify is not None:
                self.wait_notified(b"READY=1")
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
                tail = f": {self.text()[-2000:]}" if self.log_path else ""
                raise RuntimeError(f"hsd {what}{tail}")
            time.sleep(0.001)

    def wait_notified(self, message: bytes) -> None:
        """The next sd_notify datagram must be `message` (raises with the log otherwise)."""
        assert self.notify is not None
        try:
            got = self.notify.recv(4096)
        except OSError as exc:
            got = f"nothing ({exc})".encode()
        if got != message:
            self.stop()
            raise RuntimeError(f"hsd notified {got!r}, expected {message!r}:\n{self.text()}")

    def wait_logged(self, fragment: str, timeout: float = 30) -> None:
        """Until the log holds fragment (e.g. "hsd ready:"); raises with the log if the daemon exits first."""
        end = time.monotonic() + timeout
        while fragment not in self.text():
            if self.proc.poll() is not None or time.monotonic() > end:
                what = "exited" if self.proc.poll() is not None else f"logged no {fragment!r} in {timeout:g} s"
                raise RuntimeError(f"hsd {what}:\n{self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        """The daemon's log so far ("" without a log)."""
        if not self.log_path:
            return ""
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

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
        if self.notify is not None:
            self.notify.close()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
