"""The lowest dependency versions pyproject.toml allows, as a pip constraints file made from its bounds.

Why generated: a hand-kept list drifts from the bounds it is meant to prove.
Every requirement of [project].dependencies and of the extras the tests use
must carry a lower bound (`>=X` or `==X`); the constraint pins it to X.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

EXTRAS = ("tlslite", "test")
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^]]*\])?\s*(.*?)\s*(?:;.*)?$")


class UnboundedRequirement(ValueError):
    """A requirement without a lower bound: its lowest version would be whatever pip finds first."""


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(r for extra in EXTRAS for r in extras.get(extra, []))]


def lowest_constraints(pyproject: Path) -> dict[str, str]:
    """Normalized project name -> its lowest allowed version."""
    pins: dict[str, str] = {}
    for requirement in requirements(pyproject):
        match = REQUIREMENT.match(requirement)
        if not match:
            raise UnboundedRequirement(f"cannot parse requirement {requirement!r}")
        name, spec = re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(2)
        bound = re.search(r"(?:>=|==)\s*([0-9][^,\s]*)", spec)
        if not bound:
            raise UnboundedRequirement(f"{requirement!r} in pyproject.toml has no lower bound (>=X)")
        if name in pins and pins[name] != bound.group(1):
            raise UnboundedRequirement(f"{name} has two lower bounds: {pins[name]} and {bound.group(1)}")
        pins[name] = bound.group(1)
    return pins


def constraints_text(pyproject: Path) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(lowest_constraints(pyproject).items()))
