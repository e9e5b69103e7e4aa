#!/bin/bash
# nvme-psk: NVMe/TCP with TLS 1.3 PSK on loopback, hsd serving both the host's client PSK and
# the target's (nvmet) server PSK handshakes: connect, 8 MiB O_DIRECT write and read back, kTLS
# on every queue, one hsd log line per handshake, disconnect.  nvme-psk@tlslite runs both sides on
# the tlslite backend; nvme-psk@mixed keeps the default openssl and adds `[hsd.backends]
# client.psk=tlslite`: the host's handshakes on tlslite, nvmet's on openssl, in one hsd process.
# variants: openssl tlslite mixed
# limit: 600
set -eu
. ./_lib.sh

BACKEND=$(variant_backend)
CLIENT_BACKEND=$BACKEND SERVER_BACKEND=$BACKEND
[ "${HSD_VARIANT:-}" = mixed ] && CLIENT_BACKEND=tlslite

SUBNQN=nqn.2014-08.org.hsd:vm-subsystem
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:9d4a1c52-1a53-4c8e-9a5e-6f1f0a9f2b11
CFS=/sys/kernel/config/nvmet
CONF=/tmp/hsd-nvme.conf
HSDLOG=/tmp/hsd-nvme.log
agent=

cleanup() {
    local rc=$?
    nvme disconnect -n "$SUBNQN" >/dev/null 2>&1 || true
    rm -f "$CFS/ports/1/subsystems/$SUBNQN" 2>/dev/null || true
    rmdir "$CFS/ports/1" 2>/dev/null || true
    [ -d "$CFS/subsystems/$SUBNQN" ] && { echo 0 > "$CFS/subsystems/$SUBNQN/namespaces/1/enable" 2>/dev/null
        rmdir "$CFS/subsystems/$SUBNQN/namespaces/1" "$CFS/subsystems/$SUBNQN" 2>/dev/null; } || true
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    sed 's/^/hsd: /' "$HSDLOG" 2>/dev/null | grep -v "pyroute2\|await data\|enqueue\|message {\|yield {\|get: 0" || true
    exit $rc
}
trap cleanup EXIT

for m in tls nvmet nvmet-tcp nvme-tcp nvme-fabrics; do modprobe "$m" || die "modprobe $m"; done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
make_pki
agent_config "$CONF" server
if [ "${HSD_VARIANT:-}" = mixed ]; then
    printf '\n[hsd.backends]\nclient.psk=%s\n' "$CLIENT_BACKEND" >> "$CONF"
    hsd check -c "$CONF" > /tmp/hsd-check.out 2>&1 || { cat /tmp/hsd-check.out; die "hsd check -c $CONF"; }
    grep -q "^\[hsd.backends\] client.psk=$CLIENT_BACKEND$" /tmp/hsd-check.out \
        || { cat /tmp/hsd-check.out; die "hsd check does not show the client.psk override"; }
    check "per-mode override: default backend $BACKEND, [hsd.backends] client.psk=$CLIENT_BACKEND"
fi
: > "$HSDLOG"
hsd --backend "$BACKEND" -s -c "$CONF" >> "$HSDLOG" 2>&1 &
agent=$!

# the PSK both sides find in the .nvme keyring ("NVMe0R01 <hostnqn> <subnqn>")
nvme gen-tls-key --subsysnqn="$SUBNQN" --hostnqn="$HOSTNQN" --insert > /tmp/nvme-key.out 2>&1 \
    || { cat /tmp/nvme-key.out; die "nvme gen-tls-key --insert"; }
grep -q "NVMe0R01 $HOSTNQN $SUBNQN" /proc/keys || die "the retained PSK is not in a keyring: $(grep -i nvme /proc/keys)"
check "PSK inserted: $(grep -o "NVMe0R01 [^ ]* [^ ]*" /proc/keys | head -1 | cut -c1-40)..."

truncate -s 64M /tmp/nvme-backing.img
mkdir "$CFS/subsystems/$SUBNQN"
echo 1 > "$CFS/subsystems/$SUBNQN/attr_allow_any_host"
mkdir "$CFS/subsystems/$SUBNQN/namespaces/1"
echo /tmp/nvme-backing.img > "$CFS/subsystems/$SUBNQN/namespaces/1/device_path"
echo 1 > "$CFS/subsystems/$SUBNQN/namespaces/1/enable"
mkdir "$CFS/ports/1"
echo tcp > "$CFS/ports/1/addr_trtype"
echo ipv4 > "$CFS/ports/1/addr_adrfam"
echo 127.0.0.1 > "$CFS/ports/1/addr_traddr"
echo 4420 > "$CFS/ports/1/addr_trsvcid"
echo tls1.3 > "$CFS/ports/1/addr_tsas"
echo required > "$CFS/ports/1/addr_treq"
ln -s "$CFS/subsystems/$SUBNQN" "$CFS/ports/1/subsystems/$SUBNQN"
check "nvmet target on 127.0.0.1:4420 requires TLS 1.3"

for _ in $(seq 120); do grep -q "hsd ready" "$HSDLOG" && break; sleep 0.5; done
grep -q "hsd ready" "$HSDLOG" || { cat "$HSDLOG"; die "hsd not ready"; }

tx0=$(tls_stat TlsTxSw)
t0=$(date +%s%N)
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$SUBNQN" --hostnqn="$HOSTNQN" --tls > /tmp/nvme-connect.out 2>&1 \
    || { cat /tmp/nvme-connect.out; dmesg | tail -20; die "nvme connect --tls failed"; }
say "nvme connect --tls took $(ms_since "$t0") ms"
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
lines=$(grep -c "handshake peer=.*status=0 " "$HSDLOG" || true)
[ "$lines" -eq $((tx1 - tx0)) ] || die "hsd logged $lines successful handshakes for $((tx1 - tx0)) kTLS sockets"
grep -q "role=client auth=psk .*status=0 " "$HSDLOG" || die "no client PSK handshake logged"
grep -q "role=server auth=psk .*status=0 " "$HSDLOG" || die "no server PSK handshake logged"
check "$cur kTLS sockets open, $lines PSK handshakes by hsd (client and server)"
check_hsd_log "$HSDLOG" "$CLIENT_BACKEND" "$SERVER_BACKEND"
nvme disconnect -n "$SUBNQN" > /dev/null || die "nvme disconnect"
say "PASS"
