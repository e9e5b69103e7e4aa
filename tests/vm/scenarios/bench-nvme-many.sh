#!/bin/bash
# bench-nvme-many: many handshakes at once.  CONTROLLERS NVMe/TCP TLS (PSK) controllers, one per
# subsystem, connect at the same time, each with as many queues as the guest allows (I/O queues =
# online CPUs, the kernel's cap, plus as many write queues); every queue is its own client and
# server handshake, so one cycle is CONTROLLERS x queues x 2 handshakes with CONTROLLERS x 2 in
# flight at once (the host sets a controller's queues up one after another).  N cycles per agent in
# the same boot against the same nvmet target: hsd as packaged (one process), hsd with --workers
# set to the CPU count, then the reference tlshd (a child process per handshake).  Emulation makes
# absolute times meaningless: the figures that count are the hsd/tlshd ratios.  The verdict only
# says that every connect and disconnect worked with every agent, never how fast.
# HSD_VM_BENCH_CYCLES on the host sets N (default 4: a cycle is about 12 s under emulation).
# limit: 900
set -eu
. ./_lib.sh
CYCLES=4
[ -f /hsdrun/bench_cycles ] && CYCLES=$(cat /hsdrun/bench_cycles)
CONTROLLERS=4
CPUS=$(nproc)
QUEUES=$((1 + 2 * CPUS))  # admin + I/O + write queues of one controller
agent=
subsystems=()
for i in $(seq "$CONTROLLERS"); do subsystems+=("$SUBNQN-many$i"); done

cleanup() {
    local rc=$? s
    for s in "${subsystems[@]}"; do nvme_subsystem_remove "$s"; done  # off the port before the port goes
    nvme_target_stop
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    exit $rc
}
trap cleanup EXIT

make_pki
agent_config /tmp/bench-many.conf server
nvme_target_start
# one more subsystem per controller on the same TLS-only port, each with its own namespace and PSK
for s in "${subsystems[@]}"; do
    nvme_subsystem_add "$s" "/tmp/nvme-$s.img" 16M
    ln -s "$NVMET/subsystems/$s" "$NVMET/ports/1/subsystems/$s"
    nvme_psk_insert "$s"
done
check "$CONTROLLERS subsystems on the TLS port, a retained PSK each; $QUEUES queues per controller ($CPUS CPUs)"

# cycle NAME I: every controller connects at once (each connect returns once all its queues'
# handshakes are done), every controller is checked present, then all disconnect; sets
# CYCLE_MS (not a $(...) subshell: die must end the scenario)
cycle() {
    local t0 s n pids=() failed=0
    t0=$(date +%s%N)
    for n in $(seq "$CONTROLLERS"); do
        s=${subsystems[$((n - 1))]}
        nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$s" --hostnqn="$HOSTNQN" --tls \
            --nr-io-queues="$CPUS" --nr-write-queues="$CPUS" > "/tmp/nvme-connect-$n.out" 2>&1 &
        pids+=($!)
    done
    for n in "${!pids[@]}"; do wait "${pids[$n]}" || { failed=1; cat "/tmp/nvme-connect-$((n + 1)).out"; }; done
    [ "$failed" = 0 ] || { dmesg | tail -20; die "$1: a connect of cycle $2 failed"; }
    for s in "${subsystems[@]}"; do
        grep -qx "$s" /sys/class/nvme-subsystem/nvme-subsys*/subsysnqn 2>/dev/null \
            || die "$1: cycle $2: connect returned 0 but no controller of $s is there"
    done
    for s in "${subsystems[@]}"; do
        out=$(nvme disconnect -n "$s" 2>&1) || die "$1: disconnect of $s in cycle $2 failed: $out"
        case "$out" in *"disconnected 1 controller"*) ;; *) die "$1: disconnect $s cycle $2: $out";; esac
    done
    CYCLE_MS=$(ms_since "$t0")
}

declare -A mean hs_mean handshakes
for name in hsd hsd-workers tlshd; do
    log=/tmp/bench-many-$name.log
    : > "$log"
    case "$name" in
        tlshd) tlshd_stamped "$log" /tmp/bench-many.conf; agent=$!; sleep 1 ;;
        hsd) hsd --backend openssl -s -c /tmp/bench-many.conf > "$log" 2>&1 & agent=$! ;;
        hsd-workers) hsd --backend openssl --workers "$CPUS" -s -c /tmp/bench-many.conf > "$log" 2>&1 & agent=$! ;;
    esac
    [ "$name" = tlshd ] || hsd_wait_ready "$log"
    kill -0 "$agent" || die "$name exited: $(cat "$log")"
    cycle "$name" 0; say "$name warm-up cycle: $CYCLE_MS ms"
    agent_times() { if [ "$name" = tlshd ]; then handshake_ms_tlshd "$log"; else handshake_ms_hsd "$log"; fi; }
    warm=$(agent_times | wc -l)
    sum=0
    for i in $(seq "$CYCLES"); do
        cycle "$name" "$i"; sum=$((sum + CYCLE_MS))
        say "$name cycle $i: $CYCLE_MS ms"
    done
    kill -0 "$agent" || die "$name exited during the cycles"
    total=$(agent_times | grep -c . || true)
    expected=$(((CYCLES + 1) * CONTROLLERS * QUEUES * 2))
    [ "$total" -eq "$expected" ] \
        || die "$name: $total successful handshakes for $((CYCLES + 1)) cycles (expected $expected: $CONTROLLERS controllers x $QUEUES queues x 2 ends)"
    mean[$name]=$((sum / CYCLES))
    hs_mean[$name]=$(agent_times | tail -n +$((warm + 1)) | mean_of)
    handshakes[$name]=$((total / (CYCLES + 1)))
    say "$name: $CYCLES cycles, mean ${mean[$name]} ms per cycle, ${handshakes[$name]} handshakes per cycle, mean ${hs_mean[$name]} ms per handshake (warm-up excluded)"
    kill "$agent"; wait "$agent" 2>/dev/null || true; agent=
done
check "every cycle connected and disconnected all $CONTROLLERS controllers with every agent"
ratio() { awk -v h="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%.2f", h / t; else printf "-" }'; }
echo "BENCH nvme-many cycles=$CYCLES controllers=$CONTROLLERS queues_per_controller=$QUEUES handshakes_per_cycle=${handshakes[hsd]} tlshd_mean_ms=${mean[tlshd]} hsd_mean_ms=${mean[hsd]} ratio_hsd_over_tlshd=$(ratio "${mean[hsd]}" "${mean[tlshd]}") hsd_workers_mean_ms=${mean[hsd-workers]} ratio_hsd_workers_over_tlshd=$(ratio "${mean[hsd-workers]}" "${mean[tlshd]}") tlshd_handshake_ms=${hs_mean[tlshd]} hsd_handshake_ms=${hs_mean[hsd]} hsd_workers_handshake_ms=${hs_mean[hsd-workers]}"
say "PASS"
