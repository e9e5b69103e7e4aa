"""`hsd bench startup`: how soon after it starts hsd has joined the tlshd group and served a handshake.

Why a benchmark and not a test: start-up time depends on the machine and its
load; a benchmark prints the figures (median of N starts) for
docs/performance.md, the tests assert the order of events instead.

Each run starts the real `hsd` command (the console script the service runs)
against an in-process kernel simulator and a real `openssl s_server`, and
records, from just before the process is spawned:

* joined - the simulator sees the tlshd group joined (from now on requests queue);
* first  - the DONE of a client handshake submitted the moment the group was
  joined, so it waits in the queue while hsd loads (status must be 0);
* ready  - READY=1 on a NOTIFY_SOCKET of ours (systemd's readiness).

The simulator path imports hsd_kit.simulator before its join, which the kernel
path does not (hsd.startup resolves the family with hsd.protocol alone), so its
"joined" is an upper bound of the kernel path's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Start:
    joined: float
    first: float
    ready: float
    status: int
    cpu_joined: float  # seconds of CPU the process had used when the join was seen (all its threads)
    cpu_first: float
    waited_first: float  # seconds its threads spent runnable but waiting for a CPU (the machine's load)


def cpu_of(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting-to-run) seconds of every thread of pid, from /proc/PID/task/*/schedstat (ns)."""
    ran = waited = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                fields = handle.read().split()
        except OSError:
            continue  # the thread ended meanwhile
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def _hsd_command() -> list[str]:
    """The installed console script next to this interpreter (what systemd runs), else -m hsd.cli."""
    script = Path(sys.executable).with_name("hsd")
    if script.exists():
        return [str(script)]
    found = shutil.which("hsd")
    return [found] if found else [sys.executable, "-m", "hsd.cli"]


def one_start(sim, server, config: str, notify_path: str, backend: str, env: dict[str, str]) -> Start:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if os.path.exists(notify_path):
        os.unlink(notify_path)
    notify.bind(notify_path)
    env = {**env, "NOTIFY_SOCKET": notify_path}
    started = time.monotonic()
    proc = subprocess.Popen([*_hsd_command(), "-c", config, "--backend", backend, "--simulator", sim.address],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = started + 30
        while not sim.listeners():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hsd exited or never joined (status {proc.poll()})")
            time.sleep(0.0002)
        joined = time.monotonic()
        cpu_joined, _ = cpu_of(proc.pid)
        sock = server.connect()
        req = sim.client_hello_anon(sock, peername="localhost", timeout_ms=20000)
        status, _ = req.wait(30)
        first = time.monotonic()
        cpu_first, waited_first = cpu_of(proc.pid)
        sock.close()
        notify.settimeout(30)
        while notify.recv(4096) != b"READY=1":
            pass
        ready = time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        notify.close()
    return Start(joined - started, first - started, ready - started, status, cpu_joined, cpu_first, waited_first)


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:6.1f}"


def child_environment(pycache: str | None) -> dict[str, str]:
    """hsd's environment: with pycache, bytecode is written there and reused, as an installed package has it
    (a development checkout under PYTHONDONTWRITEBYTECODE compiles every module at every start)."""
    env = dict(os.environ)
    if pycache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def run(runs: int, backend: str, bytecode_cache: bool = True) -> int:
    from .simulator import Simulator
    from . import peers
    from .pki import make_pki

    with tempfile.TemporaryDirectory(prefix="hsd-startbench-") as tmp, Simulator() as sim:
        pki = make_pki(os.path.join(tmp, "pki"))
        config = os.path.join(tmp, "hsd.conf")
        Path(config).write_text(f"[authenticate.client]\nx509.truststore={pki.ca}\n")
        opts = peers.PeerOptions(cert=pki.server.cert, key=pki.server.key, ca=pki.ca)
        env = child_environment(os.path.join(tmp, "pycache") if bytecode_cache else None)
        starts = []
        for index in range(runs + 1):  # the first start only warms the page cache
            server = peers.openssl_server(opts).start()  # it serves one connection: a fresh one per start
            try:
                start = one_start(sim, server, config, os.path.join(tmp, "notify"), backend, env)
            finally:
                server.stop()
            if index:
                starts.append(start)
    failed = [s.status for s in starts if s.status]
    print(f"hsd start-up, {runs} starts, backend {backend}, against the simulator, bytecode "
          f"{'cached' if bytecode_cache else 'compiled at every start'} (load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs)")
    print("                     median     min     max  (ms after the process was spawned)")
    for name in ("joined", "first", "ready", "cpu_joined", "cpu_first", "waited_first"):
        values = [getattr(s, name) for s in starts]
        print(f"  {name:<16} {_median_ms(values)}  {min(values) * 1000:6.1f}  {max(values) * 1000:6.1f}")
    print("  joined: the tlshd group joined; first: DONE of a handshake queued at the join; ready: READY=1;\n"
          "  cpu_*: CPU hsd had used by then (all threads; the figure load does not inflate); waited_first: time\n"
          "  its threads were runnable but another process had the CPU")
    if failed:
        print(f"hsd bench startup: {len(failed)} first handshake(s) failed: statuses {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hsd bench startup",
                                     description="median time from process start to join, first handshake, ready")
    parser.add_argument("--runs", type=int, default=10, help="starts to measure (default 10)")
    parser.add_argument("--backend", default="openssl", help="the backend the configuration selects")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="compile hsd's modules at every start (a checkout under PYTHONDONTWRITEBYTECODE)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        print("hsd bench startup: --runs must be at least 1", file=sys.stderr)
        return 2
    return run(args.runs, args.backend, bytecode_cache=not args.no_bytecode_cache)


if __name__ == "__main__":
    sys.exit(main())
