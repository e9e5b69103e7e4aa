"""A plugin whose import fails (a missing dependency, a syntax error in real life)."""

raise ImportError("hsd-broken: this plugin fails on import on purpose")
