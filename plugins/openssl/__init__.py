"""hsd openssl plugin."""
