"""hsd's PSK policy plugin: keys from the request's keyrings, mechanics from the backend."""

from .policy import hsd_backend_info, hsd_handshake

__all__ = ["hsd_backend_info", "hsd_handshake"]
