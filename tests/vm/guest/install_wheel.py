"""Install hsd's wheel into the guest's venv: unpack it and write its console scripts.

Why not pip: under emulation pip takes ~35 s to start and byte-compile; a pure
Python wheel is a zip whose files go to site-packages as they are, plus
entry_points.txt for the `hsd` commands.  The dist-info keeps importlib.metadata
(and so stevedore's backend discovery) working exactly as after pip install.
"""

from __future__ import annotations

import configparser
import os
import sys
import sysconfig
import zipfile
from pathlib import Path

SCRIPT = """#!{python}
import sys
from {module} import {func}
sys.exit({func}())
"""


def install(wheel: Path) -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    bindir = Path(sys.prefix) / "bin"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = archive.namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    (site / dist_info / "INSTALLER").write_text("hsd-vm\n")
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str
    entry_points.read(site / dist_info / "entry_points.txt")
    scripts = []
    if entry_points.has_section("console_scripts"):
        for name, target in entry_points.items("console_scripts"):
            module, _, func = target.strip().partition(":")
            path = bindir / name
            path.write_text(SCRIPT.format(python=sys.executable, module=module, func=func))
            os.chmod(path, 0o755)
            scripts.append(name)
    return scripts


if __name__ == "__main__":
    print("installed scripts:", " ".join(install(Path(sys.argv[1]))))
