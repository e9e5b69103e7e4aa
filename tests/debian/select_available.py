"""pytest plugin (`-p tests.debian.select_available`): deselect the tests whose optional library is missing.

Why: Debian has no tlslite-ng, and trixie's cryptography (43) has no ML-DSA.
hsd must run without them, and the rest of the suite must still run there.
A test that needs a missing library is deselected - never run and never
counted as passed - and the run says how many and why.  Whether a library is
missing is decided by importing it, here, at the start of the run; which tests
need it is read from their code (ast): a module that imports it (or an hsd
module built on it, or a test module that does) at top level, or a test whose parameters, names or
command-line arguments name the tlslite backend; a test that needs it less
visibly (a config file selecting it) says so: `@pytest.mark.needs("tlslite")`.

`--only-needing tlslite` is the complement, once the library is installed:
only the tests a run without it left out.  The Debian roots run the suite
once on Debian's libraries alone, then just those tests after
`pip install tlslite-ng`, so every test runs once per root.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Optional:
    name: str  # what is missing, for the report
    probe: str  # importing this tells whether it is there
    modules: frozenset[str]  # a test module importing one of these at top level needs it
    backend: str | None = None  # a test naming this backend needs it
    reason: str = ""  # why the probe failed ("" = available)
    modules_ignored: dict[str, int] = field(default_factory=dict)  # test module -> its test functions
    items: list[str] = field(default_factory=list)


OPTIONALS = (
    Optional("tlslite-ng", "tlslite", frozenset({"tlslite", "hsd_tlslite"}), backend="tlslite"),
    Optional("ML-DSA in cryptography (47+)", "cryptography.hazmat.primitives.asymmetric.mldsa",
             frozenset({"cryptography.hazmat.primitives.asymmetric.mldsa", "hsd_kit.pki_pq"})),
)


def _probe(optional: Optional) -> None:
    try:
        importlib.import_module(optional.probe)
    except ImportError as exc:
        optional.reason = f"{type(exc).__name__}: {exc}"


def _top_level_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _needs(imported: set[str], modules: frozenset[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for name in imported for m in modules)


def _names_backend(function: object, backend: str) -> bool:
    """The test's own code uses the backend: a name containing it, or the bare word in a list/set/call."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    definition = tree.body[0] if tree.body else None
    if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        definition.decorator_list = []  # markers and other parameters are judged per item, not from the source
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and backend in node.id:
            return True
        if isinstance(node, ast.Attribute) and backend in node.attr:
            return True
        if isinstance(node, (ast.List, ast.Set, ast.Call)):
            values = node.elts if not isinstance(node, ast.Call) else [*node.args, *(k.value for k in node.keywords)]
            if any(isinstance(v, ast.Constant) and v.value == backend for v in values):
                return True
    return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--only-needing", metavar="PROBE", default=None,
                     help="run only the tests that need this optional library (its import name, e.g. tlslite): "
                          "the ones a run without it deselected")


def _only(config: pytest.Config) -> Optional | None:
    probe = config.getoption("--only-needing")
    if probe is None:
        return None
    for optional in OPTIONALS:
        if optional.probe == probe:
            return optional
    raise pytest.UsageError(f"--only-needing: no optional library {probe!r} (known: "
                            f"{', '.join(o.probe for o in OPTIONALS)})")


def pytest_configure(config: pytest.Config) -> None:
    for optional in OPTIONALS:
        _probe(optional)
    only = _only(config)
    if only is not None and only.reason:
        raise pytest.UsageError(f"--only-needing {only.probe}: it is not available ({only.reason})")


def _module_needs(path: Path, optional: Optional, seen: frozenset[Path] = frozenset()) -> bool:
    """path imports the library at top level, itself or through a sibling test module it imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = _top_level_imports(tree)
    if _needs(imported, optional.modules):
        return True
    siblings = (path.parent / f"{name}.py" for name in imported if "." not in name)
    return any(_module_needs(s, optional, seen | {path}) for s in siblings if s.is_file() and s not in seen)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    for optional in (o for o in OPTIONALS if o.reason):
        if _module_needs(collection_path, optional):
            tree = ast.parse(collection_path.read_text(encoding="utf-8"))
            tests = sum(1 for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and n.name.startswith("test_"))
            optional.modules_ignored[collection_path.name] = tests
            return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    only = _only(config)
    if only is not None:
        _keep_only_needing(config, items, only)
    missing = [o for o in OPTIONALS if o.reason]
    keep, drop = [], []
    for item in items:
        owner = next((o for o in missing if _item_needs(item, o)), None)
        if owner is None:
            keep.append(item)
        else:
            owner.items.append(item.nodeid)
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _keep_only_needing(config: pytest.Config, items: list[pytest.Item], only: Optional) -> None:
    """The complement of a run without `only`: its whole modules and its backend's tests, nothing else."""
    verdicts: dict[Path, bool] = {}
    keep, drop = [], []
    for item in items:
        path = Path(str(item.path))
        if path not in verdicts:
            verdicts[path] = _module_needs(path, only)
        if verdicts[path] or _item_needs(item, only):
            keep.append(item)
        else:
            drop.append(item)
    only.items = [item.nodeid for item in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _value_names(value: object, backend: str) -> bool:
    """A parameter that is the backend's name, or a case (dataclass) with a field naming it
    (an interop case against the other backend: Case(other_backend="tlslite"))."""
    if value == backend:
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(getattr(value, f.name) == backend for f in dataclasses.fields(value))
    return False


def _item_needs(item: pytest.Item, optional: Optional) -> bool:
    """Marked `@pytest.mark.needs("tlslite")`, or (for a backend) its parameters or code name the backend."""
    if any(optional.probe in marker.args for marker in item.iter_markers("needs")):
        return True
    backend = optional.backend
    if not backend:
        return False
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_value_names(value, backend) for value in callspec.params.values()):
        return True
    function = getattr(item, "function", None)
    return function is not None and _names_backend(function, backend)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    only = _only(terminalreporter.config)
    if only is not None:  # one line for tests/test_debian.py to read
        terminalreporter.write_line(f"select_available: only={only.probe} selected={len(only.items)}")
        return
    missing = [o for o in OPTIONALS if o.reason]
    terminalreporter.section("optional libraries")
    for optional in OPTIONALS:
        if not optional.reason:
            terminalreporter.write_line(f"{optional.name}: available, nothing deselected")
            continue
        modules = sum(optional.modules_ignored.values())
        terminalreporter.write_line(
            f"{optional.name}: MISSING ({optional.reason}); deselected {len(optional.items)} tests and "
            f"{len(optional.modules_ignored)} whole modules ({modules} test functions) that need it")
        for name, count in sorted(optional.modules_ignored.items()):
            terminalreporter.write_line(f"  module {name} ({count} test functions): imports it at top level")
        for nodeid in optional.items:
            terminalreporter.write_line(f"  {nodeid}")
    # one line for tests/test_debian.py to read
    terminalreporter.write_line(
        "select_available: missing=" + (",".join(o.probe for o in missing) or "none")
        + f" deselected={sum(len(o.items) for o in OPTIONALS)}"
        + f" modules_ignored={sum(len(o.modules_ignored) for o in OPTIONALS)}")
