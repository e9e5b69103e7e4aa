"""Finding, checking and choosing plugins.

stevedore discovers everything in the ``hsd.backends`` entry-point group (the
built-in backends register there too); pluggy dispatches the hooks.  A broken
or incompatible plugin is reported and skipped, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy
from stevedore import ExtensionManager

from .config import Config
from .errors import Unsupported
from .hookspecs import ALL_MODES, API_VERSION, ENTRY_POINT_GROUP, PROJECT, BackendInfo, HookSpecs, Mode

log = logging.getLogger(__name__)


@dataclass
class PluginProblem:
    name: str
    reason: str


@dataclass(frozen=True)
class ModeStatus:
    mode: Mode
    backend: str  # the backend the configuration selects for this mode
    problem: str | None  # why that backend cannot serve the mode; None when it can


def load_failure(exc: BaseException) -> str:
    """One line for a plugin whose import failed: the exception's type and message, no traceback."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"ModuleNotFoundError: No module named {exc.name!r} (the Python module {exc.name!r} is not installed)"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class PluginHost:
    config: Config
    pm: pluggy.PluginManager = field(default_factory=lambda: pluggy.PluginManager(PROJECT))
    infos: dict[str, BackendInfo] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pm.add_hookspecs(HookSpecs)

    @classmethod
    def discover(cls, config: Config) -> "PluginHost":
        host = cls(config)

        def failed(_manager: Any, entrypoint: Any, exc: Exception) -> None:
            host.problems.append(PluginProblem(entrypoint.name, f"cannot be loaded: {load_failure(exc)}"))

        manager = ExtensionManager(ENTRY_POINT_GROUP, invoke_on_load=False,
                                   on_load_failure_callback=failed)
        for ext in sorted(manager.extensions, key=lambda e: e.name):
            host.add(ext.name, ext.plugin)
        for problem in host.problems:
            log.warning("plugin %s skipped: %s", problem.name, problem.reason)
        return host

    def add(self, name: str, plugin: Any) -> BackendInfo | None:
        """Check and register one plugin object (module, class or instance)."""
        cfg = self.config
        if (cfg.enable_plugins and name not in cfg.enable_plugins) or name in cfg.disable_plugins:
            self.disabled.append(name)
            return None
        try:
            obj = plugin() if isinstance(plugin, type) else plugin
            info_fn = getattr(obj, "hsd_backend_info", None)
            if info_fn is None:
                raise TypeError("it implements no hsd_backend_info hook")
            info = info_fn()
            if not isinstance(info, BackendInfo):
                raise TypeError(f"hsd_backend_info returned {type(info).__name__}, not BackendInfo")
            if info.api_version != API_VERSION:
                raise TypeError(f"it targets plugin API {info.api_version}, this hsd provides API {API_VERSION}")
            if info.name in self.infos:
                raise TypeError(f"a plugin named {info.name!r} is already loaded")
            self.pm.register(obj, name=info.name)
        except Exception as exc:  # a third-party plugin can fail in any way: report it, keep going
            self.problems.append(PluginProblem(name, str(exc) if isinstance(exc, TypeError) else repr(exc)))
            return None
        self.infos[info.name] = info
        return info

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def backends(self) -> dict[str, BackendInfo]:
        return {n: i for n, i in self.infos.items() if i.kind == "backend"}

    def backend_for(self, mode: Mode, default: str | None = None) -> str:
        """The backend that serves mode: the configured one, which must claim the mode."""
        name = self.config.backend_for(mode.role, mode.auth) if default is None else \
            self.config.backends.get(f"{mode.role}.{mode.auth}", default)
        info = self.backends().get(name)
        if info is None:
            raise Unsupported(self.why_unavailable(name))
        if mode not in info.modes:
            raise Unsupported(f"backend {name!r} does not serve {mode}")
        if mode.auth == "psk" and not any(i.kind == "policy" and mode in i.modes for i in self.infos.values()):
            raise Unsupported(f"no PSK policy plugin serves {mode}")
        return name

    def why_unavailable(self, name: str) -> str:
        """Why backend name is not usable: it failed to load (and why), is disabled, or is not installed."""
        for problem in self.problems:
            if problem.name == name:
                return f"backend {name!r} is unavailable: {problem.reason}"
        if name in self.disabled:
            return f"backend {name!r} is disabled by configuration (enable_plugins/disable_plugins)"
        return f"backend {name!r} is not installed (installed: {', '.join(self.backends()) or 'none'})"

    def mode_statuses(self) -> list[ModeStatus]:
        """Each mode with the backend the configuration selects for it and why it cannot serve (if so)."""
        statuses = []
        for mode in ALL_MODES:
            selected = self.config.backend_for(mode.role, mode.auth)
            try:
                self.backend_for(mode)
                problem = None
            except Unsupported as exc:
                problem = str(exc)
            statuses.append(ModeStatus(mode, selected, problem))
        return statuses

    def start_problems(self) -> list[str]:
        """What makes hsd refuse to start: a selected backend that cannot load, or no mode served at all.

        A mode is refused only when its selected backend is missing; a backend that is
        present but does not claim a mode (or PSK without a policy plugin) is a per-mode
        limitation that each such request reports in its DONE.
        """
        statuses = self.mode_statuses()
        problems: list[str] = []
        missing: dict[str, list[str]] = {}
        for status in statuses:
            if status.backend not in self.backends():
                missing.setdefault(status.backend, []).append(str(status.mode))
        for name, modes in missing.items():
            problems.append(f"{self.why_unavailable(name)} (selected for {', '.join(modes)})")
        if not problems and all(s.problem for s in statuses):
            problems.append("no configured mode has a backend that can serve it")
        return problems

    def winners(self, default: str | None = None) -> dict[Mode, str]:
        """For each mode, which backend wins (or why none does) - for `hsd plugins`."""
        out: dict[Mode, str] = {}
        for mode in ALL_MODES:
            try:
                out[mode] = self.backend_for(mode, default)
            except Unsupported as exc:
                out[mode] = f"- ({exc})"
        return out
