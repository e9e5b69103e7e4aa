#!/bin/bash
# netns-nfs: one hsd per network namespace (hsd@.service, issue 15 point 6).  The kernel queues
# handshake requests per network namespace, so an NFS client inside a named netns asks an agent
# in that namespace.  A netns `tenant1` joined to the root namespace by a veth pair; hsd.service
# serves the root namespace with its own config, hsd@tenant1 (the package's template, started
# with systemctl) serves tenant1 with /etc/hsd/tenant1.conf.  Proven from both units' journals:
# - before hsd@tenant1 runs, a mount from inside tenant1 fails although hsd.service runs, and
#   hsd.service logs no handshake for it (the root agent cannot serve another namespace);
# - with it, `ip netns exec tenant1 mount -o xprtsec=tls` works (1 MiB round trip, the NFS TCP
#   connection and its kTLS socket inside tenant1): hsd@tenant1 logs the client handshake
#   (peer 10.99.0.1:2049) and nothing else, hsd.service the server handshake nfsd (root
#   namespace) asked for (peer 10.99.0.2);
# - a mount from the root namespace is served by hsd.service alone (client and server);
# - the instance runs in tenant1 (its /proc/PID/ns/net is /run/netns/tenant1), `hsd status
#   --socket /run/hsd-netns/tenant1/control` answers for it, and stopping hsd.service leaves
#   the instance and its control socket alone.
# limit: 600
set -eu
. ./_lib.sh

NS=tenant1
ROOT_IP=10.99.0.1  # the root namespace's end of the veth pair: the NFS server as tenant1 sees it
NS_IP=10.99.0.2
UNIT=hsd@$NS.service
NS_CONF=/etc/hsd/$NS.conf
CONTROL=/run/hsd-netns/$NS/control
# hsd.service and hsd@ have PrivateTmp=yes: their certificates live under /etc, as an operator's do
PKI=/etc/hsd-vm/pki-netns
SERVER_EXTRA_SAN=",IP:$ROOT_IP"
prop() { systemctl show -P "$2" "$1"; }
cleanup() {
    local rc=$?
    umount -f /mnt/netns-root 2>/dev/null || true
    systemctl stop "$UNIT" hsd.service nfs-server.service 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    ip link del veth-t1 2>/dev/null || true
    [ -e /etc/exports.netns-orig ] && mv /etc/exports.netns-orig /etc/exports
    rm -f "$NS_CONF"
    boot_conf_restore
    exit $rc
}
trap cleanup EXIT

# ns_mount MOUNTPOINT: inside tenant1 (its own mount namespace too, as `ip netns exec` makes one):
# mount the root namespace's export over the veth with xprtsec=tls; on success a round trip, the
# NFS connection and kTLS counters as tenant1 sees them, then unmount.  Returns mount's status.
ns_mount() {
    ip netns exec "$NS" bash -c '
        set -eu; . ./_lib.sh
        nfs_mount tls "$1" "$2" 90 || exit $?
        roundtrip "$1" 1
        check "in $3: $(grep " $1 " /proc/mounts | cut -d" " -f1,3,4 | cut -c1-90)..."
        check "in $3: NFS connection $(ss -Htn state established "( dport = :2049 )" | awk "{ print \$3, \$4 }" | head -1)"
        check "in $3: kTLS sockets TlsCurrTxSw=$(tls_stat TlsCurrTxSw) TlsCurrRxSw=$(tls_stat TlsCurrRxSw)"
        [ "$(tls_stat TlsCurrTxSw)" -ge 1 ] || die "no kTLS socket in $3 while mounted"
        umount "$1"' ns_mount "$1" "$ROOT_IP" "$NS"
}
journal_of() { python3 journal.py "$1" "$(prop "$1" InvocationID)"; }

say "--- a PKI whose server certificate also names $ROOT_IP; configs for both agents"
make_pki
mkdir -p /etc/hsd
agent_config "$BOOT_CONF" server
# tenant1's agent needs only the client side (nfsd runs in the root namespace): a server-role
# request reaching it would fail for want of a certificate
cat > "$NS_CONF" <<EOF
[debug]
loglevel=1

[authenticate.client]
x509.truststore=$PKI/ca.pem
EOF
chmod 600 "$BOOT_CONF" "$NS_CONF"
hsd check -c "$NS_CONF" > /tmp/netns-check.out 2>&1 || { cat /tmp/netns-check.out; die "hsd check $NS_CONF"; }

say "--- netns $NS with a veth pair to the root namespace"
modprobe veth 2>/dev/null || true
ip netns add "$NS"
ip link add veth-t1 type veth peer name veth-t1-ns
ip link set veth-t1-ns netns "$NS"
ip addr add "$ROOT_IP/24" dev veth-t1 && ip link set veth-t1 up
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" ip addr add "$NS_IP/24" dev veth-t1-ns
ip netns exec "$NS" ip link set veth-t1-ns up
check "$NS: $(ip netns exec "$NS" ip -br addr show veth-t1-ns | tr -s ' ')"

say "--- the NFS server (root namespace) exports to loopback and to $NS"
cp -a /etc/exports /etc/exports.netns-orig
sed -i "s|^\(/srv/export .*\)$|\1 $NS_IP/32(rw,fsid=0,insecure,no_root_squash,no_subtree_check,sync,xprtsec=tls:mtls)|" /etc/exports
grep -q "$NS_IP/32" /etc/exports || die "the export to $NS_IP was not added: $(cat /etc/exports)"
systemctl start nfs-server.service || die "nfs-server.service did not start"
exportfs -ra
systemctl restart hsd.service || die "hsd.service did not start"
root_pid=$(prop hsd.service MainPID)

say "--- the template comes from the package and is not enabled"
dpkg -S /usr/lib/systemd/system/hsd@.service > /tmp/netns-dpkg.out 2>&1 || die "hsd@.service is not a file of a package"
enabled=$(systemctl is-enabled hsd@.service 2>&1 || true)
[ "$enabled" != enabled ] || die "the package enabled the template hsd@.service"
check "$(cat /tmp/netns-dpkg.out); is-enabled: $enabled"
if systemctl list-units --all --plain --no-legend 'hsd@*' | grep -q .; then
    die "an hsd@ instance exists before the scenario made one: $(systemctl list-units --all --plain --no-legend 'hsd@*')"
fi

say "--- without hsd@$NS: a mount from inside $NS finds no agent there"
t0=$(date +%s%N)
rc=0; ns_mount /mnt/netns-none > /tmp/netns-none.out 2>&1 || rc=$?
[ "$rc" -ne 0 ] || { cat /tmp/netns-none.out; die "a mount in $NS worked with no agent in $NS"; }
journal_of hsd.service > /tmp/netns-root0.txt
if grep -E "$HS_LINE" /tmp/netns-root0.txt | grep -q "peer=$ROOT_IP:"; then die "hsd.service served a client handshake of $NS"; fi
check "mount in $NS failed (exit $rc) after $(ms_since "$t0") ms; hsd.service logged no handshake towards $ROOT_IP"

say "--- systemctl start $UNIT"
t0=$(date +%s%N)
systemctl start "$UNIT" || { journalctl -u "$UNIT" --no-pager | tail -20; die "systemctl start $UNIT failed"; }
ns_pid=$(prop "$UNIT" MainPID)
check "$UNIT active in $(ms_since "$t0") ms, pid $ns_pid, NetworkNamespacePath=$(prop "$UNIT" NetworkNamespacePath)"
[ "$(stat -L -c %i /proc/"$ns_pid"/ns/net)" = "$(stat -L -c %i /run/netns/$NS)" ] \
    || die "hsd@$NS ($ns_pid) is not in netns $NS"
[ "$(stat -L -c %i /proc/"$root_pid"/ns/net)" = "$(stat -L -c %i /proc/1/ns/net)" ] \
    || die "hsd.service ($root_pid) is not in the root namespace"
check "hsd@$NS $ns_pid runs in netns $NS, hsd.service $root_pid in the root namespace"

say "--- a mount from inside $NS"
ns_mount /mnt/netns-tls || die "the xprtsec=tls mount from inside $NS failed with hsd@$NS running"

say "--- a mount from the root namespace"
nfs_mount tls /mnt/netns-root localhost 90 || die "the xprtsec=tls mount from the root namespace failed"
roundtrip /mnt/netns-root 1
umount /mnt/netns-root

say "--- who served what (journals)"
journal_of "$UNIT" > /tmp/netns-ns.txt
journal_of hsd.service > /tmp/netns-root.txt
sed 's/^/hsd@: /' /tmp/netns-ns.txt | grep "handshake peer=" || true
sed 's/^/hsd: /' /tmp/netns-root.txt | grep "handshake peer=" || true
ns_lines=$(grep -cE "$HS_LINE" /tmp/netns-ns.txt || true)
ns_client=$(grep -E "$HS_OK" /tmp/netns-ns.txt | grep " role=client " | grep -c "peer=$ROOT_IP:2049 " || true)
[ "$ns_client" -ge 1 ] || die "hsd@$NS logged no successful client handshake towards $ROOT_IP:2049"
[ "$ns_lines" -eq "$ns_client" ] || die "hsd@$NS logged handshakes other than $NS's client ones: $(grep -E "$HS_LINE" /tmp/netns-ns.txt | grep -v "peer=$ROOT_IP:2049 " | head -2)"
check "hsd@$NS: $ns_client client handshake(s) towards $ROOT_IP:2049 and nothing else: $(grep -E "$HS_OK" /tmp/netns-ns.txt | head -1 | sed 's/.*handshake //')"
line=$(grep -E "$HS_OK" /tmp/netns-root.txt | grep " role=server " | grep "peer=$NS_IP:" | head -1)
[ -n "$line" ] || die "hsd.service logged no successful server handshake for $NS's connection (peer $NS_IP)"
check "hsd.service, server side of $NS's mount: ${line#*handshake }"
if grep -E "$HS_LINE" /tmp/netns-root.txt | grep " role=client " | grep -q "peer=$ROOT_IP:"; then
    die "hsd.service served $NS's client handshake"
fi
for role in client server; do
    line=$(grep -E "$HS_OK" /tmp/netns-root.txt | grep " role=$role " | grep "peer=127.0.0.1:" | head -1)
    [ -n "$line" ] || die "hsd.service logged no successful $role handshake of the root namespace's mount"
    check "hsd.service, root namespace's mount, $role: ${line#*handshake }"
done
if grep "peer=127.0.0.1:" /tmp/netns-ns.txt | grep -q .; then die "hsd@$NS served a root-namespace handshake"; fi
check "each handshake served by its namespace's agent: hsd@$NS only $NS's client side, hsd.service the rest"

say "--- hsd status for each instance"
hsd status --socket "$CONTROL" --json > /tmp/netns-status.json || die "hsd status --socket $CONTROL failed"
python3 - "$ns_pid" "$NS_CONF" "$ns_client" <<'EOF' || die "hsd status for hsd@$NS does not describe it"
import json, sys
doc = json.load(open("/tmp/netns-status.json"))
pid, source, served = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
assert doc["pid"] == pid, (doc["pid"], pid)
assert doc["config"]["source"] == source, doc["config"]["source"]
assert doc["served"] == served and doc["failed"] == 0, (doc["served"], doc["failed"])
EOF
check "hsd status --socket $CONTROL: pid $ns_pid, config $NS_CONF, served $ns_client, failed 0"
[ "$(hsd status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')" = "$root_pid" ] \
    || die "hsd status (default socket) does not answer for hsd.service"
check "hsd status (default /run/hsd/control) answers for hsd.service $root_pid"
systemctl stop hsd.service
[ "$(systemctl is-active "$UNIT")" = active ] || die "stopping hsd.service stopped $UNIT"
[ -S "$CONTROL" ] || die "stopping hsd.service removed $CONTROL"
hsd status --socket "$CONTROL" > /dev/null || die "hsd@$NS's status is gone after hsd.service stopped"
check "hsd.service stopped: $UNIT still active, $CONTROL still answers"
systemctl stop "$UNIT"
[ ! -e "$CONTROL" ] || die "$CONTROL outlived $UNIT"
[ "$(prop "$UNIT" Result)" = success ] || die "$UNIT stopped with Result=$(prop "$UNIT" Result)"
check "$UNIT stopped (Result=success), its control socket removed"
say "PASS"
