"""hsd: a pluggable TLS handshake daemon for the Linux kernel's `handshake` netlink family."""

__version__ = "0.1.0"
