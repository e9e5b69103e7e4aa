#!/bin/bash
# nvme-psk: NVMe/TCP with TLS 1.3 PSK on loopback, hsd serving both the host's client PSK and
# the target's (nvmet) server PSK handshakes: connect, 8 MiB O_DIRECT write and read back, kTLS
# on every queue, one hsd log line per handshake, disconnect.  nvme-psk@tlslite runs both sides on
# the tlslite backend; nvme-psk@mixed keeps the default openssl and adds `[hsd.backends]
# client.psk=tlslite`: the host's handshakes on tlslite, nvmet's on openssl, in one hsd process.
# nvme-psk@tlshd runs the very same steps with the reference tlshd as the agent: it proves the
# scenario itself and gives reference figures (connect time, per-handshake time).
# variants: openssl tlslite mixed tlshd
# limit: 600
set -eu
. ./_lib.sh

AGENT=hsd
[ "${HSD_VARIANT:-}" = tlshd ] && AGENT=tlshd
if [ "$AGENT" = hsd ]; then
    BACKEND=$(variant_backend)
    CLIENT_BACKEND=$BACKEND SERVER_BACKEND=$BACKEND
    [ "${HSD_VARIANT:-}" = mixed ] && CLIENT_BACKEND=tlslite
fi
CONF=/tmp/nvme-agent.conf
LOG=/tmp/nvme-agent.log
agent=

cleanup() {
    local rc=$?
    nvme_target_stop
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    sed "s/^/$AGENT: /" "$LOG" 2>/dev/null | grep -v "pyroute2\|await data\|enqueue\|message {\|yield {\|get: 0" || true
    exit $rc
}
trap cleanup EXIT

make_pki
agent_config "$CONF" server
if [ "${HSD_VARIANT:-}" = mixed ]; then
    printf '\n[hsd.backends]\nclient.psk=%s\n' "$CLIENT_BACKEND" >> "$CONF"
    hsd check -c "$CONF" > /tmp/hsd-check.out 2>&1 || { cat /tmp/hsd-check.out; die "hsd check -c $CONF"; }
    grep -q "^\[hsd.backends\] client.psk=$CLIENT_BACKEND$" /tmp/hsd-check.out \
        || { cat /tmp/hsd-check.out; die "hsd check does not show the client.psk override"; }
    check "per-mode override: default backend $BACKEND, [hsd.backends] client.psk=$CLIENT_BACKEND"
fi
nvme_target_start   # loads tls/nvme modules: the .nvme keyring exists from here on
nvme_psk_insert     # before the agent starts: tlshd's server finds the PSK only then
: > "$LOG"
if [ "$AGENT" = tlshd ]; then
    tlshd_stamped "$LOG" "$CONF"; agent=$!
else
    hsd --backend "$BACKEND" -s -c "$CONF" >> "$LOG" 2>&1 & agent=$!
fi

if [ "$AGENT" = hsd ]; then
    hsd_wait_ready "$LOG"
else
    sleep 1; kill -0 "$agent" || die "tlshd exited: $(cat "$LOG")"
fi

tx0=$(tls_stat TlsTxSw)
t0=$(date +%s%N)
nvme_tls_connect || { cat /tmp/nvme-connect.out; dmesg | tail -20; die "nvme connect --tls failed"; }
connect_ms=$(ms_since "$t0")
say "nvme connect --tls took $connect_ms ms"
dev=
for _ in $(seq 60); do
    dev=$(ls /dev/nvme*n1 2>/dev/null | head -1); [ -n "$dev" ] && break; sleep 0.5
done
[ -n "$dev" ] || die "no namespace block device appeared"
head -c 8388608 /dev/urandom > /tmp/nvme-src
dd if=/tmp/nvme-src of="$dev" bs=1M count=8 oflag=direct status=none || die "write to $dev"
want=$(sha256sum < /tmp/nvme-src | cut -d' ' -f1)
got=$(dd if="$dev" bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] || die "8 MiB read back from $dev differ"
check "8 MiB O_DIRECT written to $dev and read back identical"
cur=$(tls_stat TlsCurrTxSw); tx1=$(tls_stat TlsTxSw)
[ "$cur" -ge 2 ] || die "only $cur kTLS sockets open (expected admin + I/O queues on both sides)"
if [ "$AGENT" = hsd ]; then
    lines=$(grep -c "handshake peer=.*status=0 " "$LOG" || true)
    [ "$lines" -eq $((tx1 - tx0)) ] || die "hsd logged $lines successful handshakes for $((tx1 - tx0)) kTLS sockets"
    grep -q "role=client auth=psk .*status=0 " "$LOG" || die "no client PSK handshake logged"
    grep -q "role=server auth=psk .*status=0 " "$LOG" || die "no server PSK handshake logged"
    check "$cur kTLS sockets open, $lines PSK handshakes by hsd (client and server)"
    check_hsd_log "$LOG" "$CLIENT_BACKEND" "$SERVER_BACKEND"
    times=$(handshake_ms_hsd "$LOG")
else
    lines=$(grep -cE "$TLSHD_OK" "$LOG" || true)
    [ "$lines" -eq $((tx1 - tx0)) ] || die "tlshd logged $lines successful handshakes for $((tx1 - tx0)) kTLS sockets"
    check "$cur kTLS sockets open, $lines PSK handshakes by tlshd (client and server)"
    times=$(handshake_ms_tlshd "$LOG")
fi
say "AGENT-FIGURES agent=$AGENT connect_ms=$connect_ms handshakes=$lines handshake_ms=$(echo "$times" | tr '\n' ' ' | sed 's/ $//; s/ /,/g') mean_ms=$(echo "$times" | mean_of)"
nvme disconnect -n "$SUBNQN" > /dev/null || die "nvme disconnect"
kill -0 "$agent" || die "$AGENT exited"
say "PASS"
