"""`python3 -m tests.vm`: build the guest (cached) and run scenarios on a real Linux kernel.

    python3 -m tests.vm run SCENARIO...   boot once, run them in order, exit 0 only if all pass
    python3 -m tests.vm build             build (or reuse) the guest image, print its paths
    python3 -m tests.vm list              the scenarios

Exit codes: 0 all passed, 1 a scenario failed or gave no verdict, 2 the guest cannot be built.
"""

from __future__ import annotations

import argparse
import sys
import time

from .boot import describe_scenarios, run_scenarios
from .image import BuildError, ensure_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.vm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot the guest and run scenarios")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    run.add_argument("-q", "--quiet", action="store_true", help="do not echo the guest console")
    sub.add_parser("build", help="build or reuse the guest image")
    sub.add_parser("list", help="list the scenarios")
    args = parser.parse_args(argv)

    if args.command == "list":
        print("\n".join(describe_scenarios()))
        return 0
    started = time.monotonic()
    try:
        image = ensure_image()
    except BuildError as exc:
        print(f"vm: CANNOT BUILD THE GUEST: {exc}", file=sys.stderr)
        return 2
    print(f"vm: guest ready in {time.monotonic() - started:.1f} s (kernel {image.kernel_release})", flush=True)
    if args.command == "build":
        print(f"root {image.root}\nkernel {image.kernel}\ninitramfs {image.initramfs}")
        return 0
    try:
        result = run_scenarios(image, args.scenarios, echo=not args.quiet)
    except ValueError as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 2
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "never"
    print(f"vm: boot to guest init {boot}; whole run {result.total_seconds:.1f} s; files in {result.run_dir}")
    for verdict in result.verdicts:
        print(f"vm: {verdict.describe()}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
