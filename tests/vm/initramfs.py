"""The guest's initramfs: busybox plus the modules that reach the 9p root, then systemd as PID 1.

Why an overlay: the cached root is shared read-only, and every boot writes
into a tmpfs laid over it, so runs never dirty the cache and can run side by
side.  The per-run share (hsdrun) carries this checkout's .deb and scenarios;
its etc/ (the runner's unit, fstab, exports) is copied over the root's /etc
before systemd starts, so systemd boots with them as if an operator had
written them.  systemd mounts hsdrun itself again from that fstab.
"""

from __future__ import annotations

from pathlib import Path

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# the accelerator probe (boot.py): the kernel ran this far, which is all it asks
grep -q hsd.probe /proc/cmdline && { echo HSD-VM-PROBE-OK; echo o > /proc/sysrq-trigger; sleep 10; }
fail() { echo "HSD-VM-INIT-FAILED $*"; echo o > /proc/sysrq-trigger; sleep 10; }
for m in $(cat /modules.order); do insmod /modules/$m || fail "insmod $m"; done
mkdir -p /lower /rw /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower || fail "9p root"
mount -t tmpfs -o size=1200m,mode=0755 rw /rw && mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail overlay
mkdir -p /run-share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hsdrun /run-share || fail "9p hsdrun"
cp -a /run-share/etc/. /newroot/etc/ || fail "copy the run's /etc files"
umount /run-share
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"""


def _newc_entry(name: str, data: bytes, mode: int, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio "newc" record (the format the kernel unpacks)."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def write_initramfs(path: Path, busybox: bytes, modules: list[tuple[str, bytes]]) -> None:
    """modules: (file name, uncompressed .ko), in load order."""
    entries: list[tuple[str, bytes, int]] = [
        (d, b"", 0o040755) for d in ("bin", "dev", "proc", "sys", "modules", "newroot")
    ]
    entries.append(("bin/busybox", busybox, 0o100755))
    entries.append(("init", INIT_SCRIPT.encode(), 0o100755))
    entries.append(("modules.order", "".join(f"{name}\n" for name, _ in modules).encode(), 0o100644))
    entries += [(f"modules/{name}", data, 0o100644) for name, data in modules]
    blob = b"".join(_newc_entry(name, data, mode, ino) for ino, (name, data, mode) in enumerate(entries, 1))
    # the kernel opens /dev/console for init's stdio before anything is mounted
    blob += _newc_entry("dev/console", b"", 0o020600, len(entries) + 1, rdev=(5, 1))
    blob += _newc_entry("TRAILER!!!", b"", 0, 0)
    path.write_bytes(blob)
