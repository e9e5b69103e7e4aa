"""Live status (issue 15 point 4): what the running daemon has done, for systemd and for `hsd status`.

Why: "is hsd working?" should not need a log search.  Each finished handshake
(the dispatcher's on_outcome callback) updates counters kept here; a thread
sends a one-line summary to systemd (sd_notify STATUS=, shown by `systemctl
status hsd`) at most once a second when it changed, and answers `hsd status`
on a Unix socket only root can open (the directory 0700, the socket 0600, and
the peer's uid checked with SO_PEERCRED) with a JSON document: counters by
mode, backend and status, in flight, latency percentiles, uptime, the
configuration in force and every configured certificate and CRL with its days
to expiry.  Nothing secret is in it: paths, subjects, counts and times.

With `workers` > 1 the supervising process reports its own share only (each
worker process has its own counters).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable

log = logging.getLogger("hsd")

DEFAULT_SOCKET = "/run/hsd/control"
NOTIFY_INTERVAL = 1.0  # seconds: STATUS= at most this often
LATENCIES = 4096  # the last N handshake durations kept for the percentiles
REASON_WIDTH = 100


def _status_name(status: int) -> str:
    from .protocol import errno_name

    return "ok" if status == 0 else errno_name(status)


class Status:
    """Counters of finished handshakes; record() is called from handshake threads."""

    def __init__(self, inflight: Callable[[], int] = lambda: 0) -> None:
        self.started = time.time()
        self.inflight = inflight
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()  # (mode, backend, status)
        self.served = self.failed = 0
        self.last_failure: tuple[float, str] | None = None  # (time, "server/x509 EACCES: reason")
        self._durations: collections.deque[float] = collections.deque(maxlen=LATENCIES)
        self.duration_sum = 0.0  # seconds, every handshake since start (the metrics file's summary _sum)
        self.changed = threading.Event()

    def record(self, outcome: Any) -> None:  # outcome: hsd.dispatcher.Outcome
        """The dispatcher's on_outcome: must not raise (it runs in the handshake's own thread)."""
        try:
            mode = f"{outcome.request.role}/{outcome.request.auth}"
            name = _status_name(outcome.status)
            with self._lock:
                self.counts[(mode, outcome.backend, name)] += 1
                self._durations.append(outcome.duration)
                self.duration_sum += outcome.duration
                if outcome.status == 0:
                    self.served += 1
                else:
                    self.failed += 1
                    reason = outcome.reason[:REASON_WIDTH] + ("..." if len(outcome.reason) > REASON_WIDTH else "")
                    self.last_failure = (time.time(), f"{mode} {name}" + (f": {reason}" if reason else ""))
            self.changed.set()
        except Exception:  # noqa: BLE001  status is an observer: a bug here must not touch the handshake
            log.debug("status: recording an outcome failed", exc_info=True)

    def summary(self) -> str:
        """The one line systemd shows."""
        with self._lock:
            served, failed, last = self.served, self.failed, self.last_failure
        text = f"served {served}, failed {failed}, in flight {self.inflight()}"
        if last:
            text += f"; last failure {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last[0]))} {last[1]}"
        return text.replace("\n", " ")

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            values = sorted(self._durations)
        if not values:
            return {}

        def at(fraction: float) -> float:
            return round(values[min(len(values) - 1, int(fraction * len(values)))] * 1000, 2)

        return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": round(values[-1] * 1000, 2),
                "samples": len(values)}

    def snapshot(self, cfg: Any) -> dict[str, Any]:
        """The document `hsd status` prints (cfg: the hsd.config.Config in force)."""
        from . import expiry

        with self._lock:
            counts = [{"mode": m, "backend": b, "status": s, "count": n} for (m, b, s), n in sorted(self.counts.items())]
            served, failed, last, duration_sum = self.served, self.failed, self.last_failure, self.duration_sum
        now = datetime.datetime.now(datetime.timezone.utc)
        files = [{"key": item.key, "path": item.path, "what": item.what, "expires": item.when.isoformat(),
                  "days": item.days, "expired": item.error} for item in expiry.scan(cfg, now, every_file=True)]
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
            "served": served, "failed": failed, "in_flight": self.inflight(), "counts": counts,
            "latency": self.percentiles(), "duration_sum_s": round(duration_sum, 6),
            "last_failure": {"time": last[0], "what": last[1]} if last else None,
            "config": {"source": cfg.source, "backend": cfg.backend, "backends": dict(cfg.backends),
                       "max_inflight": cfg.max_inflight, "workers": cfg.workers, "isolation": cfg.isolation,
                       "handshake_timeout_ms": cfg.handshake_timeout_ms,
                       "expiry_warning_days": cfg.expiry_warning_days},
            "files": files,
        }


def notify_loop(status: Status, stop: threading.Event, notify: Callable[[str], None]) -> threading.Thread:
    """STATUS= once at start, then whenever a handshake ended, at most once per NOTIFY_INTERVAL."""

    def run() -> None:
        notify(f"STATUS={status.summary()}")
        while not stop.is_set():
            if status.changed.wait(0.5) and not stop.is_set():  # none after STOPPING=1
                status.changed.clear()
                notify(f"STATUS={status.summary()}")
                stop.wait(NOTIFY_INTERVAL)

    thread = threading.Thread(target=run, name="hsd-status", daemon=True)
    thread.start()
    return thread


class ControlServer:
    """The root-only socket `hsd status` reads: one JSON document per connection."""

    def __init__(self, path: str, document: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.document = document
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(f"{directory} must be owned by uid {os.geteuid()} and closed to group and others "
                                  f"(mode {info.st_mode & 0o777:o})")
        if os.path.exists(path):
            os.unlink(path)  # a previous instance's (hsd serves one queue per network namespace)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="hsd-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                        struct.calcsize("3i")))
                    if uid not in (0, os.geteuid()):
                        conn.sendall(b'{"error": "only root can read hsd\'s status"}\n')
                        continue
                    conn.sendall(json.dumps(self.document()).encode() + b"\n")
                except Exception:  # noqa: BLE001  one bad client must not end the control socket
                    log.debug("control socket: a request failed", exc_info=True)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def query(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """What a running hsd says at path (OSError when it cannot be reached, PermissionError for non-root)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    document = json.loads(b"".join(chunks) or b"{}")
    if "error" in document:
        raise PermissionError(document["error"])
    return document


def render(doc: dict[str, Any]) -> list[str]:
    """`hsd status` as text."""
    uptime = int(doc["uptime_s"])
    out = [f"hsd pid {doc['pid']}, up {uptime // 86400}d {uptime % 86400 // 3600}h {uptime % 3600 // 60}m "
           f"{uptime % 60}s",
           f"served {doc['served']}, failed {doc['failed']}, in flight {doc['in_flight']}"]
    if doc.get("last_failure"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["last_failure"]["time"]))
        out.append(f"last failure: {when} {doc['last_failure']['what']}")
    lat = doc.get("latency") or {}
    if lat:
        out.append(f"latency (last {lat['samples']}): p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms, "
                   f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
    out.append("handshakes by mode, backend and status:")
    for row in doc["counts"] or [{"mode": "-", "backend": "-", "status": "-", "count": 0}]:
        out.append(f"  {row['mode']:14} {row['backend']:10} {row['status']:12} {row['count']}")
    cfg = doc["config"]
    backends = " ".join(f"{mode}={name}" for mode, name in sorted(cfg["backends"].items()))
    out.append(f"config: {cfg['source'] or '(built-in defaults)'}: backend={cfg['backend']}"
               f"{' ' + backends if backends else ''} max_inflight={cfg['max_inflight']} workers={cfg['workers']} "
               f"isolation={cfg['isolation']} handshake_timeout={cfg['handshake_timeout_ms']}ms "
               f"expiry_warning_days={cfg['expiry_warning_days']}")
    out.append("certificates and CRLs:" if doc["files"] else "certificates and CRLs: none configured")
    for item in doc["files"]:
        left = "EXPIRED" if item["expired"] else f"{item['days']} days left"
        out.append(f"  {item['key']} = {item['path']}: {item['what']} until {item['expires'][:16]}Z ({left})")
    return out
