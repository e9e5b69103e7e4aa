"""Errors that say what to do: a name mismatch names the wanted name and the certificate's names, in every backend.

A real `openssl s_server` presents the test PKI's localhost certificate; hsd's
client (each backend) is asked to verify it as another name, the way a mount
by the wrong name would.
"""

from __future__ import annotations

import pytest

from hsd.config import Config
from hsd_kit import peers
from hsd_kit.harness import DaemonHarness
from hsd_kit.pki import TestPki

BACKENDS = ["openssl", "tlslite"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted, what", [("nfs.example.org", "hostname"), ("192.0.2.9", "IP address")])
def test_a_name_mismatch_names_the_wanted_name_and_the_certificates_names(hsd_pki: TestPki, backend: str,
                                                                         wanted: str, what: str) -> None:
    config = Config()
    config.client.truststore = hsd_pki.ca
    with DaemonHarness(backend, config) as harness, \
            peers.openssl_server(peers.PeerOptions(cert=hsd_pki.server.cert, key=hsd_pki.server.key)) as server:
        finished = harness.finish(harness.client_hello_anon(server.connect(), peername=wanted))
    reason = finished.outcome.reason
    assert finished.outcome.status == 13, reason
    assert reason == (f"server certificate verify failed: {what} mismatch (wanted {wanted}; the certificate is for "
                      "dns:localhost, ip:127.0.0.1)"), reason
