"""A plugin written for plugin API 1 (it filtered requests itself): hsd must refuse it, saying what changed."""

from hsd.hookspecs import BackendInfo, Mode, hookimpl


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(name="old-api", version="0.9", modes=frozenset({Mode("client", "unauth")}), api_version=1)


@hookimpl
def hsd_handshake(ctx):  # never called: the plugin is refused at load time
    raise AssertionError("a refused plugin was called")
