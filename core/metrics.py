"""The OpenMetrics text file (issue 15 point 4): hsd's live status for node_exporter's textfile collector.

Why a file and not an HTTP endpoint: the unit allows no IP sockets
(RestrictAddressFamilies=AF_UNIX AF_NETLINK, IPAddressDeny=any), and a host
that runs node_exporter already scrapes every *.prom file in its
``--collector.textfile.directory``.  So, when ``[hsd] metrics_file`` is set,
a thread renders the same snapshot `hsd status` prints (hsd.status) every
``metrics_interval`` seconds, once more at stop, and replaces the file
atomically: written to a temp file in the same directory (node_exporter
ignores names not ending in .prom), then os.replace(), so a scrape sees the
old file or the new one, never half of one.  The file is 0644 (node_exporter
runs as its own user) and holds no secret: counts, times, config paths and
certificate subjects.  A write that fails (directory missing, read-only
file system) is one warning line until a write works again: metrics are an
observer and never stop the daemon.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import threading
from typing import Any, Callable

log = logging.getLogger("hsd")

MODE = 0o644
QUANTILES = (("0.5", "p50_ms"), ("0.9", "p90_ms"), ("0.99", "p99_ms"))


def _label(value: Any) -> str:
    """An OpenMetrics label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{name}="{_label(value)}"' for name, value in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


class _Text:
    """Families in order, each with its TYPE, UNIT and HELP lines before its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, unit: str = "") -> None:
        self.lines.append(f"# TYPE {name} {kind}")
        if unit:
            self.lines.append(f"# UNIT {name} {unit}")
        self.lines.append(f"# HELP {name} {help_text}")

    def sample(self, name: str, value: float, **labels: Any) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_number(value)}")


def render(doc: dict[str, Any]) -> str:
    """The status document (hsd.status.Status.snapshot) as OpenMetrics text, ending with # EOF."""
    out = _Text()
    out.family("hsd_handshakes", "counter", "Handshakes finished since hsd started, by mode (role/auth), "
               "backend and status (ok, or the DONE errno name).")
    for row in doc["counts"]:
        out.sample("hsd_handshakes_total", row["count"], mode=row["mode"], backend=row["backend"],
                   status=row["status"])
    out.family("hsd_handshakes_in_flight", "gauge", "Handshakes accepted and not yet done.")
    out.sample("hsd_handshakes_in_flight", doc["in_flight"])
    latency = doc.get("latency") or {}
    out.family("hsd_handshake_duration_seconds", "summary", "Handshake durations, ACCEPT to DONE; quantiles "
               "over the last handshakes (at most 4096).", unit="seconds")
    for quantile, key in QUANTILES:
        if key in latency:
            out.sample("hsd_handshake_duration_seconds", latency[key] / 1000, quantile=quantile)
    out.sample("hsd_handshake_duration_seconds_count", doc["served"] + doc["failed"])
    out.sample("hsd_handshake_duration_seconds_sum", round(doc.get("duration_sum_s", 0.0), 6))
    out.family("hsd_uptime_seconds", "gauge", "Seconds since this hsd process started.", unit="seconds")
    out.sample("hsd_uptime_seconds", doc["uptime_s"])
    if doc.get("last_failure"):
        out.family("hsd_last_failure_timestamp_seconds", "gauge", "When the last handshake failed "
                   "(Unix time).", unit="seconds")
        out.sample("hsd_last_failure_timestamp_seconds", round(doc["last_failure"]["time"], 3))
    files = _unique(doc.get("files") or [])
    if files:
        out.family("hsd_certificate_expiry_days", "gauge", "Whole days until each configured certificate, "
                   "trust-store CA and CRL (next update) expires; negative once expired.")
        for item in files:
            out.sample("hsd_certificate_expiry_days", item["days"], key=item["key"], path=item["path"],
                       what=item["what"])
        out.family("hsd_certificate_expiry_timestamp_seconds", "gauge", "When each configured certificate, "
                   "trust-store CA and CRL expires or needs its next update (Unix time).", unit="seconds")
        for item in files:
            when = datetime.datetime.fromisoformat(item["expires"]).timestamp()
            out.sample("hsd_certificate_expiry_timestamp_seconds", when, key=item["key"], path=item["path"],
                       what=item["what"])
    out.lines.append("# EOF")
    return "\n".join(out.lines) + "\n"


def _unique(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sample per label set (a bundle holding the same CA twice would repeat one): OpenMetrics forbids twins."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for item in files:
        labels = (item["key"], item["path"], item["what"])
        if labels not in seen:
            seen.add(labels)
            out.append(item)
    return out


def replace_atomically(path: str, text: str) -> None:
    """Write text to path so that a reader sees the old or the new file, never part of one (mode 0644)."""
    directory, name = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), MODE)  # mkstemp makes 0600, the unit's UMask 0077 likewise
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


class MetricsFile:
    """Rewrites [hsd] metrics_file every interval seconds from the hsd-metrics thread, and once more at close()."""

    def __init__(self, path: str, interval: float, document: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.interval = interval
        self.document = document
        self._lock = threading.Lock()  # the thread's write and close()'s final one never interleave
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> bool:
        """One rewrite; False when it failed (warned once until a write works again)."""
        with self._lock:
            try:
                replace_atomically(self.path, render(self.document()))
            except Exception as exc:  # noqa: BLE001  an observer: nothing here may end the daemon
                if not self._failing:
                    self._failing = True
                    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
                    log.warning("cannot write the metrics file %s: %s (retrying every %gs; no further warning "
                                "until it works)", self.path, why, self.interval)
                return False
            if self._failing:
                self._failing = False
                log.info("metrics file %s written again", self.path)
            return True

    def start(self) -> threading.Thread:
        def run() -> None:
            self.write()
            while not self._stop.wait(self.interval):
                self.write()

        self._thread = threading.Thread(target=run, name="hsd-metrics", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """The final write, after the last handshake: the file shows what this process did in all."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.write()
