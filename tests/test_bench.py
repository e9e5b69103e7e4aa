"""`hsd bench` smoke runs: real handshakes through the simulator, correctness only, never timings.

The figures themselves are for people (docs/performance.md); what a test can
hold the benchmark to is that every measured handshake really succeeded, that
the report is printed, and that nothing is leaked in the daemon or here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hsd_kit import bench


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_quick_bench_from_the_command_line(tmp_path):
    out_json = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, "-m", "hsd.cli", "bench", "--quick", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for heading in ("Throughput", "Latency", "Resources", "Pipeline floor", "Targets"):
        assert heading in run.stdout
    for workload in bench.WORKLOADS:
        assert workload in run.stdout
    figures = json.loads(out_json.read_text())
    rows = figures["rows"]
    assert {row["label"].split()[0] for row in rows} == set(bench.WORKLOADS)
    for row in rows:
        assert not row["not_possible"], row["label"]
        runs = list(row["hsd"].values()) + list(row["bare"].values()) + [row["burst"]]
        for figures_of_run in runs:
            assert figures_of_run["ok"] == figures_of_run["count"] > 0, row["label"]
            assert set(figures_of_run["statuses"]) == {"0"}, row["label"]
        assert row["hsd"]["1"]["p50"] > 0
        before, after = row["fds"]
        assert after <= before, f"{row['label']}: the daemon holds {after - before} more fds after the runs"
        if not row["label"].startswith("client-psk"):  # openssl s_server (the PSK peer) does not report it
            assert row["negotiated"] == "x25519", row["label"]
    assert all(f["rate"] > 0 for f in figures["floor"].values())
    # the floor's split: the same exchanges with no dispatcher, at every concurrency the floor ran
    assert set(figures["bare_floor"]) == set(figures["floor"])
    assert all(f["rate"] > 0 for f in figures["bare_floor"].values())
    assert "no dispatcher" in run.stdout


def test_hybrid_group_is_really_negotiated_and_nothing_leaks_here():
    plan = bench.Plan(workloads=("client-unauth", "server-x509"), key_types=("p256",), groups=("hybrid",),
                      counts={1: 3}, burst=5, c_seconds=1, tlslite_count=0, silent=0, max_inflight=4, models=False)
    before = open_fds()
    results = bench.run_bench(plan)
    assert open_fds() <= before
    if not bench.openssl_has_mlkem():  # cryptography 43's wheel (OpenSSL 3.3): said so, not measured
        reason = "n/a: the OpenSSL cryptography uses lacks ML-KEM (3.5+)"
        assert [row.not_possible for row in results.rows] == [reason, reason]
        return
    assert bench.all_handshakes_ok(results)
    assert [row.negotiated for row in results.rows] == ["X25519MLKEM768", "X25519MLKEM768"]
    assert all(row.c_limit is None and "ML-KEM" in row.c_note for row in results.rows)
    text = bench.report(results, plan)
    assert "n/a (CLI lacks ML-KEM)" in text


def test_impossible_combinations_are_listed_not_dropped():
    plan = bench.Plan(workloads=("client-psk",), key_types=("p256", "rsa"), groups=("x25519", "hybrid"),
                      counts={1: 2}, burst=0, c_seconds=1, tlslite_count=0, silent=0, models=False)

    def measure(workload: str, key_type: str, group: str) -> bench.Row:
        return bench.measure_row(None, None, plan, workload, key_type, group, lambda _: None)  # type: ignore[arg-type]

    rsa = measure("client-psk", "rsa", "x25519")
    hybrid = measure("client-psk", "p256", "hybrid")
    assert "no certificate" in rsa.not_possible and "ML-KEM" in hybrid.not_possible
    text = bench.report(bench.Results(rows=[rsa, hybrid]), plan)
    assert rsa.not_possible in text and hybrid.not_possible in text
