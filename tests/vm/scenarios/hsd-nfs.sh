#!/bin/bash
# hsd-nfs: hsd is the kernel's handshake agent for NFSv4.2 over TLS on loopback, serving from the
# very tlshd config file tlshd-nfs gives tlshd (same path, same bytes, no [hsd] section):
# xprtsec=tls and xprtsec=mtls mounts carry 8 MiB each way, one log line per handshake with every
# field; an untrusted server certificate fails the mount and hsd keeps serving; hsd killed while
# idle and restarted serves the next mount; several mounts in parallel (several handshakes in
# flight).  hsd-nfs@tlslite runs it all on the tlslite backend (`hsd --backend tlslite`).
# variants: openssl tlslite
# limit: 900
set -eu
. ./_lib.sh

BACKEND=$(variant_backend)
CONF=/tmp/tlshd.conf  # the path and the generator tlshd-nfs uses
HSDLOG=/tmp/hsd.log
agent=

start_hsd() {
    : > "$HSDLOG"
    hsd --backend "$BACKEND" -s -c "$CONF" >> "$HSDLOG" 2>&1 &
    agent=$!
    for _ in $(seq 120); do
        grep -q "hsd ready" "$HSDLOG" && { say "hsd $agent ready"; return 0; }
        kill -0 "$agent" 2>/dev/null || { cat "$HSDLOG"; die "hsd exited at start"; }
        sleep 0.5
    done
    cat "$HSDLOG"; die "hsd did not report ready within 60 s"
}

handshake_lines() { grep -c "handshake peer=" "$HSDLOG" || true; }
ok_lines() { grep -c "handshake peer=.* status=0 " "$HSDLOG" || true; }

cleanup() {
    local rc=$?  # the scenario's verdict: cleanup must not change it
    for m in /mnt/hsd-*; do umount -f "$m" 2>/dev/null || true; done
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    nfs_server_stop
    sed 's/^/hsd: /' "$HSDLOG" 2>/dev/null || true
    exit $rc
}
trap cleanup EXIT

# mount_cycle MODE SERVER MOUNTPOINT MIB: mount, round-trip data, check kTLS and hsd's log, unmount
mount_cycle() {
    local tx0 rx0 lines0 t0 tx1 rx1 lines1
    tx0=$(tls_stat TlsTxSw); rx0=$(tls_stat TlsRxSw); lines0=$(handshake_lines)
    t0=$(date +%s%N)
    nfs_mount "$1" "$3" "$2" || die "mount -o xprtsec=$1 $2:/ failed"
    say "mount xprtsec=$1 $2 took $(ms_since "$t0") ms"
    grep -q " $3 nfs4 .*xprtsec=$1" /proc/mounts || die "/proc/mounts does not show xprtsec=$1 on $3"
    roundtrip "$3" "$4"
    umount "$3" || die "umount $3"
    tx1=$(tls_stat TlsTxSw); rx1=$(tls_stat TlsRxSw); lines1=$(handshake_lines)
    [ $((tx1 - tx0)) -ge 2 ] && [ $((rx1 - rx0)) -ge 2 ] || die "tls_stat TlsTxSw $tx0->$tx1 TlsRxSw $rx0->$rx1"
    # one log line per handshake: as many lines as kTLS sockets were installed
    [ $((lines1 - lines0)) -eq $((tx1 - tx0)) ] || die "hsd logged $((lines1 - lines0)) handshakes for $((tx1 - tx0)) kTLS sockets"
    check "xprtsec=$1: $((tx1 - tx0)) handshakes, TlsTxSw $tx0->$tx1, $((lines1 - lines0)) hsd log lines"
}

make_pki
agent_config "$CONF" server
config_fingerprint "$CONF" "hsd-nfs@$BACKEND"
if [ -f /hsdrun/results/tlshd-nfs.conf ]; then  # tlshd-nfs ran earlier in this boot
    cmp "$CONF" /hsdrun/results/tlshd-nfs.conf || die "hsd's config differs from the one tlshd-nfs gave tlshd"
    check "$CONF is byte for byte the file tlshd-nfs gave tlshd"
fi
hsd check -c "$CONF" > /tmp/hsd-check.out 2>&1 || { cat /tmp/hsd-check.out; die "hsd check -c $CONF failed"; }
if grep -q "warning:" /tmp/hsd-check.out; then cat /tmp/hsd-check.out; die "hsd check -c $CONF warned"; fi
check "hsd check -c $CONF: exit 0, no warning"
nfs_server_start
start_hsd

say "--- xprtsec=tls and xprtsec=mtls, 8 MiB each"
mount_cycle tls localhost /mnt/hsd-tls 8
mount_cycle mtls localhost /mnt/hsd-mtls 8
grep "handshake peer=" "$HSDLOG" | grep -q "role=client auth=x509 .*status=0 " || die "no client x509 handshake logged"
grep "handshake peer=" "$HSDLOG" | grep -q "role=server auth=x509 .*status=0 " || die "no server x509 handshake logged"

say "--- untrusted server certificate: the mount fails, hsd keeps serving"
agent_config "$CONF" rogue-server
kill -HUP "$agent"
for _ in $(seq 60); do grep -q "configuration reloaded" "$HSDLOG" && break; sleep 0.5; done
grep -q "configuration reloaded" "$HSDLOG" || die "hsd did not reload its configuration on SIGHUP"
failed0=$(grep -c "handshake peer=.*role=client .*status=13 " "$HSDLOG" || true)
t0=$(date +%s%N)
if nfs_mount tls /mnt/hsd-rogue localhost 60; then die "mount succeeded against an untrusted server certificate"; fi
say "mount against the untrusted certificate failed after $(ms_since "$t0") ms (figure, not asserted)"
failed1=$(grep -c "handshake peer=.*role=client .*status=13 " "$HSDLOG" || true)
[ "$failed1" -gt "$failed0" ] || die "hsd logged no client handshake failing with EACCES (13)"
grep "role=client .*status=13 " "$HSDLOG" | tail -1 | sed 's/^/  /'
kill -0 "$agent" || die "hsd died after the failed handshake"
agent_config "$CONF" server
kill -HUP "$agent"
sleep 2
mount_cycle tls localhost /mnt/hsd-after-rogue 1
grep "role=client .*status=13 " "$HSDLOG" | tail -1 | grep -q " backend=$BACKEND " \
    || die "the failed handshake was not logged with backend=$BACKEND"
check_hsd_log "$HSDLOG" "$BACKEND" "$BACKEND"  # the failed line too: every field

say "--- hsd killed while idle, restarted: the next mount works"
kill -9 "$agent"; wait "$agent" 2>/dev/null || true
start_hsd
mount_cycle tls localhost /mnt/hsd-restarted 1

say "--- four mounts in parallel (distinct server addresses: distinct connections)"
tx0=$(tls_stat TlsTxSw); ok0=$(ok_lines)
pids=()
for n in 2 3 4 5; do
    mode=tls; [ $((n % 2)) -eq 1 ] && mode=mtls
    nfs_mount "$mode" "/mnt/hsd-par$n" "127.0.0.$n" 120 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || die "a parallel mount failed"; done
for n in 2 3 4 5; do
    grep -q " /mnt/hsd-par$n nfs4 " /proc/mounts || die "/mnt/hsd-par$n is not mounted"
    echo "parallel $n" > "/mnt/hsd-par$n/hello.$n"
done
sync; echo 3 > /proc/sys/vm/drop_caches
for n in 2 3 4 5; do
    [ "$(cat "/mnt/hsd-par$n/hello.$n")" = "parallel $n" ] || die "read back over /mnt/hsd-par$n differs"
    rm -f "/mnt/hsd-par$n/hello.$n"; umount "/mnt/hsd-par$n" || die "umount /mnt/hsd-par$n"
done
tx1=$(tls_stat TlsTxSw); ok1=$(ok_lines)
[ $((tx1 - tx0)) -ge 8 ] || die "parallel mounts installed $((tx1 - tx0)) kTLS sockets, expected 8"
[ $((ok1 - ok0)) -eq $((tx1 - tx0)) ] || die "hsd logged $((ok1 - ok0)) successful handshakes for $((tx1 - tx0)) kTLS sockets"
check "4 parallel mounts: $((ok1 - ok0)) handshakes, all ok"
kill -0 "$agent" || die "hsd exited"
check_hsd_log "$HSDLOG" "$BACKEND" "$BACKEND"
say "PASS"
