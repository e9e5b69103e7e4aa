# Shared helpers for the guest scenarios (sourced, never run).  bash, set -eu by the caller.
# Everything here runs inside the guest; nothing touches the host.

PKI=/tmp/pki
EXPORT=/srv/export
# the boot-time set (guest/boot-setup.sh): hsd.service reads BOOT_CONF, which names BOOT_PKI's files
BOOT_PKI=/etc/hsd-vm/pki
BOOT_CONF=/etc/tlshd/config
BOOT_CONF_COPY=/etc/hsd-vm/config.boot  # runner.sh puts BOOT_CONF back as shipped after systemd-boot;
BOOT_CONF_SHIPPED=/etc/hsd-vm/config.shipped  # systemd-service installs the copy again
BOOT_MOUNT=/mnt/boot-tls

# boot_conf_install / boot_conf_restore: hsd.service's configuration (the boot's) in place / the
# package's own file back (or none), so that the other scenarios see the guest as shipped
boot_conf_install() { cp -a "$BOOT_CONF_COPY" "$BOOT_CONF"; }
boot_conf_restore() {
    if [ -e "$BOOT_CONF_SHIPPED" ]; then cp -a "$BOOT_CONF_SHIPPED" "$BOOT_CONF"; else rm -f "$BOOT_CONF"; fi
}

say() { printf '%s %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"; }
die() { say "FAIL: $*"; exit 1; }
check() { say "ok: $*"; }

# tls_stat FIELD -> the counter's value from /proc/net/tls_stat (0 before tls.ko is loaded)
tls_stat() { awk -v f="$1" '$1 == f { print $2 }' /proc/net/tls_stat 2>/dev/null || echo 0; }

# A CA, a server certificate for localhost and 127.0.0.1-5 (one NFS client per address: parallel
# mounts each get their own connection and handshakes), a client certificate, and a second,
# untrusted CA with its own localhost server certificate.  EC P-256: fast under emulation.
# SERVER_EXTRA_SAN (",IP:..."), when set, adds names to both server certificates (netns-nfs).
make_pki() {
    mkdir -p "$PKI" && cd "$PKI"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    for ca in ca rogue-ca; do
        openssl req -x509 "${ec[@]}" -keyout $ca.key -out $ca.pem -days 30 -subj "/CN=hsd vm $ca" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    done
    issue() {  # issue NAME CA SUBJECT EXTENSIONS
        openssl req "${ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "$3" 2>/dev/null
        printf '%s\n' "$4" > "$1.ext"
        openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 30 \
            -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    }
    local server_ext="subjectAltName=DNS:localhost,IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3,IP:127.0.0.4,IP:127.0.0.5${SERVER_EXTRA_SAN:-}
extendedKeyUsage=serverAuth
basicConstraints=CA:FALSE"
    issue server ca "/CN=localhost" "$server_ext"
    issue rogue-server rogue-ca "/CN=localhost" "$server_ext"
    issue client ca "/CN=hsd-vm-client" 'subjectAltName=DNS:hsd-vm-client
extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE'
    chmod 600 ./*.key
    cd - >/dev/null
}

# agent_config FILE SERVER_NAME: tlshd's key-file format, read by tlshd and hsd alike.
# SERVER_NAME picks the server certificate (server or rogue-server).
agent_config() {
    cat > "$1" <<EOF
[debug]
loglevel=1
tls=0
nl=0

[authenticate.client]
x509.truststore=$PKI/ca.pem
x509.certificate=$PKI/client.pem
x509.private_key=$PKI/client.key

[authenticate.server]
x509.truststore=$PKI/ca.pem
x509.certificate=$PKI/${2:-server}.pem
x509.private_key=$PKI/${2:-server}.key
EOF
}

# NFSv4.2 server on loopback exporting a tmpfs, TLS with or without a client certificate.
nfs_server_start() {
    modprobe tls && modprobe nfsd && modprobe nfsv4 || die "modprobe tls/nfsd/nfsv4"
    mkdir -p "$EXPORT" /var/lib/nfs/v4recovery
    mountpoint -q "$EXPORT" || mount -t tmpfs -o size=512m export "$EXPORT"
    echo "$EXPORT 127.0.0.0/8(rw,fsid=0,insecure,no_root_squash,no_subtree_check,sync,xprtsec=tls:mtls)" > /etc/exports
    mountpoint -q /proc/fs/nfsd || mount -t nfsd nfsd /proc/fs/nfsd
    # a short grace period: there are no clients to reclaim state for
    # (EBUSY when nfsd already ran in this boot: then the grace period is long over)
    echo 10 > /proc/fs/nfsd/nfsv4gracetime 2>/dev/null || true
    echo 10 > /proc/fs/nfsd/nfsv4leasetime 2>/dev/null || true
    exportfs -ra || die exportfs
    rpc.mountd --no-nfs-version 3 --no-udp 2>/dev/null || rpc.mountd --no-nfs-version 3 || die rpc.mountd
    rpc.nfsd -N 3 4 2>/dev/null || die rpc.nfsd
    say "nfs server up (v4.2, export $EXPORT, xprtsec=tls:mtls)"
}

nfs_server_stop() {
    rpc.nfsd 0 2>/dev/null || true
    exportfs -ua 2>/dev/null || true
    pkill -x rpc.mountd 2>/dev/null || true
}

# nfs_mount MODE MOUNTPOINT [SERVER] [LIMIT]: mount the export with xprtsec=MODE; returns mount's status
nfs_mount() {
    mkdir -p "$2"
    timeout "${4:-90}" mount -t nfs4 -o "xprtsec=$1,vers=4.2,proto=tcp,retry=0" "${3:-localhost}:/" "$2"
}

# roundtrip MOUNTPOINT MIB: write MIB MiB of random data over NFS, drop the client's cache,
# read it back over the wire, compare checksums.
roundtrip() {
    local src=/tmp/roundtrip.$$ name="data.$RANDOM"
    head -c "$(( $2 * 1048576 ))" /dev/urandom > "$src"
    cp "$src" "$1/$name" && sync
    echo 3 > /proc/sys/vm/drop_caches
    local want got
    want=$(sha256sum < "$src" | cut -d' ' -f1)
    got=$(sha256sum < "$1/$name" | cut -d' ' -f1)
    rm -f "$src" "$1/$name"
    [ "$want" = "$got" ] || die "read back over $1 differs from what was written ($2 MiB)"
    check "$2 MiB written and read back identical over $1"
}

# ms_since T0_NS: milliseconds since a `date +%s%N` stamp
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# variant_backend: the hsd backend a NAME@VARIANT run uses (HSD_VARIANT from init.sh; openssl when
# none).  "mixed" runs openssl by default with one mode overridden in [hsd.backends].
variant_backend() {
    case "${HSD_VARIANT:-openssl}" in
        openssl|mixed) echo openssl ;;
        tlslite) echo tlslite ;;
        *) die "unknown variant '$HSD_VARIANT'" ;;
    esac
}

# The per-handshake line hsd logs (core/dispatcher.py Outcome.line()), every field; a successful
# handshake names a TLS 1.3 suite and a key-exchange group and ends in "status=0 (ok)".
HS_LINE='handshake peer=[^ ]+:[0-9]+ role=(client|server) auth=(unauth|x509|psk) backend=[A-Za-z0-9_.-]+ suite=[^ ]+ group=[^ ]+ duration=[0-9]+\.[0-9]ms status=[0-9]+ \([A-Za-z0-9_]+\)'
HS_OK='handshake peer=[^ ]+:[0-9]+ role=(client|server) auth=(unauth|x509|psk) backend=[A-Za-z0-9_.-]+ suite=TLS_[A-Z0-9_]+ group=[A-Za-z0-9_]+ duration=[0-9]+\.[0-9]ms status=0 \(ok\)$'

# check_hsd_log LOG CLIENT_BACKEND SERVER_BACKEND: every handshake line hsd wrote carries all the
# fields (role, auth, backend, suite, group, duration, status); every successful one names a suite
# and a group and the backend each role was meant to use.  Prints one line per role as evidence.
check_hsd_log() {
    local log=$1 all well ok role want line
    all=$(grep -c "handshake peer=" "$log" || true)
    [ "$all" -gt 0 ] || die "hsd logged no handshake line in $log"
    well=$(grep -cE "$HS_LINE" "$log" || true)
    [ "$well" -eq "$all" ] || { grep "handshake peer=" "$log" | grep -vE "$HS_LINE" | head -3;
        die "$((all - well)) of $all handshake lines lack a field (role auth backend suite group duration status)"; }
    [ "$(grep -c "handshake peer=.* status=0 " "$log" || true)" -eq "$(grep -cE "$HS_OK" "$log" || true)" ] \
        || { grep "handshake peer=.* status=0 " "$log" | grep -vE "$HS_OK" | head -3;
             die "a successful handshake line names no suite or group"; }
    for role in client server; do
        [ "$role" = client ] && want=$2 || want=$3
        line=$(grep -E "$HS_OK" "$log" | grep " role=$role " | head -1)
        [ -n "$line" ] || die "no successful role=$role handshake logged"
        if grep -E "$HS_OK" "$log" | grep " role=$role " | grep -qv " backend=$want "; then
            die "a role=$role handshake ran on another backend than $want: $(grep " role=$role " "$log" | grep -v " backend=$want " | head -1)"
        fi
        check "role=$role on backend=$want: ${line#*handshake }"
    done
}

# config_fingerprint FILE LABEL: print the file's sha256 (tests/test_vm.py compares the agents'),
# and assert it is a plain tlshd file: no [hsd...] section, only tlshd's sections.
config_fingerprint() {
    if grep -qE '^\s*\[hsd' "$1"; then die "$1 has an [hsd...] section: not a plain tlshd config"; fi
    grep -E '^\s*\[' "$1" | grep -qvE '^\s*\[(debug|authenticate|authenticate\.client|authenticate\.server)\]\s*$' \
        && die "$1 has a section tlshd does not know"
    say "AGENT-CONFIG $2 sha256=$(sha256sum < "$1" | cut -d' ' -f1) path=$1"
}

# NVMe/TCP over TLS on loopback (nvme-psk, bench-nvme): one subsystem, one host NQN, one port.
SUBNQN=nqn.2014-08.org.hsd:vm-subsystem
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:9d4a1c52-1a53-4c8e-9a5e-6f1f0a9f2b11
NVMET=/sys/kernel/config/nvmet

# nvme_psk_insert [SUBNQN]: the retained PSK both sides find in the .nvme keyring ("NVMe0R01 <hostnqn>
# <subnqn>"), for $SUBNQN unless another subsystem is named
nvme_psk_insert() {
    local subnqn=${1:-$SUBNQN}
    nvme gen-tls-key --subsysnqn="$subnqn" --hostnqn="$HOSTNQN" --insert > /tmp/nvme-key.out 2>&1 \
        || { cat /tmp/nvme-key.out; die "nvme gen-tls-key --insert for $subnqn"; }
    grep -q "NVMe0R01 $HOSTNQN $subnqn" /proc/keys || die "the retained PSK is not in a keyring: $(grep -i nvme /proc/keys)"
    check "PSK inserted: $(grep -o "NVMe0R01 [^ ]* $subnqn" /proc/keys | head -1 | cut -c1-40)..."
}

# nvme_subsystem_add NQN IMAGE SIZE: an nvmet subsystem any host may use, with one namespace backed by
# the file IMAGE of SIZE (not yet on a port)
nvme_subsystem_add() {
    truncate -s "$3" "$2"
    mkdir "$NVMET/subsystems/$1"
    echo 1 > "$NVMET/subsystems/$1/attr_allow_any_host"
    mkdir "$NVMET/subsystems/$1/namespaces/1"
    echo "$2" > "$NVMET/subsystems/$1/namespaces/1/device_path"
    echo 1 > "$NVMET/subsystems/$1/namespaces/1/enable"
}

# nvme_subsystem_remove NQN: the host disconnected from it, off the port, removed (cleanup: never fails)
nvme_subsystem_remove() {
    nvme disconnect -n "$1" >/dev/null 2>&1 || true
    rm -f "$NVMET/ports/1/subsystems/$1" 2>/dev/null || true
    if [ -d "$NVMET/subsystems/$1" ]; then
        echo 0 > "$NVMET/subsystems/$1/namespaces/1/enable" 2>/dev/null || true
        rmdir "$NVMET/subsystems/$1/namespaces/1" "$NVMET/subsystems/$1" 2>/dev/null || true
    fi
}

# nvme_target_start: nvmet subsystem with a 64 MiB file-backed namespace on 127.0.0.1:4420,
# TLS 1.3 required (the target's handshakes go to the agent as server PSK requests).
nvme_target_start() {
    local m
    for m in tls nvmet nvmet-tcp nvme-tcp nvme-fabrics; do modprobe "$m" || die "modprobe $m"; done
    mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
    nvme_subsystem_add "$SUBNQN" /tmp/nvme-backing.img 64M
    mkdir "$NVMET/ports/1"
    echo tcp > "$NVMET/ports/1/addr_trtype"
    echo ipv4 > "$NVMET/ports/1/addr_adrfam"
    echo 127.0.0.1 > "$NVMET/ports/1/addr_traddr"
    echo 4420 > "$NVMET/ports/1/addr_trsvcid"
    echo tls1.3 > "$NVMET/ports/1/addr_tsas"
    echo required > "$NVMET/ports/1/addr_treq"
    ln -s "$NVMET/subsystems/$SUBNQN" "$NVMET/ports/1/subsystems/$SUBNQN"
    check "nvmet target on 127.0.0.1:4420 requires TLS 1.3"
}

# nvme_target_stop: disconnect the host and remove the target (cleanup: never fails)
nvme_target_stop() {
    nvme_subsystem_remove "$SUBNQN"
    rmdir "$NVMET/ports/1" 2>/dev/null || true
}

# hsd_wait_ready LOG: wait (up to 60 s) for the "hsd ready" line of an hsd started in the background
# with its output in LOG; else print LOG and fail
hsd_wait_ready() {
    for _ in $(seq 120); do grep -q "hsd ready" "$1" && return 0; sleep 0.5; done
    cat "$1"; die "hsd not ready (its log: $1)"
}

# nvme_tls_connect: the host connects to the target over TLS (PSK from the .nvme keyring)
nvme_tls_connect() {
    nvme connect -t tcp -a 127.0.0.1 -s 4420 -n "$SUBNQN" --hostnqn="$HOSTNQN" --tls > /tmp/nvme-connect.out 2>&1
}

# tlshd_stamped LOG CONF: start the reference tlshd in the background, each stderr line prefixed
# with the guest's clock in seconds ($EPOCHREALTIME: tlshd's own lines carry no time), so that
# handshake_ms_tlshd can time each handshake.  $! afterwards is tlshd's own pid.  A FIFO, not
# >(...): the guest has no /dev/fd; the stamping loop ends when tlshd does.
tlshd_stamped() {
    local fifo=/tmp/tlshd-stamp.fifo
    rm -f "$fifo" && mkfifo "$fifo"
    (while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done < "$fifo" > "$1") &
    tlshd -s -c "$2" > "$fifo" 2>&1 &
}

# tlshd's line for a successful handshake: 1.0.0 says "was successful", 1.4.0 "succeeded"
TLSHD_OK='Handshake with .* (was successful|succeeded)$'

# handshake_ms_tlshd LOG: one figure per successful tlshd handshake, in ms: tlshd forks a child per
# request, so it is the time from that child's first line to its success line: "Handshake with ...
# was successful" (tlshd 1.0.0) or "Handshake with ... succeeded" (1.4.0), see TLSHD_OK.
handshake_ms_tlshd() {
    awk '{ pid = $2; sub(/^tlshd\[/, "", pid); sub(/\]:$/, "", pid) }
         !(pid in first) { first[pid] = $1 }
         /Handshake with .* (was successful|succeeded)$/ { printf "%.1f\n", ($1 - first[pid]) * 1000 }' "$1"
}

# handshake_ms_hsd LOG: the duration hsd logs with every successful handshake, in ms
handshake_ms_hsd() { grep -o "duration=[0-9.]*ms status=0 " "$1" | sed 's/duration=//; s/ms .*//'; }

# mean_of: the mean of the numbers on stdin, one decimal ("-" for none)
mean_of() { awk '{ s += $1; n++ } END { if (n) printf "%.1f", s / n; else printf "-" }'; }
