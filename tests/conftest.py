"""Fixtures shared by this project's own tests (the plugin-author kit is hsd.testing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def cleanup() -> Iterator[list]:
    """Peers, sockets and listeners a test started: stopped or closed afterwards, newest first."""
    items: list = []
    yield items
    for item in reversed(items):
        (item.stop if hasattr(item, "stop") else item.close)()
