#!/bin/bash
# systemd-boot: what systemd as PID 1 did at boot with hsd's .deb installed (read after the
# soft-reboot that guest/runner.sh issues once the .deb is installed and the boot configured).
# hsd.service is active from the package's own unit, ordered before remote-fs-pre.target, and
# became active (READY=1) only after it had joined the handshake group: its "hsd ready" line
# precedes systemd's "Started"; the fstab NFS mount with xprtsec=tls was made by systemd at boot
# after hsd was active, with no restart and no retry, and carries data over kTLS; the journal shows
# the boot mount's handshake lines under hsd's identifier at priority info; `systemd-analyze
# security` rates hsd.service (running) and ktls-utils' tlshd.service the same way.
# Runs first in a boot (boot.py enforces it); runner.sh stops hsd and the boot mount afterwards.
# limit: 300
set -eu
. ./_lib.sh

prop() { systemctl show -P "$2" "$1"; }
mount_unit=$(systemd-escape -p --suffix=mount "$BOOT_MOUNT")

say "--- the package's unit, started by systemd at boot"
[ "$(systemctl is-active hsd.service)" = active ] || { systemctl status hsd.service --no-pager || true; die "hsd.service is not active after boot"; }
unit_path=$(prop hsd.service FragmentPath)
owner=$(dpkg -S "$unit_path" 2>/dev/null | cut -d: -f1)
[ "$owner" = hsd ] || die "hsd.service comes from $unit_path (package '${owner:-none}'), not the .deb"
exec_start=$(prop hsd.service ExecStart)
case "$exec_start" in *"path=/usr/sbin/hsd "*) ;; *) die "ExecStart is not /usr/sbin/hsd: $exec_start" ;; esac
[ "$(prop hsd.service Type)" = notify ] || die "hsd.service is Type=$(prop hsd.service Type), not notify"
[ "$(prop hsd.service NRestarts)" = 0 ] || die "hsd.service restarted $(prop hsd.service NRestarts) time(s) during boot"
check "hsd.service active from $unit_path (package hsd $(dpkg-query -W -f '${Version}' hsd)), Type=notify, no restart"
pid=$(prop hsd.service MainPID)
inv=$(prop hsd.service InvocationID)
python3 journal.py hsd.service "$inv" > /tmp/boot-journal.txt
sed 's/^/journal: /' /tmp/boot-journal.txt

say "--- READY=1 only once the group is joined"
ready_at=$(awk '/ hsd ready: listening/ { print $1; exit }' /tmp/boot-journal.txt)
started_at=$(awk '$3 == "systemd" && / Started / { print $1; exit }' /tmp/boot-journal.txt)
[ -n "$ready_at" ] || die "hsd logged no 'hsd ready' line in this invocation"
[ -n "$started_at" ] || die "systemd logged no 'Started' line for hsd.service"
[ "$ready_at" -le "$started_at" ] || die "systemd reported hsd.service started at $started_at, before hsd joined the group ($ready_at)"
active_at=$(prop hsd.service ActiveEnterTimestampMonotonic)
exec_at=$(prop hsd.service ExecMainStartTimestampMonotonic)
check "hsd joined the group and logged ready at ${ready_at} us; systemd: Started at ${started_at} us (exec at $exec_at, $(( (active_at - exec_at) / 1000 )) ms to READY)"

say "--- ordered before remote-fs-pre.target; the fstab mount came after"
prop hsd.service Before | tr ' ' '\n' | grep -qx remote-fs-pre.target || die "hsd.service is not Before=remote-fs-pre.target: $(prop hsd.service Before)"
pre_at=$(prop remote-fs-pre.target ActiveEnterTimestampMonotonic)
mount_at=$(prop "$mount_unit" InactiveExitTimestampMonotonic)
[ "$pre_at" -gt 0 ] && [ "$mount_at" -gt 0 ] || die "remote-fs-pre.target ($pre_at) or $mount_unit ($mount_at) never started"
[ "$active_at" -le "$pre_at" ] || die "remote-fs-pre.target was reached at $pre_at, before hsd.service was active ($active_at)"
[ "$pre_at" -le "$mount_at" ] || die "$mount_unit started at $mount_at, before remote-fs-pre.target ($pre_at)"
check "hsd.service active $active_at <= remote-fs-pre.target $pre_at <= $mount_unit started $mount_at (monotonic us)"

say "--- the fstab NFS mount, made by systemd at boot"
[ "$(prop "$mount_unit" ActiveState)" = active ] && [ "$(prop "$mount_unit" Result)" = success ] \
    || { systemctl status "$mount_unit" --no-pager || true; die "$mount_unit is $(prop "$mount_unit" ActiveState)/$(prop "$mount_unit" Result)"; }
grep -q " $BOOT_MOUNT nfs4 .*xprtsec=tls" /proc/mounts || die "/proc/mounts shows no xprtsec=tls mount on $BOOT_MOUNT: $(grep " $BOOT_MOUNT " /proc/mounts)"
boot_handshakes=$(grep -cE "$HS_OK" /tmp/boot-journal.txt || true)
[ "$boot_handshakes" -ge 2 ] || die "hsd logged $boot_handshakes successful handshakes at boot (the mount needs a client and a server one)"
grep -E "$HS_OK" /tmp/boot-journal.txt | grep -q " role=client " || die "no client handshake at boot"
grep -E "$HS_OK" /tmp/boot-journal.txt | grep -q " role=server " || die "no server handshake at boot"
roundtrip "$BOOT_MOUNT" 4
[ "$(tls_stat TlsCurrTxSw)" -ge 2 ] || die "tls_stat shows $(tls_stat TlsCurrTxSw) kTLS TX sockets with the boot mount up"
check "$mount_unit active (systemd, at boot): xprtsec=tls, $boot_handshakes handshakes before it, kTLS sockets $(tls_stat TlsCurrTxSw)"

say "--- the journal: hsd's identifier, its pid, priority info for successful handshakes"
bad=$(grep -E "$HS_LINE" /tmp/boot-journal.txt | awk -v pid="$pid" '$3 != "hsd" || $4 != pid' || true)
[ -z "$bad" ] || die "handshake lines not under identifier hsd / pid $pid: $bad"
bad=$(grep -E "$HS_OK" /tmp/boot-journal.txt | awk '$2 != 6' || true)
[ -z "$bad" ] || die "successful handshake lines not at priority 6 (info): $bad"
journalctl -u hsd.service --no-pager -o short-monotonic | grep -E "hsd\[$pid\]: .*handshake peer=" | head -2 | sed 's/^/  journalctl -u hsd: /'
[ "$(journalctl -u hsd.service --no-pager -o short-monotonic | grep -cE "hsd\[$pid\]: .*$HS_OK" || true)" -eq "$boot_handshakes" ] \
    || die "journalctl -u hsd does not show the $boot_handshakes handshake lines as hsd[$pid]"
check "journalctl -u hsd: $boot_handshakes handshake lines, identifier hsd, pid $pid, priority 6"

say "--- systemd-analyze security, on this systemd ($(systemctl --version | awk 'NR == 1 { print $2 }'))"
# "1.6 OK" (the value and the rating word; systemd adds an emoji after them)
exposure() { systemd-analyze security --no-pager "$1" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: //p' | tail -1 | awk '{ print $1, $2 }'; }
hsd_level=$(exposure hsd.service)
tlshd_level=$(exposure tlshd.service)
[ -n "$hsd_level" ] && [ -n "$tlshd_level" ] || die "systemd-analyze security printed no exposure (hsd '$hsd_level', tlshd '$tlshd_level')"
hsd_value=${hsd_level%% *}
awk -v v="$hsd_value" 'BEGIN { exit !(v <= 1.6) }' || die "hsd.service exposure $hsd_level: above 1.6"
case "$hsd_level" in *OK*) ;; *) die "hsd.service is rated '$hsd_level', not OK" ;; esac
[ "$(systemctl is-active hsd.service)" = active ] || die "hsd.service is not running while measured"
say "SECURITY guest=$(. /etc/os-release; echo "$VERSION_CODENAME") systemd=$(systemctl --version | awk 'NR == 1 { print $2 }') hsd.service=${hsd_level// /_} tlshd.service=${tlshd_level// /_}"
check "systemd-analyze security: hsd.service $hsd_level (running), ktls-utils' tlshd.service $tlshd_level"
say "PASS"
