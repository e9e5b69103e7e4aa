#!/bin/bash
# The harness's unit (hsd-vm.service, After=multi-user.target) runs this under systemd as PID 1.
#
# First boot ("install"): install this checkout's .deb with apt from the local file (its
# dependencies, Debian's python3-* packages, came from the mirror with the root), as an operator
# would; then configure what the next boot needs (a certificate set, /etc/tlshd/config, an fstab
# NFS mount with xprtsec=tls) and `systemctl soft-reboot`: systemd restarts all of userspace and
# boots again through its whole transaction, with the kernel and this tmpfs-backed root kept.
# Second boot ("run"): systemd started hsd.service and made the fstab mount by itself.  Run each
# requested scenario in order under `timeout` (its `# limit:` line), write results/NAME.rc, print
# `HSD-VM-VERDICT NAME RC MS`, and power off.  Any early failure still ends in a power-off.
set -u
RUN=/hsdrun
STATE=/var/lib/hsd-vm
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
poweroff_now() { sync; echo o > /proc/sysrq-trigger; sleep 30; }
trap poweroff_now EXIT
mkdir -p "$STATE" "$RUN/results"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
systemd_version() { systemctl --version | awk 'NR == 1 { print $2 }'; }

if [ ! -e "$STATE/installed" ]; then
    echo "HSD-VM-BOOTED $(uname -r) systemd $(systemd_version) phase=install uptime $(uptime_s)"
    echo "HSD-VM-STARTUP $(systemd-analyze time 2>/dev/null | head -1)"
    t0=$(date +%s%N)
    {
        echo "--- apt-get install"
        ta=$(date +%s%N)
        apt-get install -y --no-install-recommends "$RUN"/deb/hsd_*_all.deb
        rc=$?
        echo "apt rc=$rc in $(ms "$ta") ms"
        echo "--- after install"
        echo "installed: $(dpkg-query -W -f '${Package} ${Version} ${Status}' hsd)"
        echo "is-enabled: $(systemctl is-enabled hsd.service)"
        echo "is-active: $(systemctl is-active hsd.service)"
        echo "tlslite-ng: $(python3 -c 'import tlslite; print(tlslite.__version__, tlslite.__file__)' 2>&1)"
        [ "$rc" = 0 ]
    } > "$RUN/results/install.log" 2>&1
    rc=$?
    if [ "$rc" != 0 ] || ! command -v hsd >/dev/null; then
        cat "$RUN/results/install.log"
        echo "HSD-VM-INSTALL-FAILED"
        exit 1
    fi
    echo "HSD-VM-INSTALLED $(dpkg-query -W -f '${Package} ${Version}' hsd) in $(ms "$t0") ms ($(grep '^is-active' "$RUN/results/install.log"))"
    if ! (cd "$RUN/guest" && bash ./boot-setup.sh) > "$RUN/results/boot-setup.log" 2>&1; then
        cat "$RUN/results/boot-setup.log"
        echo "HSD-VM-SETUP-FAILED"
        exit 1
    fi
    touch "$STATE/installed"
    echo "HSD-VM-SOFT-REBOOT uptime $(uptime_s)"
    sync
    trap - EXIT
    systemctl soft-reboot || { echo "HSD-VM-SOFT-REBOOT-FAILED"; poweroff_now; }
    exit 0
fi

echo "HSD-VM-BOOTED $(uname -r) systemd $(systemd_version) phase=run uptime $(uptime_s)"
echo "HSD-VM-STARTUP $(systemd-analyze time 2>/dev/null | head -1)"

# quiesce: the boot's own hsd.service, fstab NFS mount and nfs-server stop before the scenarios
# that start their own agents and server (systemd-boot, when listed, runs first and reads them)
quiesce() {
    local t0
    t0=$(date +%s%N)
    umount /mnt/boot-tls 2>/dev/null || true
    systemctl stop hsd.service nfs-server.service 2>/dev/null || true
    (. "$RUN/scenarios/_lib.sh" && boot_conf_restore)
    echo "HSD-VM-QUIESCED hsd $(systemctl is-active hsd.service) nfs-server $(systemctl is-active nfs-server.service) in $(ms "$t0") ms"
}
quiesced=
while read -r name limit; do
    [ -n "$name" ] || continue
    base=${name%%@*}; variant=; [ "$base" = "$name" ] || variant=${name#*@}
    if [ "$base" != systemd-boot ] && [ -z "$quiesced" ]; then quiesce; quiesced=1; fi
    script="$RUN/scenarios/$base.sh"
    log="$RUN/results/$name.log"
    start=$(date +%s%N)
    echo "HSD-VM-START $name (limit ${limit}s)"
    (cd "$RUN/scenarios" && SCENARIO="$name" HSD_VARIANT="$variant" timeout -k 5 "$limit" bash "$script") 2>&1 \
        | while IFS= read -r line; do printf '[%s] %s\n' "$name" "$line"; done | tee "$log"
    rc=${PIPESTATUS[0]}
    took=$(ms "$start")
    [ "$rc" = 124 ] && echo "[$name] TIMEOUT after ${limit}s" | tee -a "$log"
    echo "$rc $took" > "$RUN/results/$name.rc"
    echo "HSD-VM-VERDICT $name $rc ${took}ms"
    sync
done < "$RUN/scenarios.txt"
echo "HSD-VM-DONE"
