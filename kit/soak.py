"""Soak run: thousands of mixed handshake requests through the simulator and the dispatcher.

Why: the one-DONE guarantee and "no leak" only mean something under volume,
with faults interleaved with successes.  Most requests use a fast in-process
backend (so 10,000 fit in CI time); every `real_every`-th request is a real
TLS 1.3 handshake with the OpenSSL backend against an `openssl s_server`.
Lost DONEs (a request that should have been answered but never was) and
duplicated DONEs (the kernel saw more than one) must both be zero; RSS, open
fds and threads are sampled so a leak shows as a slope.

    python3 -m hsd_kit.soak --requests 10000

The same module holds the in-process daemon harness the reliability tests use.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from hsd.errors import PeerRejected
from hsd.hookspecs import BackendInfo, Mode, hookimpl
from hsd.plugins import PluginHost
from hsd.session import Session
from .processes import DaemonProcesses
from .simulator import SimRequest, Simulator
from hsd.wire import RecordSocket

FAST = "fast"
FAST_MODES = frozenset({Mode("client", "unauth"), Mode("server", "x509")})


# ---------------------------------------------------------------- harness


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (consumer's socket, the peer's end)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        server, _ = srv.accept()
    return client, server


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): no TIME_WAIT pile-up over thousands of loopback pairs."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    except OSError:
        pass
    sock.close()


def submit_retrying(submit: Callable[[], SimRequest], timeout: float = 30) -> SimRequest:
    """Consumers retry EAGAIN (the kernel's pending cap) - so does every load generator here."""
    end = time.monotonic() + timeout
    while True:
        try:
            return submit()
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > end:
                raise
            time.sleep(0.002)


# ---------------------------------------------------------------- the fast backend


class FastBackend:
    """A TLS-less backend whose behaviour the request's peer name chooses ("<behaviour>.soak").

    ok: a session at once; reject: PeerRejected; raise: a plugin bug;
    read: read one record from the peer (a peer that closed -> PeerClosed);
    eof: wait until the peer closed, then return a session (kTLS then refuses
    a socket that is no longer ESTABLISHED); late: overstay the deadline (watchdog).
    """

    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def hsd_backend_info(self) -> BackendInfo:
        return BackendInfo(FAST, "1.0", FAST_MODES, description="in-test backend: no TLS")

    @hookimpl
    def hsd_handshake(self, ctx) -> Session | None:
        behaviour = (ctx.peername or "ok.soak").split(".", 1)[0]
        if behaviour == "reject":
            raise PeerRejected("scripted rejection")
        if behaviour == "raise":
            raise RuntimeError("scripted plugin bug")
        if behaviour == "read":
            RecordSocket(ctx.sock, ctx.deadline).read_record()
        if behaviour == "eof":
            select.select([ctx.sock], [], [], ctx.remaining())
        if behaviour == "late":
            self.release.wait(ctx.remaining() + 3.0)
        return Session(cipher="TLS_AES_128_GCM_SHA256", tx_secret=bytearray(os.urandom(32)),
                       rx_secret=bytearray(os.urandom(32)), group="x25519")


# ---------------------------------------------------------------- the soak


# behaviour -> (share of requests in percent, expected DONE status; None = cancelled, no DONE expected)
MIX: dict[str, tuple[float, int | None]] = {
    "ok": (74.0, 0),
    "ready-lost": (4.0, 0),  # its READY is dropped (reported as ENOBUFS): the drain must find it
    "reject": (5.0, errno.EACCES),
    "raise": (5.0, errno.EIO),
    "read": (5.0, errno.ETIMEDOUT),  # the TLS peer closed before sending anything
    "eof": (3.0, errno.EIO),  # kTLS refused: the peer closed before installation
    "cancel": (3.9, None),  # the consumer cancels right after submitting
    "late": (0.1, errno.ETIMEDOUT),  # the plugin overstays: the watchdog answers
}


@dataclass
class SoakResult:
    requests: int = 0
    real_tls: int = 0
    lost: int = 0  # expected a DONE, never got one
    duplicated: int = 0  # the kernel saw more than one DONE
    wrong_status: int = 0
    cancelled: int = 0
    seconds: float = 0.0
    by_kind: Counter = field(default_factory=Counter)
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)  # (done so far, rss KiB, fds, threads)
    problems: list[str] = field(default_factory=list)


class _RealPeer:
    """One long-lived `openssl s_server` that the sampled real handshakes connect to."""

    def __init__(self, directory: str) -> None:
        from .pki import make_pki

        self.pki = make_pki(directory)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-cert", self.pki.server.cert,
             "-key", self.pki.server.key, "-tls1_3", "-rev"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("openssl s_server did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kinds(requests: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    names = list(MIX)
    weights = [MIX[name][0] for name in names]
    for _ in range(requests):
        yield rng.choices(names, weights)[0]


def soak_config_text(pki_dir: str | None) -> str:
    """The daemon's config file: the fast backend by default, OpenSSL for client/x509 (the real sample)."""
    text = "[hsd]\nbackend=fast\nmax_inflight=64\nhandshake_timeout=5000\n[hsd.backends]\nclient.x509=openssl\n"
    if pki_dir:
        text += (f"[authenticate.client]\nx509.truststore={pki_dir}/ca.pem\n"
                 f"x509.certificate={pki_dir}/client.pem\nx509.private_key={pki_dir}/client.key\n")
    return text


def soak_daemon(sim: Simulator, config_path: str, log_path: str, verbose: bool = False,
                wait: bool = False) -> DaemonProcesses:
    """The daemon under soak as its own process: serve() with the fast and OpenSSL backends."""
    return DaemonProcesses(sim, ["hsd_kit.soak", "--serve", "--config", config_path] + ["--verbose"] * verbose,
                           log_path=log_path, wait=wait)


def _serve_for_soak(sim_address: str, config_path: str, verbose: bool) -> int:
    """Child side of soak_daemon: the real serve() loop over a SimChannel."""
    import faulthandler
    import logging
    import signal

    import hsd_openssl

    from hsd import config as config_mod
    from hsd.daemon import serve, setup_logging
    from hsd.sim_channel import SimChannel

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a stuck daemon can be asked where it is
    setup_logging(True, logging.INFO if verbose else logging.CRITICAL, syslog=False)
    config = config_mod.load(config_path)
    host = PluginHost(config)
    host.add(FAST, FastBackend())
    host.add("openssl", hsd_openssl)
    return serve(SimChannel.connect(sim_address), config, backend=None, config_path=config_path, host=host)


def _wait_for_listener(sim: Simulator, daemon: DaemonProcesses, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not sim.listeners():
        if daemon.proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError("the daemon never joined the tlshd group")
        time.sleep(0.02)


def run_soak(requests: int, *, real_every: int = 100, window: int = 32, seed: int = 1, samples: int = 20,
             report: Callable[[str], None] = print) -> SoakResult:
    """Submit `requests` handshakes, at most `window` outstanding, to a daemon process; count what came back."""
    result = SoakResult(requests=requests)
    with tempfile.TemporaryDirectory(prefix="hsd-soak-") as tmp, Simulator() as sim:
        peer = _RealPeer(tmp) if real_every else None
        config_path = os.path.join(tmp, "hsd.conf")
        with open(config_path, "w") as handle:
            handle.write(soak_config_text(tmp if peer else None))
        daemon = soak_daemon(sim, config_path, os.path.join(tmp, "daemon.log"))
        outstanding: list[tuple[str, SimRequest, socket.socket, socket.socket | None]] = []
        every: list[tuple[str, SimRequest]] = []
        sample_every = max(1, requests // samples)
        finished = 0

        def settle(limit: int) -> None:
            nonlocal finished
            while len(outstanding) > limit:
                kind, req, mine, theirs = outstanding.pop(0)
                expected = None if kind == "cancel" else (0 if kind == "real" else MIX[kind][1])
                if expected is None:
                    result.cancelled += 1
                else:
                    try:
                        status, _ = req.wait(30)
                    except TimeoutError:
                        result.lost += 1
                        result.problems.append(f"{kind}: no DONE")
                        status = None
                    if status is not None and status != expected:
                        result.wrong_status += 1
                        result.problems.append(f"{kind}: status {status}, expected {expected}")
                every.append((kind, req))
                abort(mine)
                if theirs is not None:
                    abort(theirs)
                finished += 1
                if finished % sample_every == 0 and daemon.proc.poll() is None:
                    if finished == requests:  # DONE precedes the daemon's close of its fd: let the last ones close
                        settle = time.monotonic() + 5
                        while daemon.sample()[1] > result.samples[0][2] + 2 and time.monotonic() < settle:
                            time.sleep(0.05)
                    result.samples.append((finished, *daemon.sample()))

        try:
            _wait_for_listener(sim, daemon)
            result.samples.append((0, *daemon.sample()))
            started = time.monotonic()
            for index, kind in enumerate(_kinds(requests, seed), 1):
                if peer is not None and index % real_every == 0:
                    kind = "real"
                result.by_kind[kind] += 1
                if kind == "real":
                    mine = socket.create_connection(("127.0.0.1", peer.port), timeout=10)  # type: ignore[union-attr]
                    theirs = None
                    req = submit_retrying(lambda: sim.client_hello_x509(mine, peername="localhost", timeout_ms=10000))
                    result.real_tls += 1
                else:
                    mine, theirs = tcp_pair()
                    if kind in ("read", "eof"):
                        theirs.close()
                        theirs = None
                    if kind == "ready-lost":
                        sim.drop_ready(1)
                    name = f"{kind}.soak"
                    timeout = 300 if kind == "late" else 5000
                    req = submit_retrying(lambda: sim.client_hello_anon(mine, peername=name, timeout_ms=timeout))
                    if kind == "cancel":
                        sim.cancel(mine)
                outstanding.append((kind, req, mine, theirs))
                settle(window)
            settle(0)
            result.seconds = time.monotonic() - started
        finally:
            code = daemon.stop()
            if peer is not None:
                peer.close()
        if code != 0:
            result.problems.append(f"the daemon exited with status {code}")
        for kind, req in every:  # counted after the daemon stopped: a late second DONE would show here
            if req.done_calls > 1:
                result.duplicated += 1
                result.problems.append(f"{kind}: {req.done_calls} DONEs")
    report(format_result(result))
    return result


def format_result(result: SoakResult) -> str:
    lines = [f"soak: {result.requests} requests in {result.seconds:.1f}s "
             f"({result.requests / max(result.seconds, 1e-9):.0f}/s), real TLS {result.real_tls}",
             f"soak: lost DONEs {result.lost}, duplicated DONEs {result.duplicated}, "
             f"wrong status {result.wrong_status}, cancelled {result.cancelled}",
             "soak: mix " + ", ".join(f"{k}={v}" for k, v in sorted(result.by_kind.items())),
             "soak: done      rss(KiB)  fds  threads"]
    lines += [f"soak: {d:>6} {r:>10} {f:>5} {t:>8}" for d, r, f, t in result.samples]
    if len(result.samples) > 2:
        first, last = result.samples[1], result.samples[-1]  # after warm-up: the first sample under load
        lines.append(f"soak: daemon RSS {first[1]} -> {last[1]} KiB, fds {first[2]} -> {last[2]}, "
                     f"threads {first[3]} -> {last[3]}")
    lines += [f"soak: problem: {text}" for text in result.problems[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hsd_kit.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--real-every", type=int, default=100,
                        help="every Nth request is a real TLS handshake (0: none)")
    parser.add_argument("--window", type=int, default=32, help="requests outstanding at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the daemon child
    parser.add_argument("--simulator", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return _serve_for_soak(args.simulator, args.config, args.verbose)
    result = run_soak(args.requests, real_every=args.real_every, window=args.window, seed=args.seed)
    return 1 if result.lost or result.duplicated or result.wrong_status or result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
