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
            host.problems.append(PluginProblem(entrypoint.name, f"cannot be loaded: {exc!r}"))

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
            raise Unsupported(f"backend {name!r} is not installed (installed: {', '.join(self.backends()) or 'none'})")
        if mode not in info.modes:
            raise Unsupported(f"backend {name!r} does not serve {mode}")
        if mode.auth == "psk" and not any(i.kind == "policy" and mode in i.modes for i in self.infos.values()):
            raise Unsupported(f"no PSK policy plugin serves {mode}")
        return name

    def winners(self, default: str | None = None) -> dict[Mode, str]:
        """For each mode, which backend wins (or why none does) - for `hsd plugins`."""
        out: dict[Mode, str] = {}
        for mode in ALL_MODES:
            try:
                out[mode] = self.backend_for(mode, default)
            except Unsupported as exc:
                out[mode] = f"- ({exc})"
        return out
