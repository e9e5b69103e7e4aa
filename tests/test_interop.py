"""The interop matrix: the whole path through the simulated kernel, for both built-in backends.

kernel simulator -> READY -> ACCEPT (fd over SCM_RIGHTS) -> dispatcher ->
backend -> simulated kTLS -> DONE, against real openssl and gnutls peers,
scripted broken peers, and hsd itself on the other backend.  The cases are
data (hsd_kit.matrix), the same list a plugin author runs.
"""

from __future__ import annotations

import pytest

from hsd.hookspecs import ALL_MODES
from hsd_kit import matrix, peers
from hsd_kit.harness import DaemonHarness
from hsd_kit.keyrings import keyrings_usable
from hsd_kit.pki import TestPki

pytestmark = pytest.mark.skipif(not (peers.tool_available("openssl") and peers.tool_available("gnutls-serv")),
                                reason="needs the openssl and gnutls-bin command-line tools")

PARAMS = [pytest.param(backend, case, id=f"{backend}-{case.name}")
          for backend in matrix.BUILTIN_BACKENDS
          for case in matrix.cases_for(backend, ALL_MODES, cross_with=matrix.BUILTIN_BACKENDS)]


@pytest.fixture(scope="module")
def pki(hsd_pki: TestPki) -> TestPki:
    return hsd_pki  # the kit's session-wide test PKI, generated once for all test files


@pytest.fixture(scope="module")
def daemon():
    """One simulator + dispatcher for the module; each case reconfigures it (like SIGHUP would)."""
    with DaemonHarness() as harness:
        yield harness


@pytest.mark.parametrize("backend,case", PARAMS)
def test_matrix(daemon: DaemonHarness, pki: TestPki, backend: str, case: matrix.Case) -> None:
    if case.auth == "psk" and (reason := keyrings_usable()):
        pytest.fail(reason)
    result = matrix.run_case(daemon, case, pki, backend)
    print(result.line())
    assert result.finished.outcome.backend == backend
    if case.status == 0:
        assert result.roundtrip is not None and result.roundtrip.records_sent == 2


def test_matrix_covers_what_the_brief_asks() -> None:
    names = {case.name for case in matrix.MATRIX}
    for tool in matrix.TOOLS:
        assert {f"client-x509-{tool}", f"server-x509-client-cert-{tool}", f"client-psk-{tool}",
                f"server-psk-{tool}"} <= names
        assert sum(n.startswith(f"client-unauth-{tool}-") for n in names) == len(matrix.SUITES)
        assert sum(n.startswith(f"server-x509-{tool}-") and "cert" not in n for n in names) == len(matrix.SUITES)
    assert sum(case.status != 0 for case in matrix.MATRIX) >= 7
    assert {case.remote_auth for case in matrix.MATRIX} == {"", "psk", "sentinel", "cert-keys"}
