"""Fixtures shared by this project's own tests (the plugin-author kit is hsd_kit)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """This suite's tests start simulators and dispatchers themselves: the process keyring is
    made now, in the main thread before any other, so all of them share it (see
    hsd_kit.harness.ensure_process_keyring)."""
    from hsd_kit.harness import ensure_process_keyring

    ensure_process_keyring()


@pytest.fixture
def cleanup() -> Iterator[list]:
    """Peers, sockets and listeners a test started: stopped or closed afterwards, newest first."""
    items: list = []
    yield items
    for item in reversed(items):
        (item.stop if hasattr(item, "stop") else item.close)()


# ---------------------------------------------------------------- figures in the CI log
#
# Tests that measure or prove something print it (interop lines with the verified kTLS
# exchange, soak and isolation figures, the VM verdicts with the hsd/tlshd figures).
# pytest hides a passing test's output; this gathers it into one section at the end of
# the run, so the CI log carries the evidence without pytest's per-test headers.

_printed: dict[str, list[tuple[str, str]]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.passed or report.when not in ("setup", "call"):
        return
    # only this phase's own output (a call report repeats what its setup printed)
    text = "".join(body for title, body in report.sections if title == f"Captured stdout {report.when}")
    if text.strip():
        where, _, name = report.nodeid.partition("::")
        _printed.setdefault(where, []).append((name, text.strip("\n")))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _printed:
        return
    terminalreporter.section("figures printed by the tests")
    for where, entries in _printed.items():
        terminalreporter.write_line(where)
        for name, text in entries:
            lines = text.splitlines()
            if len(lines) == 1:
                terminalreporter.write_line(f"  {name}: {lines[0].strip()}")
                continue
            terminalreporter.write_line(f"  {name}:")
            for line in lines:
                terminalreporter.write_line(f"    {line}")
