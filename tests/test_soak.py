"""Soak (CI variant): 10,000 mixed requests through the simulator to a daemon process.

The mix is hsd_kit.soak.MIX (successes, lost READYs, rejections, plugin bugs,
peers that closed, kTLS refusals, consumer cancels, watchdog timeouts) on a
fast in-test backend, plus one real TLS 1.3 handshake (OpenSSL backend against
`openssl s_server`) every 100 requests.  Lost and duplicated DONEs must be 0;
the daemon's fds must come back to where they started and its RSS must not
keep growing.  Figures are printed (-s) and recorded in docs/reliability.md.
"""

from __future__ import annotations

from hsd_kit.soak import run_soak

REQUESTS = 10_000
RSS_GROWTH_LIMIT_KIB = 16 * 1024  # after warm-up; a per-request leak of ~2 KiB would already exceed it


def test_soak_ten_thousand_mixed_requests() -> None:
    lines: list[str] = []
    result = run_soak(REQUESTS, real_every=100, window=32, report=lines.append)
    text = "\n".join(lines)
    print("\n" + text)
    checks = {
        "lost DONEs": result.lost == 0,
        "duplicated DONEs": result.duplicated == 0,
        "wrong status": result.wrong_status == 0,
        "problems": not result.problems,
        "real TLS handshakes": result.real_tls == REQUESTS // 100,
        "requests by kind add up": sum(result.by_kind.values()) == REQUESTS,
        "every kind ran": {"ok", "reject", "raise", "read", "eof", "cancel", "ready-lost", "real"} <= set(result.by_kind),
    }
    start, warm, last = result.samples[0], result.samples[1], result.samples[-1]
    checks["the last sample is at the end"] = last[0] == REQUESTS
    checks[f"daemon fds {start[2]} before, {last[2]} after"] = last[2] <= start[2] + 2
    checks[f"daemon RSS grew {last[1] - warm[1]} KiB after warm-up"] = last[1] - warm[1] < RSS_GROWTH_LIMIT_KIB
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"{failed}; the soak's report:\n{text}"
