"""Finding, checking, choosing and calling plugins.

stevedore discovers everything in the ``hsd.backends`` entry-point group (the
built-in backends register there too); pluggy holds the hook implementations.
A broken or incompatible plugin is reported and skipped, never fatal, with a
message naming it.  The host routes: a request goes to the one backend chosen
for its mode (and a PSK request to the policy plugin first, then that backend),
never to every plugin; what a plugin returns is checked before the core uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy
from stevedore import ExtensionManager

from .config import Config
from .context import Auth, HandshakeContext, Role
from .errors import CredentialError, HandshakeError, Unsupported
from .hookspecs import ALL_MODES, API_VERSION, ENTRY_POINT_GROUP, KINDS, PROJECT, BackendInfo, HookSpecs, Mode
from .psk import PskOffer, run_psk
from .session import Session
from .tls13 import refuse_handshake
from .validate import check_session, scrub

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

    def _disabled(self, *names: str) -> bool:
        cfg = self.config
        return (bool(cfg.enable_plugins) and not any(n in cfg.enable_plugins for n in names)) or \
            any(n in cfg.disable_plugins for n in names)

    def add(self, name: str, plugin: Any) -> BackendInfo | None:
        """Check and register one plugin object (module, class or instance) found under entry-point name.

        enable_plugins/disable_plugins may name the entry point or BackendInfo.name."""
        if name in self.config.disable_plugins:  # never even asked for its info
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
                raise TypeError(f"it targets plugin API {info.api_version}, this hsd provides API {API_VERSION}"
                                + (API_1_CHANGES if info.api_version == 1 else ""))
            problem = info_problem(info)
            if problem:
                raise TypeError(f"its BackendInfo is malformed: {problem}")
            if self._disabled(name, info.name):
                self.disabled.extend(dict.fromkeys((name, info.name)))
                return None
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
        """pluggy's relay, for the broadcast hooks only (hsd_handshake_done); requests go through handshake()."""
        return self.pm.hook

    def backends(self) -> dict[str, BackendInfo]:
        return {n: i for n, i in self.infos.items() if i.kind == "backend"}

    def backend_for(self, mode: Mode, default: str | None = None) -> str:
        """The backend that serves mode: the configured one, which must claim the mode."""
        name = self.config.backend_for(str(mode.role), str(mode.auth)) if default is None else \
            self.config.backends.get(mode.key, default)
        self._serving(name, mode)
        if mode.auth is Auth.PSK:
            self.policy_for(mode)
        return name

    def _serving(self, name: str, mode: Mode) -> BackendInfo:
        info = self.backends().get(name)
        if info is None:
            raise Unsupported(self.why_unavailable(name))
        if mode not in info.modes:
            raise Unsupported(f"backend {name!r} does not serve {mode}")
        return info

    def policy_for(self, mode: Mode) -> str:
        """The PSK policy plugin for a PSK mode: the first loaded (by name) that claims it."""
        for name, info in sorted(self.infos.items()):
            if info.kind == "policy" and mode in info.modes:
                return name
        raise Unsupported(f"no PSK policy plugin serves {mode}")

    # ------------------------------------------------------------ routing one request

    def context(self, ctx: HandshakeContext) -> HandshakeContext:
        """ctx, wired to this host for ctx.delegate()."""
        ctx.delegate_to = self._delegate
        return ctx

    def handshake(self, ctx: HandshakeContext) -> Session:
        """Run ctx on the backend it names (ctx.backend), under the rules every backend obeys.

        Before: the mode is one the backend claims; a verifying client has a peer
        name; our own certificate and key are there when the mode needs them.
        After: the Session is well formed and the backend left remote_auth to the
        core.  PSK: the policy's offer, the backend's mechanics, remote-auth from
        the key used (hsd.psk.run_psk)."""
        self.context(ctx)
        return self._run(ctx)

    def _delegate(self, ctx: HandshakeContext, backend: str, offer: PskOffer | None) -> Session:
        if backend == ctx.backend:
            raise Unsupported(f"backend {backend!r} delegated a request to itself")
        if ctx.mode.auth is Auth.PSK and offer is None:
            raise Unsupported(f"a PSK request is delegated to {backend!r} with the offer it was given")
        return self._call_backend(dataclasses.replace(ctx, backend=backend), offer)

    def _run(self, ctx: HandshakeContext) -> Session:
        mode = ctx.mode
        self._serving(ctx.backend, mode)
        if mode.auth is not Auth.PSK:
            check_request(ctx)
            return self._call_backend(ctx, None)
        policy = self.policy_for(mode)
        offer = _checked_offer(self._call(policy, "hsd_psk_offer", ctx=ctx), policy)
        return run_psk(ctx, offer, lambda given: self._call_backend(ctx, given))

    def _call_backend(self, ctx: HandshakeContext, offer: PskOffer | None) -> Session:
        name = ctx.backend
        self._serving(name, ctx.mode)
        if offer is None:
            result = self._call(name, "hsd_handshake", ctx=ctx)
        else:
            result = self._call(name, "hsd_psk_handshake", ctx=ctx, offer=offer)
        if result is None:
            raise Unsupported(f"backend {name!r} did not handle {ctx.mode}")
        try:
            session = check_session(result, name)
        except HandshakeError:
            scrub(result)
            raise
        if session.remote_auth:
            session.wipe()
            raise MalformedResult(f"backend {name!r} set remote_auth {session.remote_auth}: the identity DONE "
                                  "reports is the core's to decide (report peer_certificates / psk_identity)")
        return session

    def _call(self, name: str, hook: str, **kwargs: Any) -> Any:
        """One plugin's implementation of one hook, never the others'.

        A HandshakeError is the plugin's answer and passes through; any other
        exception is a bug of that plugin: one log line naming it (the traceback
        only at debug level), then PluginBug (EIO) for the request."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                try:
                    return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
                except HandshakeError:
                    raise
                except Exception as exc:
                    raise plugin_bug(name, hook, exc) from None
        raise Unsupported(f"plugin {name!r} does not implement {hook}")

    def observe(self, ctx: HandshakeContext, status: int, session: Session | None) -> None:
        """hsd_handshake_done on every plugin that has it; one that raises is logged and the others still run."""
        for impl in self.pm.hook.hsd_handshake_done.get_hookimpls():
            args = {"ctx": ctx, "status": status, "session": session}
            try:
                impl.function(**{arg: args[arg] for arg in impl.argnames})
            except Exception as exc:
                plugin_bug(impl.plugin_name, "hsd_handshake_done", exc)

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


API_1_CHANGES = (" (API 2: hsd_handshake is called only on the backend chosen for the mode, the context is"
                 " typed and holds no config or hook, the core sets remote_auth; see the plugin guide)")


class MalformedResult(HandshakeError):
    """A plugin returned something the contract does not allow (a plugin bug): EIO."""


class PluginBug(HandshakeError):
    """A plugin raised something else than a HandshakeError: EIO, the reason names the plugin."""


def plugin_bug(name: str, hook: str, exc: BaseException) -> PluginBug:
    """Log a plugin's exception as one line naming it (traceback at debug level only); the error for DONE."""
    reason = f"plugin {name!r} raised {exc!r} in {hook}"
    log.error("%s (a bug in that plugin; the traceback is logged at debug level)", reason)
    log.debug("traceback of plugin %r in %s", name, hook, exc_info=exc)
    return PluginBug(reason)


def info_problem(info: BackendInfo) -> str | None:
    """Why a BackendInfo cannot be used, or None: its fields must have the documented types."""
    if not isinstance(info.name, str) or not info.name or any(c.isspace() for c in info.name):
        return f"name {info.name!r} is not a non-empty word"
    if not isinstance(info.version, str):
        return f"version is {type(info.version).__name__}, not str"
    if info.kind not in KINDS:
        return f"kind {info.kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(info.modes, (frozenset, set)) or (not info.modes and info.kind != "observer"):
        return "modes is not a non-empty frozenset of Mode"
    for mode in info.modes:
        if not isinstance(mode, Mode):
            return f"modes holds {mode!r}, a {type(mode).__name__}, not a Mode (write Mode(\"client\", \"x509\"))"
        if mode not in ALL_MODES:
            return f"mode {mode} is not one hsd serves ({', '.join(str(m) for m in ALL_MODES)})"
    if not isinstance(info.extra, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in info.extra.items()):
        return "extra is not a dict of str to str"
    return None


def _checked_offer(offer: object, policy: str) -> PskOffer:
    if not isinstance(offer, PskOffer):
        if offer is not None:
            scrub_offer = getattr(offer, "wipe", None)
            if callable(scrub_offer):
                scrub_offer()
        raise MalformedResult(f"policy plugin {policy!r} returned {type(offer).__name__}, not a PskOffer")
    return offer


def check_request(ctx: HandshakeContext) -> None:
    """The rules of a certificate-mode request, checked once here for every backend.

    A verifying client needs the server's name (EACCES without one); a server,
    and a client in x509 mode, need our certificate and private key (EIO; a
    server's client gets the access_denied alert at once)."""
    mode = ctx.mode
    if mode.role is Role.CLIENT:
        ctx.server_name  # raises PeerRejected for a verifying client without a peer name
    if mode.role is Role.SERVER or mode.auth is Auth.X509:
        creds = ctx.x509
        if not creds.chain or creds.key is None:
            if mode.role is Role.SERVER:
                refuse_handshake(ctx.sock, ctx.deadline)
            raise CredentialError(f"{mode.role} x509 handshake needs a certificate and a private key")
