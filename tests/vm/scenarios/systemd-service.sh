#!/bin/bash
# systemd-service: operating hsd.service (the package's unit, under systemd as PID 1) the way an
# operator does.  `systemctl restart` returns only once hsd has joined the handshake group (its
# netlink socket is a member when systemctl returns, and a mount made right then works);
# `systemctl reload` after the server certificate file was replaced takes effect for the next
# mount (an untrusted certificate: the mount fails with EACCES, logged at priority warning; the
# good one back: it works again); `systemctl kill -s SIGKILL` -> systemd restarts hsd and the next
# mount works; `systemctl stop` with three handshakes in flight (an NVMe connect and two NFS
# mounts towards silent peers, each ClientHello seen) gives every one its DONE, after hsd's
# SIGTERM, and exits 0 before TimeoutStopSec.
# systemd-service@tlslite runs it all with `[hsd] backend=tlslite` in the unit's config file.
# variants: openssl tlslite
# limit: 600
set -eu
. ./_lib.sh

BACKEND=$(variant_backend)
PKI=$BOOT_PKI
prop() { systemctl show -P "$2" "$1"; }
peer_pid=
cleanup() {
    local rc=$?
    for m in /mnt/svc-*; do umount -f "$m" 2>/dev/null || true; done
    [ -n "$peer_pid" ] && kill "$peer_pid" 2>/dev/null || true
    nvme disconnect-all >/dev/null 2>&1 || true
    systemctl stop hsd.service nfs-server.service 2>/dev/null || true
    [ -e "$PKI/server.pem.good" ] && cp "$PKI/server.pem.good" "$PKI/server.pem" && cp "$PKI/server.key.good" "$PKI/server.key"
    boot_conf_restore
    exit $rc
}
trap cleanup EXIT

# journal_now: this invocation of hsd.service, as journal.py prints it
journal_now() { python3 journal.py hsd.service "$(prop hsd.service InvocationID)"; }
# in_group PID: hsd's generic netlink socket is subscribed to a multicast group (/proc/net/netlink)
in_group() {
    local inodes
    inodes=$(ls -l /proc/"$1"/fd 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\]/\1/p')
    awk -v list=" $(echo $inodes) " 'NR > 1 && $2 == 16 && $4 != "00000000" && index(list, " " $NF " ") { found = 1 }
        END { exit !found }' /proc/net/netlink
}
# mount_now MODE MOUNTPOINT: mount at once, round trip, unmount; returns mount's status
mount_now() {
    nfs_mount "$1" "$2" localhost 90 || return $?
    roundtrip "$2" 1
    umount "$2"
}

boot_conf_install
[ "$BACKEND" = openssl ] || printf '\n[hsd]\nbackend=%s\n' "$BACKEND" >> "$BOOT_CONF"
cp "$PKI/server.pem" "$PKI/server.pem.good"; cp "$PKI/server.key" "$PKI/server.key.good"
systemctl start nfs-server.service || die "nfs-server.service did not start"

say "--- systemctl restart returns once the group is joined"
t0=$(date +%s%N)
systemctl restart hsd.service || die "systemctl restart hsd failed"
pid=$(prop hsd.service MainPID)
in_group "$pid" || die "systemctl restart returned but hsd ($pid) has not joined a netlink group"
check "systemctl restart took $(ms_since "$t0") ms; on return hsd $pid is in the handshake group"
mount_now tls /mnt/svc-restart || die "the mount right after systemctl restart failed"
journal_now | grep -E "$HS_OK" | grep -q " backend=$BACKEND " || die "no successful handshake on backend $BACKEND"
check "mount right after restart: works, handshakes on backend=$BACKEND"

say "--- systemctl reload after the server certificate file was replaced"
cp "$PKI/rogue-server.pem" "$PKI/server.pem"; cp "$PKI/rogue-server.key" "$PKI/server.key"
before=$(journal_now | grep -c "configuration reloaded" || true)
systemctl reload hsd.service || die "systemctl reload hsd failed"
rc=0; mount_now tls /mnt/svc-reload || rc=$?
[ "$rc" -ne 0 ] || die "the mount worked with an untrusted server certificate after reload"
journal_now > /tmp/svc-journal.txt
[ "$(grep -c "configuration reloaded" /tmp/svc-journal.txt || true)" -gt "$before" ] || die "hsd logged no reload"
failed=$(grep -E "$HS_LINE" /tmp/svc-journal.txt | grep " status=13 (EACCES)" | tail -1)
[ -n "$failed" ] || die "no handshake failed with EACCES after the untrusted certificate was loaded"
[ "$(echo "$failed" | awk '{ print $2 }')" = 4 ] || die "a failed handshake was not logged at priority 4 (warning): $failed"
[ "$(echo "$failed" | awk '{ print $3 }')" = hsd ] || die "a failed handshake was not logged as hsd: $failed"
check "after reload with an untrusted certificate: mount fails (exit $rc), ${failed#*handshake }, priority 4"
cp "$PKI/server.pem.good" "$PKI/server.pem"; cp "$PKI/server.key.good" "$PKI/server.key"
systemctl reload hsd.service || die "systemctl reload hsd failed"
mount_now tls /mnt/svc-reload || die "the mount failed after the good certificate was back and hsd reloaded"
[ "$(prop hsd.service MainPID)" = "$pid" ] || die "reload restarted hsd ($pid -> $(prop hsd.service MainPID))"
check "the good certificate back, reload: the next mount works, same process $pid"

say "--- systemctl kill -s SIGKILL: systemd restarts hsd, the next mount works"
restarts=$(prop hsd.service NRestarts)
systemctl kill -s SIGKILL hsd.service
for _ in $(seq 180); do
    [ "$(prop hsd.service NRestarts)" -gt "$restarts" ] && [ "$(systemctl is-active hsd.service)" = active ] && break
    sleep 0.5
done
[ "$(systemctl is-active hsd.service)" = active ] && [ "$(prop hsd.service NRestarts)" -gt "$restarts" ] \
    || die "hsd.service was not restarted: $(systemctl is-active hsd.service), NRestarts $(prop hsd.service NRestarts)"
new_pid=$(prop hsd.service MainPID)
[ "$new_pid" != "$pid" ] || die "MainPID did not change after SIGKILL"
mount_now mtls /mnt/svc-kill || die "the first mount after systemd restarted hsd failed"
check "killed $pid, systemd restarted it as $new_pid (NRestarts $restarts -> $(prop hsd.service NRestarts)), xprtsec=mtls mount works"

say "--- systemctl stop with handshakes in flight: every one gets its DONE"
# three handshakes from two consumers towards silent peers: an NVMe/TCP connect (one at a time:
# the fabrics driver connects controllers one after the other) and two NFS mounts whose RPC
# STARTTLS probe is answered; stop hsd once all three ClientHellos arrived
# nvme-tcp first: it brings the kernel's .nvme keyring the PSK goes into
for m in tls nvme-tcp nvme-fabrics; do modprobe "$m" || die "modprobe $m"; done
nvme_psk_insert
# the kernel's NVMe handshake timeout (hsd's deadline) from 10 to 20 s: room under emulation,
# and still below TimeoutStopSec=30s with hsd's grace
timeout_param=/sys/module/nvme_tcp/parameters/tls_handshake_timeout
old_timeout=$(cat "$timeout_param" 2>/dev/null || echo 10)
echo 20 > "$timeout_param" 2>/dev/null || say "cannot raise $timeout_param (stays $old_timeout s)"
python3 -u silent_peer.py raw:4431 rpc:20049 > /tmp/silent.out 2>&1 & peer_pid=$!
for _ in $(seq 60); do grep -q LISTENING /tmp/silent.out && break; sleep 0.5; done
grep -q LISTENING /tmp/silent.out || { cat /tmp/silent.out; die "the silent peers did not start"; }
peers="127.0.0.1:4431 127.0.0.2:20049 127.0.0.3:20049"
(nvme connect -t tcp -a 127.0.0.1 -s 4431 -n "$SUBNQN" --hostnqn="$HOSTNQN" --tls > /tmp/consumer.4431 2>&1; echo "rc=$?" >> /tmp/consumer.4431) &
consumers=$!
for addr in 127.0.0.2 127.0.0.3; do
    mkdir -p "/mnt/svc-silent-$addr"
    (timeout 120 mount -t nfs4 -o "xprtsec=tls,vers=4.2,proto=tcp,port=20049,retry=0" "$addr:/" "/mnt/svc-silent-$addr"         > "/tmp/consumer.$addr" 2>&1; echo "rc=$?" >> "/tmp/consumer.$addr") &
    consumers="$consumers $!"
done
for _ in $(seq 120); do [ "$(grep -c CLIENTHELLO /tmp/silent.out || true)" -ge 3 ] && break; sleep 0.25; done
stop_pid=$(prop hsd.service MainPID)
inv=$(prop hsd.service InvocationID)
t0=$(date +%s%N)
systemctl stop hsd.service
took=$(ms_since "$t0")
echo "$old_timeout" > "$timeout_param" 2>/dev/null || true
[ "$(grep -c CLIENTHELLO /tmp/silent.out || true)" -ge 3 ] || { cat /tmp/silent.out; die "hsd had not started all three handshakes"; }
check "in flight when stopped: $(grep CLIENTHELLO /tmp/silent.out | awk '{ print $3 }' | tr '\n' ' ')"
python3 journal.py hsd.service "$inv" > /tmp/stop-journal.txt
sed 's/^/journal: /' /tmp/stop-journal.txt | tail -8
sigterm_at=$(awk '/received SIGTERM: finishing in-flight handshakes/ { print $1; exit }' /tmp/stop-journal.txt)
[ -n "$sigterm_at" ] || die "hsd did not log its SIGTERM"
for peer in $peers; do
    grep -q "CLIENTHELLO [0-9]* $peer " /tmp/silent.out || die "no ClientHello from hsd towards $peer"
    line=$(grep -E "$HS_LINE" /tmp/stop-journal.txt | grep "peer=$peer " || true)
    [ -n "$line" ] || die "the handshake towards $peer got no DONE (no handshake line)"
    # in flight at the stop: its DONE line comes after hsd received SIGTERM
    [ "$(echo "$line" | awk '{ print $1 }')" -ge "$sigterm_at" ] || die "the handshake towards $peer had ended before the stop: $line"
    check "in flight at stop, $peer: ${line#*handshake }"
done
[ "$(prop hsd.service Result)" = success ] || die "hsd.service stopped with Result=$(prop hsd.service Result)"
[ "$(prop hsd.service ExecMainCode)" = 1 ] && [ "$(prop hsd.service ExecMainStatus)" = 0 ] \
    || die "hsd did not exit 0 by itself: code $(prop hsd.service ExecMainCode) status $(prop hsd.service ExecMainStatus)"
if grep -q "still in its plugin when stopping\|stuck in a plugin" /tmp/stop-journal.txt; then die "hsd abandoned a handshake at stop"; fi
for c in $consumers; do wait "$c" || true; done
for f in /tmp/consumer.*; do grep -q "^rc=0$" "$f" && die "a consumer of a silent peer succeeded: $f: $(cat "$f")"; done
check "systemctl stop took $took ms: hsd $stop_pid exited 0 (Result=success), every in-flight handshake logged its DONE"
say "PASS"
