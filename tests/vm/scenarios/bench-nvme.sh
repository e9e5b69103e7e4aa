#!/bin/bash
# bench-nvme: N NVMe/TCP TLS (PSK) connect/disconnect cycles per agent, hsd (--backend openssl)
# then the reference tlshd, in the same boot against the same nvmet target.  Every connect runs
# one client and one server handshake per queue (admin + I/O queues).  Emulation makes absolute
# times meaningless: the figure that counts is the hsd/tlshd ratio.  Prints figures (ms per cycle,
# per-handshake time from each agent's log); the verdict only says that every cycle connected and
# disconnected, never how fast.  HSD_VM_BENCH_CYCLES on the host sets N (default 10: a cycle is
# about a second, so more of them steady the ratio cheaply).
# limit: 600
set -eu
. ./_lib.sh
CYCLES=10
[ -f /hsdrun/bench_cycles ] && CYCLES=$(cat /hsdrun/bench_cycles)
agent=

cleanup() {
    local rc=$?
    nvme_target_stop
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    exit $rc
}
trap cleanup EXIT

make_pki
agent_config /tmp/bench-nvme.conf server
nvme_target_start
nvme_psk_insert

# cycle NAME I: connect (the kernel returns once every queue's handshakes are done), check the
# controller is live, disconnect; sets CYCLE_MS (not a $(...) subshell: die must end the scenario)
cycle() {
    local t0 out
    t0=$(date +%s%N)
    nvme_tls_connect || { cat /tmp/nvme-connect.out; dmesg | tail -20; die "$1: connect $2 failed"; }
    grep -qx "$SUBNQN" /sys/class/nvme-subsystem/nvme-subsys*/subsysnqn 2>/dev/null \
        || die "$1: connect $2 returned 0 but no controller of $SUBNQN is there"
    out=$(nvme disconnect -n "$SUBNQN" 2>&1) || die "$1: disconnect $2 failed: $out"
    CYCLE_MS=$(ms_since "$t0")
    case "$out" in *"disconnected 1 controller"*) ;; *) die "$1: disconnect $2: $out";; esac
}

declare -A mean hs_mean handshakes
for name in hsd tlshd; do
    log=/tmp/bench-nvme-$name.log
    : > "$log"
    if [ "$name" = tlshd ]; then
        tlshd_stamped "$log" /tmp/bench-nvme.conf; agent=$!
        sleep 1
    else
        hsd --backend openssl -s -c /tmp/bench-nvme.conf > "$log" 2>&1 & agent=$!
        hsd_wait_ready "$log"
    fi
    kill -0 "$agent" || die "$name exited: $(cat "$log")"
    # one warm-up cycle per agent, not counted: first-use costs (imports, context setup) apart
    cycle "$name" 0; say "$name warm-up cycle: $CYCLE_MS ms"
    warm=$(if [ "$name" = hsd ]; then handshake_ms_hsd "$log"; else handshake_ms_tlshd "$log"; fi | wc -l)
    sum=0
    for i in $(seq "$CYCLES"); do
        cycle "$name" "$i"; sum=$((sum + CYCLE_MS))
        say "$name cycle $i: $CYCLE_MS ms"
    done
    kill -0 "$agent" || die "$name exited during the cycles"
    if [ "$name" = hsd ]; then times=$(handshake_ms_hsd "$log"); else times=$(handshake_ms_tlshd "$log"); fi
    total=$(echo "$times" | grep -c . || true)
    per=$((total / (CYCLES + 1)))
    [ "$per" -ge 2 ] && [ "$total" -eq $((per * (CYCLES + 1))) ] \
        || die "$name: $total successful handshakes for $((CYCLES + 1)) connects (expected the same number per connect)"
    mean[$name]=$((sum / CYCLES))
    hs_mean[$name]=$(echo "$times" | tail -n +$((warm + 1)) | mean_of)
    handshakes[$name]=$per
    say "$name: $CYCLES cycles, mean ${mean[$name]} ms per connect+disconnect, $per handshakes per connect, mean ${hs_mean[$name]} ms per handshake (warm-up excluded)"
    kill "$agent"; wait "$agent" 2>/dev/null || true; agent=
    [ "$name" = hsd ] && { sed 's/^/hsd: /' "$log" | grep "handshake peer=" | tail -2 || true; }
done
check "every cycle connected and disconnected with both agents"
ratio=$(awk -v h="${mean[hsd]}" -v t="${mean[tlshd]}" 'BEGIN { printf "%.2f", h / t }')
hs_ratio=$(awk -v h="${hs_mean[hsd]}" -v t="${hs_mean[tlshd]}" 'BEGIN { if (t > 0) printf "%.2f", h / t; else printf "-" }')
echo "BENCH nvme-connect-disconnect cycles=$CYCLES handshakes_per_connect=${handshakes[hsd]} tlshd_mean_ms=${mean[tlshd]} hsd_mean_ms=${mean[hsd]} ratio_hsd_over_tlshd=$ratio tlshd_handshake_ms=${hs_mean[tlshd]} hsd_handshake_ms=${hs_mean[hsd]} handshake_ratio_hsd_over_tlshd=$hs_ratio"
say "PASS"
