"""hsd's test kit: the simulator, real peers and a kTLS record checker, for hsd and for plugin authors.

- hsd_kit.harness: DaemonHarness (simulator + dispatcher + discovered plugins), assert_ktls_roundtrip
- hsd_kit.handshakes: one handshake routed through the plugin host, no dispatcher (plugin_host, run_handshake)
- hsd_kit.matrix: the interop matrix as data (Case, MATRIX, cases_for, run_case)
- hsd_kit.peers: openssl/gnutls peers, scripted broken peers, PSK peers
- hsd_kit.records: a user-space TLS 1.3 record layer keyed by kTLS crypto_info (session_records)
- hsd_kit.pki / keyrings: a throwaway PKI and throwaway kernel keyrings
- hsd_kit.pytest_plugin: the fixtures (hsd_pki, hsd_simulator, hsd_daemon, hsd_keyring, hsd_case)
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DaemonHarness": "harness", "HarnessError": "harness", "assert_ktls_roundtrip": "harness",
    "assert_ktls_pair": "harness", "Case": "matrix", "MATRIX": "matrix", "cases_for": "matrix",
    "run_case": "matrix", "hsd_interop_matrix": "pytest_plugin", "make_pki": "pki",
    "ThrowawayKeyring": "keyrings", "plugin_host": "handshakes", "plugin_manager": "handshakes", "handshake_context": "handshakes",
    "run_handshake": "handshakes", "expect_handshake_error": "handshakes", "session_records": "records",
}


def __getattr__(name: str) -> Any:  # lazy: importing hsd_kit stays cheap
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hsd_kit' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"hsd_kit.{module}"), name)


__all__ = sorted(_EXPORTS)
