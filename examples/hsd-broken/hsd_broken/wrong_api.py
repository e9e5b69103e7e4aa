"""A plugin written for a future plugin API: hsd must refuse it with a clear message."""

from hsd.hookspecs import BackendInfo, Mode, hookimpl


@hookimpl
def hsd_backend_info() -> BackendInfo:
    return BackendInfo(name="wrong-api", version="9.9", modes=frozenset({Mode("client", "unauth")}), api_version=999)


@hookimpl
def hsd_handshake(ctx):  # never called: the plugin is refused at load time
    raise AssertionError("a refused plugin was called")
