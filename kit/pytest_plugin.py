"""pytest entry point of hsd's test kit (entry point ``pytest11: hsd``): fixtures for plugin authors.

Fixtures: ``hsd_pki`` (a throwaway test PKI, once per session), ``hsd_simulator``
(the kernel stand-in), ``hsd_keyring`` (a throwaway kernel keyring),
``hsd_daemon`` (simulator + dispatcher with the discovered plugins; backend from
indirect parametrization, else ``--hsd-backend``, else openssl) and
``hsd_run_case`` (runs one interop-matrix case on ``hsd_daemon``).

A test function that takes ``hsd_case`` is parametrized with the interop
matrix for the selected backend's modes, so a plugin's whole interop suite is::

    def test_interop(hsd_case, hsd_run_case):
        hsd_run_case(hsd_case)

run as ``pytest --hsd-backend mybackend``.  The plugin is inert until a test uses one of
its fixtures: pytest loads it in every run of an environment where hsd is installed, so
loading it imports nothing of hsd and touches no keyring (only ``--hsd-backend`` and the
``hsd_backend`` marker are registered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

if TYPE_CHECKING:
    from .harness import DaemonHarness
    from .keyrings import ThrowawayKeyring
    from .matrix import Case, CaseResult
    from .pki import TestPki

DEFAULT_BACKEND = "openssl"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hsd", "hsd test kit")
    group.addoption("--hsd-backend", metavar="NAME", default=None,
                    help="backend the hsd_daemon fixture and the hsd_case matrix use (default: openssl)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "hsd_backend(name): the backend hsd_case/hsd_daemon use in this test")


def _process_keyring() -> None:
    """The process keyring lives in each thread's credentials: a fixture creates it in the test's
    thread before it starts any (simulator, dispatcher), so they all share the one the kernel
    links request keyrings into - as hsd's daemon does."""
    from .harness import ensure_process_keyring

    ensure_process_keyring()


def _selected_backend(config: pytest.Config, node: Any = None) -> str:
    marker = node.get_closest_marker("hsd_backend") if node is not None else None
    if marker is not None and marker.args:
        return str(marker.args[0])
    return config.getoption("--hsd-backend") or DEFAULT_BACKEND


def hsd_interop_matrix(backend: str, *, cross_with: tuple[str, ...] = ("openssl",)) -> list[Any]:
    """The interop matrix for an installed backend's modes, as pytest params (ids = case names)."""
    from hsd.config import Config
    from hsd.plugins import PluginHost

    from .matrix import cases_for

    host = PluginHost.discover(Config(backend=backend))
    info = host.backends().get(backend)
    if info is None:
        problems = "; ".join(f"{p.name}: {p.reason}" for p in host.problems) or "none"
        raise pytest.UsageError(f"hsd backend {backend!r} is not installed (installed: "
                                f"{', '.join(host.backends()) or 'none'}; plugin problems: {problems})")
    cases = cases_for(backend, info.modes, cross_with=cross_with, suites=info.extra.get("tls13_suites"))
    return [pytest.param(case, id=case.name) for case in cases]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hsd_case" in metafunc.fixturenames:
        backend = _selected_backend(metafunc.config, metafunc.definition)
        metafunc.parametrize("hsd_case", hsd_interop_matrix(backend))


@pytest.fixture(scope="session")
def hsd_pki(tmp_path_factory: pytest.TempPathFactory) -> "TestPki":
    """CA, server/client certificates and the bad ones (expired, untrusted, revoked) - test-only keys."""
    from .pki import make_pki

    return make_pki(str(tmp_path_factory.mktemp("hsd-pki")))


@pytest.fixture
def hsd_simulator() -> Iterator[Any]:
    """The kernel's handshake family and kTLS, simulated (hsd_kit.simulator.Simulator, started)."""
    from .simulator import Simulator

    _process_keyring()
    with Simulator() as sim:
        yield sim


@pytest.fixture
def hsd_keyring() -> Iterator["ThrowawayKeyring"]:
    """A fresh kernel keyring possessed by this process; invalidated afterwards."""
    from .keyrings import ThrowawayKeyring, keyrings_usable

    reason = keyrings_usable()
    if reason:
        pytest.fail(reason)
    _process_keyring()
    with ThrowawayKeyring() as ring:
        yield ring


@pytest.fixture
def hsd_backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: indirect parametrization, else @pytest.mark.hsd_backend, else --hsd-backend."""
    return getattr(request, "param", None) or _selected_backend(request.config, request.node)


@pytest.fixture
def hsd_daemon(request: pytest.FixtureRequest, hsd_backend: str) -> Iterator["DaemonHarness"]:
    """hsd as the daemon runs it (discovered plugins, real dispatcher) on a simulated kernel.

    Parametrize indirectly to pick the backend: ``@pytest.mark.parametrize("hsd_daemon", ["tlslite"], indirect=True)``."""
    from .harness import DaemonHarness

    backend = getattr(request, "param", None) or hsd_backend
    with DaemonHarness(backend=backend) as harness:
        yield harness


@pytest.fixture
def hsd_run_case(hsd_daemon: "DaemonHarness", hsd_pki: "TestPki") -> Callable[["Case"], "CaseResult"]:
    """Run one interop-matrix case on hsd_daemon; raises (fails the test) on any miss."""
    from .matrix import run_case

    def run(case: "Case") -> "CaseResult":
        result = run_case(hsd_daemon, case, hsd_pki, hsd_daemon.config.backend)
        print(result.line())
        return result

    return run
