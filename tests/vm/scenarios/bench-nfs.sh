#!/bin/bash
# bench-nfs: N NFSv4.2 xprtsec=tls mount/umount cycles per agent, tlshd then hsd in the same boot
# (emulation makes absolute times meaningless: compare the two).  Prints figures; the verdict
# only says that every cycle worked, never how fast.  HSD_VM_BENCH_CYCLES on the host sets N.
# limit: 900
set -eu
. ./_lib.sh
CYCLES=5
[ -f /hsdrun/bench_cycles ] && CYCLES=$(cat /hsdrun/bench_cycles)
agent=

cleanup() {
    local rc=$?
    umount -f /mnt/bench 2>/dev/null || true
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    nfs_server_stop
    exit $rc
}
trap cleanup EXIT

make_pki
agent_config /tmp/bench.conf server
nfs_server_start
# one warm-up mount with tlshd so that neither agent pays the grace period or module loading
declare -A total
for name in tlshd hsd; do
    log=/tmp/bench-$name.log
    if [ "$name" = tlshd ]; then tlshd -s -c /tmp/bench.conf > "$log" 2>&1 & agent=$!
    else hsd --backend openssl -c /tmp/bench.conf > "$log" 2>&1 & agent=$!; fi
    for _ in $(seq 120); do
        if [ "$name" = tlshd ] || grep -q "hsd ready" "$log"; then break; fi
        sleep 0.5
    done
    sleep 2
    if [ "$name" = tlshd ]; then nfs_mount tls /mnt/bench || die "warm-up mount"; umount /mnt/bench; fi
    sum=0
    for i in $(seq "$CYCLES"); do
        t0=$(date +%s%N)
        nfs_mount tls /mnt/bench || die "$name: mount $i failed"
        umount /mnt/bench || die "$name: umount $i failed"
        ms=$(ms_since "$t0"); sum=$((sum + ms))
        say "$name cycle $i: ${ms} ms"
    done
    total[$name]=$sum
    say "$name: $CYCLES cycles, mean $((sum / CYCLES)) ms per mount+umount"
    kill "$agent"; wait "$agent" 2>/dev/null || true; agent=
done
ratio=$(awk -v h="${total[hsd]}" -v t="${total[tlshd]}" 'BEGIN { printf "%.2f", h / t }')
echo "BENCH nfs-mount-umount cycles=$CYCLES tlshd_mean_ms=$((total[tlshd] / CYCLES)) hsd_mean_ms=$((total[hsd] / CYCLES)) ratio_hsd_over_tlshd=$ratio"
say "PASS"
