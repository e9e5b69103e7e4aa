"""`hsd demo`: watch hsd serve simulated kernel requests against real openssl and gnutls peers.

Starts the kernel simulator and the dispatcher with the installed plugins
(cfg.backend and [hsd.backends] honoured), runs a short list of interop-matrix
scenarios, and prints one line per handshake: role, auth mode, backend, suite,
group, duration, status and what the kTLS data exchange proved.  Exit 0 only
if every scenario did what it should (the failure scenario must fail).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time

from hsd.config import Config
from hsd.hookspecs import Mode

SCENARIOS = (
    "client-unauth-openssl-aes-128-gcm-sha256",  # client unauth vs openssl s_server
    "client-x509-gnutls",  # client x509 (mutual) vs gnutls-serv
    "server-x509-no-tickets-on-wire",  # server x509 vs openssl s_client, no ticket on the wire
    "client-psk-openssl",  # PSK from a kernel keyring vs openssl s_server
    "server-psk-gnutls",  # PSK server vs gnutls-cli
    "fail-client-untrusted-ca",  # must fail: EACCES
)
TOOLS = ("openssl", "gnutls-serv", "gnutls-cli")


def run_demo(cfg: Config, rounds: int = 1) -> int:
    from . import matrix, peers
    from .harness import DaemonHarness, HarnessError
    from .keyrings import keyrings_usable
    from .pki import make_pki

    missing = [tool for tool in TOOLS if not peers.tool_available(tool)]
    if missing:
        print(f"hsd demo: missing peer tools: {', '.join(missing)} (install openssl and gnutls-bin)",
              file=sys.stderr)
        return 1
    logging.getLogger("hsd").setLevel(logging.DEBUG if cfg.loglevel > 0 else logging.CRITICAL)
    keyring_problem = keyrings_usable()
    by_name = {case.name: case for case in matrix.MATRIX}
    failures = 0
    ran = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hsd-demo-") as directory, DaemonHarness(cfg.backend, cfg) as harness:
        pki = make_pki(directory)
        assert harness.host is not None
        for problem in harness.host.problems:
            print(f"note: plugin {problem.name} skipped: {problem.reason}")
        print(f"hsd demo: simulated kernel + dispatcher, default backend {cfg.backend}; "
              f"peers: openssl s_server/s_client, gnutls-serv/gnutls-cli")
        for round_no in range(1, rounds + 1):
            for name in SCENARIOS:
                case = by_name[name]
                try:
                    backend = harness.host.backend_for(Mode(case.role, case.auth))
                except Exception as exc:
                    print(f"{case.role:6} {case.auth:6} skipped: {exc}  [{name}]")
                    continue
                if case.auth == "psk" and keyring_problem:
                    print(f"{case.role:6} {case.auth:6} skipped: {keyring_problem}  [{name}]")
                    continue
                ran += 1
                try:
                    result = matrix.run_case(harness, case, pki, backend, base_config=cfg)
                except (HarnessError, peers.PeerError, OSError, TimeoutError) as exc:
                    failures += 1
                    print(f"{case.role:6} {case.auth:6} backend={backend:10} FAILED: {exc}  [{name}]")
                    continue
                print(result.line())
    verdict = "all scenarios behaved as expected" if failures == 0 and ran else f"{failures} of {ran} scenarios FAILED"
    print(f"hsd demo: {ran} handshakes in {time.monotonic() - started:.1f} s: {verdict}")
    return 0 if failures == 0 and ran else 1
