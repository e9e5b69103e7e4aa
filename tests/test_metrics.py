"""The OpenMetrics text file (issue 15 point 4): [hsd] metrics_file, for node_exporter's textfile collector.

The real daemon against the simulator, a real openssl s_server for a success and a scripted peer that closes
for a failure (tests/test_status.py's), the file read as node_exporter's side would: parsed by
prometheus_client's OpenMetrics parser, which refuses what the format forbids (a counter sample without
_total, a unit that is not the name's suffix, twin label sets, a missing # EOF).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_format_families

from hsd.config import Config
from hsd.metrics import render, replace_atomically
from hsd_kit.pki import TestPki
from hsd_kit.processes import DaemonProcesses
from hsd_kit.simulator import Simulator
from test_status import hsd, one_success_one_failure

WARNING = "cannot write the metrics file"


def parse(text: str) -> dict[str, object]:
    """Family name -> family; the parser raises ValueError on anything that is not valid OpenMetrics."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family) -> dict[tuple, float]:  # type: ignore[no-untyped-def]
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for sample in family.samples}


@contextmanager
def daemon(tmp_path: Path, pki: TestPki, hsd_section: str, cwd: Path | None = None
           ) -> Iterator[tuple[Simulator, Path, subprocess.Popen]]:
    """hsd -s against a fresh simulator until READY=1; SIGTERM at the end must exit 0."""
    config = tmp_path / "hsd.conf"
    config.write_text(f"[authenticate.client]\nx509.truststore={pki.ca}\n[hsd]\nbackend=openssl\n{hsd_section}")
    log = tmp_path / "hsd.log"
    with Simulator() as sim:
        daemon = DaemonProcesses(sim, ["hsd.cli", "-c", str(config), "-s"], log_path=str(log),
                                 cwd=str(cwd) if cwd else None, notify_socket=str(tmp_path / "notify"))
        try:
            yield sim, log, daemon.proc
        finally:
            assert daemon.stop() == 0, log.read_text()


def wait_for(predicate, what: str, log: Path, timeout: float = 15):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text()}"
        time.sleep(0.05)
    return value


def handshakes_in(path: Path) -> float:
    family = parse(path.read_text())["hsd_handshakes"]
    return sum(sample.value for sample in family.samples)


def test_the_file_counts_what_happened_and_parses_as_openmetrics(tmp_path: Path, hsd_pki: TestPki) -> None:
    metrics = tmp_path / "textfile" / "hsd.prom"
    metrics.parent.mkdir()
    with daemon(tmp_path, hsd_pki, f"metrics_file={metrics}\nmetrics_interval=1\n") as (sim, log, _proc):
        wait_for(metrics.exists, "no metrics file after READY=1", log)
        first = metrics.stat().st_ino
        one_success_one_failure(sim, hsd_pki)
        wait_for(lambda: metrics.exists() and handshakes_in(metrics) == 2, "the file never counted 2", log)
        text = metrics.read_text()
        assert metrics.stat().st_ino != first, "rewritten in place, not replaced"
        assert stat.S_IMODE(metrics.stat().st_mode) == 0o644
        assert sorted(os.listdir(metrics.parent)) == ["hsd.prom"], "a temp file was left behind"
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    families = parse(text)
    counts = samples(families["hsd_handshakes"])
    ok = ("hsd_handshakes_total", (("backend", "openssl"), ("mode", "client/unauth"), ("status", "ok")))
    assert counts.pop(ok) == 1, counts
    [(failed_key, failed)] = counts.items()
    assert failed == 1 and dict(failed_key[1])["status"] not in ("ok", "") and dict(failed_key[1])["mode"] == \
        "client/unauth", counts
    assert families["hsd_handshakes"].type == "counter"
    assert samples(families["hsd_handshakes_in_flight"]) == {("hsd_handshakes_in_flight", ()): 0}
    duration = families["hsd_handshake_duration_seconds"]
    assert duration.type == "summary" and duration.unit == "seconds"
    by_name = samples(duration)
    assert by_name[("hsd_handshake_duration_seconds_count", ())] == 2
    quantiles = [by_name[("hsd_handshake_duration_seconds", (("quantile", q),))] for q in ("0.5", "0.9", "0.99")]
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2] < 20, quantiles
    assert quantiles[0] <= by_name[("hsd_handshake_duration_seconds_sum", ())] < 40
    [uptime] = families["hsd_uptime_seconds"].samples
    assert 0 < uptime.value < 120
    [last_failure] = families["hsd_last_failure_timestamp_seconds"].samples
    assert time.time() - 120 < last_failure.value <= time.time()
    [days] = families["hsd_certificate_expiry_days"].samples
    assert days.labels["key"] == "[authenticate.client] x509.truststore" and days.labels["path"] == hsd_pki.ca
    assert days.labels["what"].startswith("CA ") and 0 < days.value < 3650
    [when] = families["hsd_certificate_expiry_timestamp_seconds"].samples
    assert abs(when.value - (time.time() + days.value * 86400)) <= 86400
    secret = Path(hsd_pki.server.key).read_text().splitlines()[1]
    assert secret not in text
    # node_exporter's textfile collector parses the Prometheus text format: it must read every sample alike
    every = {key: value for family in families.values() for key, value in samples(family).items()}
    assert {key: value for family in text_format_families(text) for key, value in samples(family).items()} == every


def test_a_final_write_at_stop_counts_every_handshake(tmp_path: Path, hsd_pki: TestPki) -> None:
    metrics = tmp_path / "hsd.prom"
    with daemon(tmp_path, hsd_pki, f"metrics_file={metrics}\nmetrics_interval=86400\n") as (sim, log, proc):
        wait_for(metrics.exists, "no metrics file after READY=1", log)
        assert handshakes_in(metrics) == 0
        one_success_one_failure(sim, hsd_pki)
        time.sleep(1.5)
        assert handshakes_in(metrics) == 0, "rewritten before its interval"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert handshakes_in(metrics) == 2
    assert samples(parse(metrics.read_text())["hsd_handshake_duration_seconds"])[
        ("hsd_handshake_duration_seconds_count", ())] == 2


def test_a_failing_write_warns_once_until_it_works_again(tmp_path: Path, hsd_pki: TestPki) -> None:
    textfile = tmp_path / "textfile"
    metrics = textfile / "hsd.prom"
    with daemon(tmp_path, hsd_pki, f"metrics_file={metrics}\nmetrics_interval=1\n") as (sim, log, _proc):
        time.sleep(3.5)  # four attempts, one warning
        assert log.read_text().count(WARNING) == 1, log.read_text()
        assert f"{WARNING} {metrics}: No such file or directory" in log.read_text()
        assert f"the directory {textfile} does not exist" in log.read_text()  # hsd check's warning, at start
        one_success_one_failure(sim, hsd_pki)  # still serving
        textfile.mkdir(mode=0o755)
        wait_for(metrics.exists, "no file once the directory exists", log)
        wait_for(lambda: f"metrics file {metrics} written again" in log.read_text(), "no recovery line", log)
        assert handshakes_in(metrics) == 2
        metrics.unlink()
        textfile.chmod(0o555)  # read-only to hsd, root without CAP_DAC_OVERRIDE
        try:
            wait_for(lambda: log.read_text().count(WARNING) == 2, "no warning for the read-only directory", log)
            time.sleep(2.5)
            assert log.read_text().count(WARNING) == 2, log.read_text()
            assert f"{WARNING} {metrics}: Permission denied" in log.read_text()
            assert not metrics.exists() and os.listdir(textfile) == []
        finally:
            textfile.chmod(0o755)
    assert "Traceback" not in log.read_text()


def test_off_by_default(tmp_path: Path, hsd_pki: TestPki) -> None:
    assert Config().metrics_file is None
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = set(tmp_path.rglob("*"))
    with daemon(tmp_path, hsd_pki, "", cwd=cwd) as (sim, log, _proc):
        one_success_one_failure(sim, hsd_pki)
        time.sleep(1)
    written = {path.name for path in set(tmp_path.rglob("*")) - before}
    assert written == {"hsd.conf", "notify", "hsd.log"}, written
    assert "metrics" not in log.read_text()
    result = hsd("check", "-c", str(tmp_path / "hsd.conf"))
    assert " metrics_file=none metrics_interval=15s " in result.stdout, result.stdout


def test_check_reports_the_settings_and_refuses_bad_values_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "hsd.conf"
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    config.write_text(f"[hsd]\nmetrics_file={textfile}/hsd.prom\nmetrics_interval=30\n")
    result = hsd("check", "-c", str(config))
    assert f" metrics_file={textfile}/hsd.prom metrics_interval=30s " in result.stdout, result.stdout
    assert "metrics_file" not in result.stderr, result.stderr
    for line, expected in (("metrics_interval=0", "0 is outside 1..86400"),
                           ("metrics_interval=86401", "86401 is outside 1..86400"),
                           ("metrics_interval=soon", "'soon' is not an integer"),
                           ("metrics_file=hsd.prom", "metrics_file must be an absolute path or 'none', got 'hsd.prom'")):
        config.write_text(f"[hsd]\nbackend=openssl\n{line}\n")
        result = hsd("check", "-c", str(config))
        assert result.returncode == 2 and result.stderr.strip() == f"hsd: {config}:3: {expected}", result.stderr
    config.write_text(f"[hsd]\nmetrics_file={tmp_path}/gone/hsd.prom\n")
    result = hsd("check", "-c", str(config))
    assert f"hsd: warning: [hsd] metrics_file = {tmp_path}/gone/hsd.prom: the directory {tmp_path}/gone does not " \
           "exist" in result.stderr, result.stderr
    assert result.returncode == 0 and hsd("check", "--strict", "-c", str(config)).returncode == 2
    config.write_text(f"[hsd]\nmetrics_file={textfile}/hsd.txt\n")
    assert "reads only files whose names end in .prom" in hsd("check", "-c", str(config)).stderr


def test_label_values_are_escaped_so_they_parse_back(tmp_path: Path) -> None:
    path = '/etc/odd "quoted"\\dir\nnext/ca.pem'
    doc = {"counts": [{"mode": "server/x509", "backend": "openssl", "status": "EACCES", "count": 3}],
           "in_flight": 1, "served": 0, "failed": 3, "latency": {}, "uptime_s": 2.5, "last_failure": None,
           "files": [{"key": "[authenticate.server] x509.truststore", "path": path, "what": "CA CN=x",
                      "expires": "2030-01-01T00:00:00+00:00", "days": 1000, "expired": False}] * 2}
    families = parse(render(doc))
    [sample] = families["hsd_certificate_expiry_days"].samples  # the twin is dropped, not repeated
    assert sample.labels["path"] == path
    assert samples(families["hsd_handshake_duration_seconds"]) == {
        ("hsd_handshake_duration_seconds_count", ()): 3, ("hsd_handshake_duration_seconds_sum", ()): 0}
    [when] = families["hsd_certificate_expiry_timestamp_seconds"].samples
    assert when.value == 1893456000


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_part(tmp_path: Path) -> None:
    """Adversary: a reader that opens and reads the file as fast as it can while it is replaced 200 times."""
    target = tmp_path / "hsd.prom"
    versions = ["a" * 2_000_000 + "\n# EOF\n", "b" * 3_000_000 + "\n# EOF\n"]
    replace_atomically(str(target), versions[0])
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            text = target.read_text()
            if text not in versions:
                seen.append(f"{len(text)} bytes, starting {text[:1]!r}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(200):
            replace_atomically(str(target), versions[n % 2])
    finally:
        done.set()
        reader.join()
    assert not seen, seen[:5]
    assert sorted(os.listdir(tmp_path)) == ["hsd.prom"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
