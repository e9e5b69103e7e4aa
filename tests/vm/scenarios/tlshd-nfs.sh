#!/bin/bash
# tlshd-nfs: the reference agent (tlshd) serves NFSv4.2 over TLS on loopback, xprtsec=tls then
# xprtsec=mtls: proves the kernel, the harness and the test PKI before hsd is involved.  Its config
# file (_lib.sh agent_config) is the one hsd-nfs then gives hsd unchanged.
# limit: 300
set -eu
. ./_lib.sh

make_pki
agent_config /tmp/tlshd.conf server
config_fingerprint /tmp/tlshd.conf tlshd-nfs
# hsd-nfs compares the file it serves from with this one, byte for byte (paths only, no key material)
cp /tmp/tlshd.conf /hsdrun/results/tlshd-nfs.conf
nfs_server_start
tlshd -s -c /tmp/tlshd.conf > /tmp/tlshd.log 2>&1 &
agent=$!
cleanup() {
    local rc=$?  # the scenario's verdict: cleanup must not change it
    umount -f /mnt/tls /mnt/mtls 2>/dev/null || true
    kill $agent 2>/dev/null || true
    nfs_server_stop
    sed "s/^/tlshd: /" /tmp/tlshd.log
    exit $rc
}
trap cleanup EXIT
sleep 2

for mode in tls mtls; do
    tx0=$(tls_stat TlsTxSw); rx0=$(tls_stat TlsRxSw)
    t0=$(date +%s%N)
    nfs_mount "$mode" "/mnt/$mode" || die "mount -o xprtsec=$mode failed"
    say "mount xprtsec=$mode took $(ms_since "$t0") ms"
    grep -q "/mnt/$mode nfs4 .*xprtsec=$mode" /proc/mounts || die "/proc/mounts does not show xprtsec=$mode"
    roundtrip "/mnt/$mode" 8
    tx1=$(tls_stat TlsTxSw); rx1=$(tls_stat TlsRxSw)
    # one kTLS socket on each side of the loopback connection
    [ $((tx1 - tx0)) -ge 2 ] && [ $((rx1 - rx0)) -ge 2 ] || die "tls_stat TlsTxSw $tx0->$tx1 TlsRxSw $rx0->$rx1"
    check "xprtsec=$mode: kTLS sockets TlsTxSw $tx0->$tx1 TlsRxSw $rx0->$rx1"
    umount "/mnt/$mode" || die "umount /mnt/$mode"
done
kill -0 $agent || die "tlshd exited"
say "PASS"
