"""`python3 -m tests.vm`: build the guests (cached) and run scenarios on real Linux kernels under systemd.

    python3 -m tests.vm run [-g GUEST] SCENARIO...   boot GUEST once, run them in order, exit 0 only if all pass
    python3 -m tests.vm build [-g GUEST]             build (or reuse) the guest images and the .debs
    python3 -m tests.vm list                         the guests and the scenarios

GUEST is trixie (Linux 6.12, tlshd 1.0.0; the default for run), forky (Linux 7.2, tlshd 1.4.0) or
all (one boot per guest, in turn).
Exit codes: 0 all passed, 1 a scenario failed or gave no verdict, 2 a guest cannot be built.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .boot import FIRST, describe_scenarios, run_scenarios, split_scenario, unknown_scenarios
from .deb import ensure_deb
from .image import GUESTS, BuildError, ensure_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.vm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a guest and run scenarios")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    run.add_argument("-q", "--quiet", action="store_true", help="do not echo the guest console")
    build = sub.add_parser("build", help="build or reuse the guest images and the .debs")
    for p, default in ((run, "trixie"), (build, "all")):
        p.add_argument("-g", "--guest", choices=(*GUESTS, "all"), default=default)
    sub.add_parser("list", help="list the guests and the scenarios")
    args = parser.parse_args(argv)

    if args.command == "list":
        for guest in GUESTS.values():
            print(f"guest {guest.name}: Linux {guest.kernel_series}, tlshd {guest.tlshd_version}")
        print("\n".join(describe_scenarios()))
        return 0
    names = list(GUESTS) if args.guest == "all" else [args.guest]
    if args.command == "build":
        return build_all(names)
    unknown = unknown_scenarios(args.scenarios)  # before minutes of building
    misplaced = [spec for spec in args.scenarios[1:] if split_scenario(spec)[0] in FIRST]
    if unknown or misplaced:
        print(f"vm: unknown scenario(s) {' '.join(unknown)}; have:\n" + "\n".join(describe_scenarios())
              if unknown else f"vm: {' '.join(misplaced)} reads what the boot did: list it first", file=sys.stderr)
        return 2
    worst = 0
    for name in names:
        started = time.monotonic()
        try:
            image = ensure_image(GUESTS[name])
            root_ready = time.monotonic() - started
            deb = ensure_deb(name)
        except BuildError as exc:
            print(f"vm: CANNOT BUILD THE {name.upper()} GUEST: {exc}", file=sys.stderr)
            return 2
        versions = " ".join(f"{k}={v}" for k, v in sorted(image.versions.items()))
        print(f"vm: guest {name} ready in {time.monotonic() - started:.1f} s (root "
              f"{'built' if image.build_seconds else 'cached'} {root_ready:.1f} s, .deb "
              f"{'built ' + format(deb.build_seconds, '.1f') + ' s' if deb.build_seconds else 'cached'}"
              f"{', its build root ' + format(deb.root_seconds, '.0f') + ' s' if deb.root_seconds else ''}); "
              f"kernel {image.kernel_release}; {deb.path.name} of {deb.commit}; {versions}", flush=True)
        try:
            result = run_scenarios(image, deb, args.scenarios, echo=not args.quiet)
        except ValueError as exc:
            print(f"vm: {exc}", file=sys.stderr)
            return 2
        marks = ", ".join(f"{label} {'never' if t is None else format(t, '.1f') + ' s'}" for label, t in
                          (("first boot", result.boot_seconds), (".deb installed", result.install_seconds),
                           ("second boot", result.reboot_seconds)))
        print(f"vm: {name} (accel {result.accel}): {marks}; whole run {result.total_seconds:.1f} s; "
              f"files in {result.run_dir}")
        for verdict in result.verdicts:
            print(f"vm: {verdict.describe()}")
        worst = max(worst, 0 if result.passed else 1)
    return worst


def build_all(names: list[str]) -> int:
    """Every guest's root and .deb at once: mmdebstrap and dpkg mostly wait on the network and the
    disk, so a cold build of both guests takes about as long as the slowest of the four parts."""
    started = time.monotonic()
    jobs = {}
    with ThreadPoolExecutor(max_workers=2 * len(names)) as pool:
        for name in names:
            jobs[(name, "root")] = pool.submit(_timed, ensure_image, GUESTS[name])
            jobs[(name, "deb")] = pool.submit(_timed, ensure_deb, name)
    failed = False
    for (name, part), job in jobs.items():
        try:
            result, seconds = job.result()
        except BuildError as exc:
            print(f"vm: CANNOT BUILD THE {name.upper()} GUEST ({part}): {exc}", file=sys.stderr)
            failed = True
            continue
        origin = "built" if result.build_seconds else "cached"
        where = result.root if part == "root" else result.path
        print(f"vm: build {name} {part}: {origin} in {seconds:.1f} s: {where}")
    print(f"vm: build of {', '.join(names)}: {time.monotonic() - started:.1f} s", flush=True)
    return 2 if failed else 0


def _timed(func, *args):
    started = time.monotonic()
    return func(*args), time.monotonic() - started


if __name__ == "__main__":
    sys.exit(main())
