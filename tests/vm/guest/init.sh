#!/bin/bash
# PID 1 in the guest (after the initramfs switched into the overlay root).
# Installs this checkout's hsd, runs each requested scenario with a time limit,
# writes one verdict per scenario into the run share and prints it on the console,
# then powers off.  Any early failure still ends in a power-off: the host never hangs.
[ -n "${BASH_VERSION:-}" ] || exec /bin/bash "$0" "$@"  # the initramfs starts us with sh
RUN=/hsdrun
export PATH=/opt/hsd-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1  # bytecode caches go to the tmpfs overlay
poweroff_now() { sync; echo o > /proc/sysrq-trigger; sleep 30; }
trap poweroff_now EXIT

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t configfs configfs /sys/kernel/config 2>/dev/null
ip link set lo up
hostname hsd-vm
echo "HSD-VM-BOOTED $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime)"

mkdir -p "$RUN/results"
t0=$(date +%s%N)
if ! python3 "$RUN/install_wheel.py" "$RUN"/dist/hsd-*.whl > "$RUN/results/install.log" 2>&1; then
    cat "$RUN/results/install.log"
    echo "HSD-VM-INSTALL-FAILED"
    exit 1
fi
echo "HSD-VM-INSTALLED hsd $(python3 -c 'import hsd; print(hsd.__version__)') in $(( ($(date +%s%N) - t0) / 1000000 )) ms"

while read -r name limit; do
    [ -n "$name" ] || continue
    # NAME@VARIANT: NAME's script with HSD_VARIANT=VARIANT (the scenario's backend, for example)
    base=${name%%@*}; variant=; [ "$base" = "$name" ] || variant=${name#*@}
    script="$RUN/scenarios/$base.sh"
    log="$RUN/results/$name.log"
    start=$(date +%s%N)
    echo "HSD-VM-START $name (limit ${limit}s)"
    (cd "$RUN/scenarios" && SCENARIO="$name" HSD_VARIANT="$variant" timeout -k 5 "$limit" bash "$script") 2>&1 \
        | while IFS= read -r line; do printf '[%s] %s\n' "$name" "$line"; done | tee "$log"
    rc=${PIPESTATUS[0]}
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    [ "$rc" = 124 ] && echo "[$name] TIMEOUT after ${limit}s" | tee -a "$log"
    echo "$rc $ms" > "$RUN/results/$name.rc"
    echo "HSD-VM-VERDICT $name $rc ${ms}ms"
    sync
done < "$RUN/scenarios.txt"
echo "HSD-VM-DONE"
