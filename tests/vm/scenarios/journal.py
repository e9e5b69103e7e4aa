"""Print one unit invocation's journal entries, one per line: MONO_US PRIORITY IDENTIFIER PID MESSAGE.

Why a helper: the scenarios check fields journalctl's text output hides (SYSLOG_IDENTIFIER,
PRIORITY, the invocation), both hsd's own lines (_SYSTEMD_INVOCATION_ID) and systemd's about
the unit (INVOCATION_ID), in one monotonic order.
    python3 journal.py UNIT INVOCATION_ID
"""

from __future__ import annotations

import json
import subprocess
import sys


def entries(unit: str, invocation: str) -> list[dict[str, str]]:
    out = subprocess.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"], capture_output=True,
                         text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        entry = json.loads(line)
        if invocation in (entry.get("_SYSTEMD_INVOCATION_ID"), entry.get("INVOCATION_ID")):
            found.append(entry)
    return sorted(found, key=lambda e: int(e.get("__MONOTONIC_TIMESTAMP", "0")))


def main() -> int:
    unit, invocation = sys.argv[1], sys.argv[2]
    for e in entries(unit, invocation):
        message = e.get("MESSAGE")
        if isinstance(message, list):  # journald stores non-UTF-8 messages as byte lists
            message = bytes(message).decode(errors="replace")
        print(e.get("__MONOTONIC_TIMESTAMP", "-"), e.get("PRIORITY", "-"), e.get("SYSLOG_IDENTIFIER", "-"),
              e.get("_PID", "-"), (message or "").replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
