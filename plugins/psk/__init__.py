"""hsd psk plugin."""
