"""Build (or reuse) a guest: a Debian root directory (trixie or forky) and a tiny initramfs.

Why a cache: mmdebstrap takes minutes; the result only changes when its
inputs do (suite, package list, the tlslite-ng requirement, this module, the
initramfs init).  The cache key is a hash of exactly those inputs, so editing
any of them rebuilds, and hsd itself is never baked in: every boot installs
the .deb built from this checkout with apt (tests/vm/deb.py).
Why these packages: the guest is what an operator runs, so systemd is PID 1,
hsd's dependencies are Debian's own python3-* packages (preinstalled here, so
that `apt-get install ./hsd_*.deb` resolves offline in the guest), and
tlslite-ng comes from PyPI beside them, as docs/packaging.md tells operators.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .initramfs import INIT_SCRIPT, write_initramfs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = HERE / ".cache"
PACKAGES = (
    "python3", "python3-pip", "nfs-kernel-server", "nfs-common", "ktls-utils", "keyutils", "kmod",
    "iproute2", "openssl", "gnutls-bin", "linux-image-amd64", "procps", "nvme-cli", "util-linux",
    "ca-certificates", "systemd", "systemd-sysv",
    # what hsd's .deb Depends on (${python3:Depends}): Debian's libraries, from the mirror
    "python3-openssl", "python3-cryptography", "python3-pyroute2", "python3-pluggy", "python3-stevedore",
    # nfs-token: a SoftHSM2 token, pkcs11-provider for the system OpenSSL, pkcs11-tool to prove non-extractable
    "softhsm2", "pkcs11-provider", "opensc",
)
# modules the initramfs needs to reach the 9p root and lay a writable overlay over it
INITRAMFS_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "overlay")
BUILD_TIMEOUT = 1800
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class Guest:
    """One Debian suite as a guest: its kernel and its tlshd come from the suite itself."""

    name: str
    kernel_series: str  # what linux-image-amd64 is in that suite (checked after the build)
    tlshd_version: str  # ktls-utils in that suite (checked after the build)
    apt_options: tuple[str, ...] = ()


GUESTS = {
    "trixie": Guest("trixie", "6.12", "1.0.0"),
    # forky's Release file on the mirror is past its Valid-Until date
    "forky": Guest("forky", "7.2", "1.4.0", ('Acquire::Check-Valid-Until "false"',)),
}


def tlslite_requirement() -> str:
    """pyproject's tlslite extra: what docs/packaging.md tells an operator to pip install."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = extras["tlslite"]
    return requirement


class BuildError(RuntimeError):
    """The guest cannot be built: the harness must fail, never skip."""


@dataclass(frozen=True)
class Image:
    guest: Guest
    root: Path
    kernel: Path
    initramfs: Path
    kernel_release: str
    build_seconds: float  # spent building it in this call (0.0 when it came from the cache)
    versions: dict[str, str]  # package -> version inside the root (kernel, ktls-utils, systemd, ...)


def cache_key(guest: Guest) -> str:
    """The root's inputs: suite, packages, the tlslite-ng requirement and the recipe (build_root)."""
    digest = hashlib.sha256()
    for part in (guest.name, *guest.apt_options, " ".join(PACKAGES), tlslite_requirement(),
                 inspect.getsource(build_root)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def initramfs_key() -> str:
    """The initramfs is rebuilt (in seconds) when its init or module list changes; the root is not."""
    digest = hashlib.sha256()
    for part in (" ".join(INITRAMFS_MODULES), INIT_SCRIPT, (HERE / "initramfs.py").read_text(),
                 inspect.getsource(build_initramfs), inspect.getsource(_module_paths)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


def host_mirror() -> str:
    """The Debian mirror this machine's apt already uses (never a hard-coded host)."""
    override = os.environ.get("HSD_VM_MIRROR")
    if override:
        return override
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    texts = [p.read_text() for p in sorted(sources.glob("*.sources"))] if sources.is_dir() else []
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            suites = fields.get("Suites", "").split()
            if fields.get("Types", "deb").split()[0] != "deb" or not suites:
                continue
            if all("security" in s for s in suites) or "main" not in fields.get("Components", ""):
                continue
            candidates += fields.get("URIs", "").split()
    legacy = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))] if sources.is_dir() else []
    for path in legacy:
        if path.is_file():
            for line in path.read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+.*\bmain\b", line)
                if m and "security" not in m.group(2):
                    candidates.append(m.group(1))
    debian = [uri for uri in candidates if uri.rstrip("/").endswith("/debian")]
    if not (debian or candidates):
        raise BuildError("no Debian mirror in the host's apt sources; set HSD_VM_MIRROR")
    return (debian or candidates)[0]


def _run(cmd: list[str], log: Path, timeout: float = BUILD_TIMEOUT) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except FileNotFoundError:
            raise BuildError(f"{cmd[0]} is not installed (apt-get install mmdebstrap qemu-system-x86 "
                             "busybox-static xz-utils)") from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"{cmd[0]} took more than {timeout:.0f} s; see {log}") from None
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(True)[-25:])
        raise BuildError(f"{cmd[0]} failed with exit code {proc.returncode}; see {log}\n{tail}")


def build_root(guest: Guest, root: Path, log: Path) -> None:
    """mmdebstrap a minbase root with systemd and the packages, then tlslite-ng from PyPI beside them.

    tlshd.service is disabled (an operator switching to hsd does that; hsd.service Conflicts= it,
    and the scenarios start the reference tlshd themselves); the serial getty is masked (the
    console carries the harness's markers)."""
    pip_env = ("env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_CERT=/tmp/host-ca.crt "
               "SSL_CERT_FILE=/tmp/host-ca.crt PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "
               "PIP_ROOT_USER_ACTION=ignore")
    hooks = [
        f'cp {HOST_CA} "$1"/tmp/host-ca.crt',
        f"chroot \"$1\" {pip_env} pip install --quiet --break-system-packages '{tlslite_requirement()}'",
        'rm -f "$1"/tmp/host-ca.crt "$1"/var/cache/apt/archives/*.deb',
        'chroot "$1" systemctl disable tlshd.service',
        'chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service',
        'chmod a+r "$1"/boot/vmlinuz-*',
    ]
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    cmd += [f"--aptopt={option}" for option in guest.apt_options]
    for hook in hooks:
        cmd.append(f"--customize-hook={hook}")
    cmd += [guest.name, str(root), host_mirror()]
    _run(cmd, log)
    if guest.apt_options:  # apt inside the guest (installing hsd's .deb) needs them too
        conf = root / "etc/apt/apt.conf.d/99hsd-vm"
        conf.write_text("".join(f"{option};\n" for option in guest.apt_options))


def package_versions(root: Path) -> dict[str, str]:
    """The versions that matter for reading a run: kernel, reference tlshd, systemd, Python, libraries."""
    names = ("linux-image-amd64", "ktls-utils", "systemd", "python3", "python3-openssl", "python3-cryptography",
             "python3-pyroute2", "openssl", "nfs-kernel-server", "nvme-cli")
    proc = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n",
                           *names], capture_output=True, text=True)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def kernel_of(root: Path) -> tuple[Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"no kernel in {root}/boot: linux-image-amd64 did not install")
    kernel = kernels[-1]
    return kernel, kernel.name.removeprefix("vmlinuz-")


def _module_paths(root: Path, release: str) -> list[Path]:
    """Our modules and their dependencies, dependencies first, from modules.dep."""
    moddir = root / "usr/lib/modules" / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_module = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    ordered: list[str] = []

    def visit(rel: str) -> None:
        for dep in deps.get(rel, []):
            visit(dep)
        if rel not in ordered:
            ordered.append(rel)

    for module in INITRAMFS_MODULES:
        rel = by_module.get(module.replace("-", "_"))
        if rel is None:
            if (moddir / "modules.builtin").read_text().find(f"/{module}.ko") >= 0:
                continue  # built in: nothing to load
            raise BuildError(f"kernel module {module} not found for {release}")
        visit(rel)
    return [moddir / rel for rel in ordered]


def build_initramfs(root: Path, release: str, out: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None or b"ld-linux" in Path(busybox).read_bytes()[:4096]:
        raise BuildError("a static busybox is needed on the host (apt-get install busybox-static)")
    modules: list[tuple[str, bytes]] = []
    for path in _module_paths(root, release):
        data = path.read_bytes()
        if path.suffix == ".xz":
            data = subprocess.run(["xz", "-dc"], input=data, capture_output=True, check=True).stdout
        elif path.suffix == ".zst":
            data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
        modules.append((path.name.split(".ko")[0] + ".ko", data))
    write_initramfs(out, Path(busybox).read_bytes(), modules)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    return [point for line in Path("/proc/self/mounts").read_text().splitlines()
            if (point := line.split()[1]).startswith(prefix)]


def _has_mounts(path: Path) -> bool:
    """A failed mmdebstrap can leave /proc mounted inside a root: never rmtree through it."""
    return bool(_mounts_under(path))


def _unmount_leftovers(root: Path, log_to) -> None:
    """Even a successful mmdebstrap can fail to unmount the root's /proc ("W: umount /proc failed").

    Left mounted, the cache holds a live /proc: `cp -r` or `grep -r` over tests/ then reads
    every process's pagemap (tens of GB) and fills the disk.  Deepest first, lazily."""
    for point in sorted(_mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
        print(f"vm: unmounted {point}, left mounted by mmdebstrap", file=log_to)
    if _has_mounts(root):
        raise BuildError(f"{root} still has mounts after the build; unmount them")


def ensure_image(guest: Guest, log_to=sys.stderr) -> Image:
    """Return the cached guest, building it first when its inputs changed (BuildError if it cannot)."""
    key = f"{guest.name}-{cache_key(guest)}"
    base = CACHE / key
    root, stamp = base / "root", base / "complete"
    built = 0.0
    if not stamp.exists():
        for tool in ("mmdebstrap", "qemu-system-x86_64", "busybox", "xz"):
            if shutil.which(tool) is None:
                raise BuildError(f"{tool} is not installed (apt-get install mmdebstrap qemu-system-x86 "
                                 "busybox-static xz-utils)")
        if os.geteuid() != 0:
            raise BuildError("building the guest root needs root (mmdebstrap --mode=root)")
        if base.exists():
            if _has_mounts(base):
                raise BuildError(f"{base} still has mounts from an earlier failed build; unmount them")
            shutil.rmtree(base)
        base.mkdir(parents=True)
        log = base / "build.log"
        started = time.monotonic()
        print(f"vm: building guest {key} (mmdebstrap {guest.name}, a few minutes); log {log}", file=log_to)
        build_root(guest, root, log)
        _unmount_leftovers(base, log_to)
        built = time.monotonic() - started
        stamp.write_text(f"{built:.1f}\n")
        print(f"vm: guest {guest.name} built in {built:.0f} s", file=log_to)
        for old in CACHE.iterdir():  # keep one image per guest: each is ~1 GB
            if old.is_dir() and re.fullmatch(rf"{guest.name}-[0-9a-f]{{16}}|[0-9a-f]{{16}}", old.name) \
                    and old.name != key and not _has_mounts(old):
                shutil.rmtree(old, ignore_errors=True)
    initramfs = base / f"initramfs-{initramfs_key()}.cpio"
    if not initramfs.exists():
        for stale in base.glob("initramfs-*.cpio"):
            stale.unlink()
        _, release = kernel_of(root)
        partial = initramfs.with_suffix(".partial")
        build_initramfs(root, release, partial)
        partial.rename(initramfs)
    kernel, release = kernel_of(root)
    versions = package_versions(root)
    if not release.startswith(guest.kernel_series + ".") or \
            not versions.get("ktls-utils", "").startswith(guest.tlshd_version):
        raise BuildError(f"{guest.name}: expected Linux {guest.kernel_series} and tlshd {guest.tlshd_version}, "
                         f"the root has {release} and ktls-utils {versions.get('ktls-utils')}")
    return Image(guest, root, kernel, initramfs, release, built, versions)
