"""hsd's PSK policy plugin: keys from the request's keyrings; the host hands them to the chosen backend."""

from .policy import hsd_backend_info, hsd_psk_offer

__all__ = ["hsd_backend_info", "hsd_psk_offer"]
