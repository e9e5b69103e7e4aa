"""Build (or reuse) the guest: a Debian trixie root directory and a tiny initramfs.

Why a cache: mmdebstrap takes minutes; the result only changes when its
inputs do (package list, pinned wheels, this module, the initramfs init).
The cache key is a hash of exactly those inputs, so editing any of them
rebuilds, and hsd itself is never baked in (it is installed at every boot).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import INIT_SCRIPT, write_initramfs

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
GUEST_REQUIREMENTS = HERE / "guest" / "requirements.txt"
SUITE = "trixie"
PYTHON_VERSION = "3.13"  # trixie's python3
PACKAGES = (
    "python3", "python3-venv", "nfs-kernel-server", "nfs-common", "ktls-utils", "keyutils", "kmod",
    "iproute2", "openssl", "gnutls-bin", "linux-image-amd64", "procps", "nvme-cli", "util-linux",
    "ca-certificates",
)
# modules the initramfs needs to reach the 9p root and lay a writable overlay over it
INITRAMFS_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "overlay")
VENV = "/opt/hsd-venv"  # guest path: hsd's pinned dependencies, hsd itself added per run
BUILD_TIMEOUT = 1800


class BuildError(RuntimeError):
    """The guest cannot be built: the harness must fail, never skip."""


@dataclass(frozen=True)
class Image:
    root: Path
    kernel: Path
    initramfs: Path
    kernel_release: str


def cache_key() -> str:
    digest = hashlib.sha256()
    for part in (SUITE, PYTHON_VERSION, " ".join(PACKAGES), " ".join(INITRAMFS_MODULES), INIT_SCRIPT,
                 GUEST_REQUIREMENTS.read_text(), Path(__file__).read_text(),
                 (HERE / "initramfs.py").read_text()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


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


def download_wheels(dest: Path, log: Path) -> None:
    """hsd's dependencies as wheels for the guest's Python, pinned to what the tests run with."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest),
           "-r", str(GUEST_REQUIREMENTS)]
    for platform in platforms:
        cmd += ["--platform", platform]
    _run(cmd, log, timeout=600)
    shutil.copy(GUEST_REQUIREMENTS, dest / "requirements.txt")


def build_root(root: Path, wheels: Path, log: Path) -> None:
    """mmdebstrap a minbase trixie with the packages, then a venv holding the wheels."""
    hooks = [
        'mkdir -p "$1"/tmp/wheels',
        f"sync-in {wheels} /tmp/wheels",
        f'chroot "$1" python3 -m venv {VENV}',
        f'chroot "$1" {VENV}/bin/pip install --quiet --no-index --find-links /tmp/wheels '
        "-r /tmp/wheels/requirements.txt",
        'rm -rf "$1"/tmp/wheels "$1"/var/cache/apt/archives/*.deb',
        'chmod a+r "$1"/boot/vmlinuz-*',
    ]
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    for hook in hooks:
        cmd.append(f"--customize-hook={hook}")
    cmd += [SUITE, str(root), host_mirror()]
    _run(cmd, log)


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


def _has_mounts(path: Path) -> bool:
    """A failed mmdebstrap can leave /proc mounted inside a root: never rmtree through it."""
    prefix = str(path.resolve()) + "/"
    return any(line.split()[1].startswith(prefix) for line in Path("/proc/self/mounts").read_text().splitlines())


def ensure_image(log_to=sys.stderr) -> Image:
    """Return the cached guest, building it first when its inputs changed."""
    key = cache_key()
    base = CACHE / key
    root, initramfs, stamp = base / "root", base / "initramfs.cpio", base / "complete"
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
        print(f"vm: building guest {key} (mmdebstrap {SUITE}, a few minutes); log {log}", file=log_to)
        download_wheels(base / "wheels", log)
        build_root(root, base / "wheels", log)
        _, release = kernel_of(root)
        build_initramfs(root, release, initramfs)
        stamp.write_text(f"{time.monotonic() - started:.1f}\n")
        print(f"vm: guest built in {time.monotonic() - started:.0f} s", file=log_to)
        for old in CACHE.iterdir():  # keep one image: each is ~1 GB
            if old.is_dir() and re.fullmatch(r"[0-9a-f]{16}", old.name) and old.name != key:
                if not _has_mounts(old):
                    shutil.rmtree(old, ignore_errors=True)
    kernel, release = kernel_of(root)
    return Image(root=root, kernel=kernel, initramfs=initramfs, kernel_release=release)
