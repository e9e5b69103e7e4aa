#!/bin/bash
# nfs-token: an NFS xprtsec=mtls mount whose client key never leaves a PKCS#11 token (issue 15
# point 8), on the real kernel, hsd.service from the .deb on Debian's system OpenSSL with
# pkcs11-provider.  A SoftHSM2 token in its Debian default place (/etc/softhsm/softhsm2.conf,
# /var/lib/softhsm/tokens); an EC key pair generated inside it; the scenario CA signs a
# certificate for the token's public half, which is stored in the token too.  hsd's config names
# both as pkcs11: URIs ([authenticate.client]); the operator's drop-in for hsd.service sets
# PKCS11_PROVIDER_MODULE and ReadWritePaths=/var/lib/softhsm/tokens (what the unit's
# ProtectSystem=strict does to SoftHSM2 without it is printed, not asserted).  The export takes
# xprtsec=mtls only.  Proven:
# - the mtls mount works (1 MiB round trip) and an xprtsec=tls mount (no client certificate) is
#   refused by nfsd: the server requires the client certificate;
# - hsd's journal: the client x509 handshake's debug credentials line names the pkcs11: URIs with
#   the PIN as ***, the PIN itself nowhere; the server side's remote-auth is 4294967295 (nfsd's
#   "peer authenticated": it verified the token's certificate);
# - the key is not extractable: the token lists it sensitive, always sensitive, never extractable
#   (CKA_EXTRACTABLE false), and `pkcs11-tool --read-object` writes nothing that loads as a private
#   key (opensc answers "reading private keys not (yet) supported": the tool's refusal, not the
#   token's; tests/debian/token_mtls.py has OpenSSL ask the provider for the private DER).
# limit: 600
set -eu
. ./_lib.sh

# hsd.service has PrivateTmp=yes: its certificates live under /etc, as an operator's do
PKI=/etc/hsd-vm/pki-token
TOKEN=hsd-vm
PIN=731946
KEY_URI="pkcs11:token=$TOKEN;object=nfs-client;type=private?pin-value=$PIN"
CERT_URI="pkcs11:token=$TOKEN;object=nfs-client;type=cert"
MASKED="pkcs11:token=$TOKEN;object=nfs-client;type=private?pin-value=***"
SUBJECT=hsd-vm-token-client
DROPIN=/etc/systemd/system/hsd.service.d/pkcs11.conf
MNT=/mnt/token-mtls
prop() { systemctl show -P "$2" "$1"; }
journal_now() { python3 journal.py hsd.service "$(prop hsd.service InvocationID)"; }
cleanup() {
    local rc=$?
    umount -f "$MNT" /mnt/token-tls 2>/dev/null || true
    systemctl stop hsd.service nfs-server.service 2>/dev/null || true
    rm -f "$DROPIN"; rmdir "$(dirname "$DROPIN")" 2>/dev/null || true
    systemctl daemon-reload || true
    softhsm2-util --delete-token --token "$TOKEN" >/dev/null 2>&1 || true
    [ -e /etc/exports.token-orig ] && mv /etc/exports.token-orig /etc/exports
    boot_conf_restore
    exit $rc
}
trap cleanup EXIT

MODULE=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)
[ -n "$MODULE" ] || die "softhsm2 is not installed in the guest"
P11=(pkcs11-tool --module "$MODULE" --token-label "$TOKEN")
say "--- versions: $(dpkg-query -W -f '${Package} ${Version}, ' softhsm2 pkcs11-provider opensc openssl)module $MODULE"

say "--- a SoftHSM2 token in the default store, the client key generated inside it"
tokendir=$(sed -n 's/^\s*directories.tokendir\s*=\s*//p' /etc/softhsm/softhsm2.conf)
check "softhsm2.conf: tokendir $tokendir"
softhsm2-util --init-token --free --label "$TOKEN" --pin "$PIN" --so-pin 0000 > /tmp/token-init.out 2>&1 \
    || { cat /tmp/token-init.out; die "softhsm2-util --init-token"; }
"${P11[@]}" --login --pin "$PIN" --keypairgen --key-type EC:prime256v1 --label nfs-client --id 01 \
    > /tmp/token-keygen.out 2>&1 || { cat /tmp/token-keygen.out; die "pkcs11-tool --keypairgen in the token"; }
check "EC P-256 key pair generated in token $TOKEN ($(find "$tokendir" -type f | wc -l) files in $tokendir)"

say "--- the scenario CA signs a certificate for the token's public half; it goes into the token"
make_pki
rm -f "$PKI"/client.*  # this scenario's client has no key file: its key is in the token
"${P11[@]}" --read-object --type pubkey --id 01 --output-file /tmp/token-pub.der > /tmp/token-pub.out 2>&1 \
    || { cat /tmp/token-pub.out; die "reading the token's public key"; }
openssl pkey -pubin -inform DER -in /tmp/token-pub.der -out /tmp/token-pub.pem
printf 'subjectAltName=DNS:%s\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' "$SUBJECT" > /tmp/token.ext
openssl x509 -new -subj "/CN=$SUBJECT" -force_pubkey /tmp/token-pub.pem -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" \
    -days 30 -extfile /tmp/token.ext -outform DER -out /tmp/token-client.der 2>/tmp/token-x509.out \
    || { cat /tmp/token-x509.out; die "the CA could not issue the token's certificate"; }
"${P11[@]}" --login --pin "$PIN" --write-object /tmp/token-client.der --type cert --label nfs-client --id 01 \
    > /tmp/token-cert.out 2>&1 || { cat /tmp/token-cert.out; die "storing the certificate in the token"; }
rm -f /tmp/token-client.der /tmp/token-pub.*
check "certificate CN=$SUBJECT (issuer $(openssl x509 -in "$PKI/ca.pem" -noout -subject | sed 's/^subject=//')) stored in the token"

say "--- hsd.service's config: the client's certificate and key as pkcs11: URIs"
cat > "$BOOT_CONF" <<EOF
[debug]
loglevel=1

[authenticate.client]
x509.truststore=$PKI/ca.pem
x509.certificate=$CERT_URI
x509.private_key=$KEY_URI

[authenticate.server]
x509.truststore=$PKI/ca.pem
x509.certificate=$PKI/server.pem
x509.private_key=$PKI/server.key
EOF
chmod 600 "$BOOT_CONF"
PKCS11_PROVIDER_MODULE=$MODULE hsd check > /tmp/token-check.out 2>&1 || { cat /tmp/token-check.out; die "hsd check"; }
grep -q "a key in a token" /tmp/token-check.out || { cat /tmp/token-check.out; die "hsd check does not report the token key"; }
! grep -q "$PIN" /tmp/token-check.out || die "hsd check printed the PIN"
check "hsd check: OK, $(grep -m1 "a key in a token" /tmp/token-check.out | sed 's/^ *//' | cut -c1-140)"

say "--- the export takes xprtsec=mtls only"
cp -a /etc/exports /etc/exports.token-orig
sed -i 's/xprtsec=tls:mtls/xprtsec=mtls/' /etc/exports
grep -q 'xprtsec=mtls)' /etc/exports || die "the export is not mtls-only: $(cat /etc/exports)"
systemctl start nfs-server.service || die "nfs-server.service did not start"
exportfs -ra
check "$(exportfs -v | tr -s ' \n\t' ' ' | cut -c1-150)"

say "--- the operator's drop-in, first without ReadWritePaths (printed, not asserted)"
mkdir -p "$(dirname "$DROPIN")"
printf '[Service]\nEnvironment=PKCS11_PROVIDER_MODULE=%s\n' "$MODULE" > "$DROPIN"
systemctl daemon-reload
rc=0; systemctl restart hsd.service 2>/dev/null || rc=$?
if [ "$rc" -eq 0 ]; then
    rc=0; nfs_mount mtls "$MNT" localhost 60 > /tmp/token-probe.out 2>&1 || rc=$?
    say "INFO without ReadWritePaths: hsd.service $(systemctl is-active hsd.service), mtls mount exit $rc"
    umount "$MNT" 2>/dev/null || true
else
    say "INFO without ReadWritePaths: hsd.service did not start (exit $rc): $(journalctl -u hsd.service -n 30 --no-pager -o cat | grep -m1 -iE "error|token|pkcs11" | cut -c1-200)"
fi
journal_now | grep -iE "error|warning|pkcs11|softhsm|read-only" | grep -v "handshake peer=" | head -3 | sed 's/^/INFO   /' || true
systemctl stop hsd.service
systemctl reset-failed hsd.service 2>/dev/null || true

say "--- the drop-in with ReadWritePaths=$tokendir"
printf '[Service]\nEnvironment=PKCS11_PROVIDER_MODULE=%s\nReadWritePaths=%s\n' "$MODULE" "${tokendir%/}" > "$DROPIN"
systemctl daemon-reload
sed 's/^/  drop-in: /' "$DROPIN"
systemctl restart hsd.service || { journalctl -u hsd.service -n 20 --no-pager; die "hsd.service did not start with the token key"; }
pid=$(prop hsd.service MainPID)
check "hsd.service active, pid $pid, ProtectSystem=$(prop hsd.service ProtectSystem), ReadWritePaths=$(prop hsd.service ReadWritePaths)"

say "--- the xprtsec=mtls mount"
t0=$(date +%s%N)
nfs_mount mtls "$MNT" localhost 90 || { journal_now | tail -20; die "the xprtsec=mtls mount with the token key failed"; }
check "mounted in $(ms_since "$t0") ms: $(grep " $MNT " /proc/mounts | cut -d' ' -f1,3,4 | cut -c1-100)"
grep " $MNT " /proc/mounts | grep -q "xprtsec=mtls" || die "the mount is not xprtsec=mtls"
[ "$(tls_stat TlsCurrTxSw)" -ge 1 ] || die "no kTLS socket while mounted"
roundtrip "$MNT" 1
umount "$MNT"

say "--- an xprtsec=tls mount (no client certificate) is refused by the mtls-only export"
rc=0; nfs_mount tls /mnt/token-tls localhost 60 > /tmp/token-tls.out 2>&1 || rc=$?
[ "$rc" -ne 0 ] || { umount /mnt/token-tls; die "an xprtsec=tls mount worked on the mtls-only export"; }
check "xprtsec=tls mount refused (exit $rc): $(tr '\n' ' ' < /tmp/token-tls.out | cut -c1-120)"

say "--- hsd's journal"
journal_now > /tmp/token-journal.txt
[ "$(prop hsd.service MainPID)" = "$pid" ] || die "hsd.service restarted during the mounts"
check_hsd_log /tmp/token-journal.txt openssl openssl
creds=$(grep -F " client/x509 -> backend openssl; " /tmp/token-journal.txt | head -1 || true)
[ -n "$creds" ] || die "no debug credentials line for a client x509 handshake"
case "$creds" in *"certificate $CERT_URI (1 in chain), private key $MASKED,"*) ;;
    *) die "the client's credentials line does not name the token URIs with the PIN masked: $creds" ;; esac
check "credentials: ${creds#*backend openssl; }"
if grep -q "$PIN" /tmp/token-journal.txt; then die "the PIN reached hsd's journal"; fi
client=$(grep -E "$HS_OK" /tmp/token-journal.txt | grep " role=client auth=x509 " | head -1)
[ -n "$client" ] || die "no successful client x509 handshake (the token key signed none)"
check "client side, key in the token: ${client#*handshake }"
# the first server/x509 handshake (the mtls mount's): its socket's "fd N: server/x509 -> ..." line,
# then that fd's "fd N timings: ...; remote-auth S" line, logged with its outcome
server_auth=$(awk '!fd && / fd [0-9]+: server\/x509 -> backend / { for (i = 1; i < NF; i++) if ($i == "fd") fd = $(i + 1); next }
    fd && index($0, " fd " fd+0 " timings: ") { sub(/.*remote-auth /, ""); print; exit }' /tmp/token-journal.txt)
# one sentinel per verified certificate of the client's chain (core/identity.py), never a serial
case ",$server_auth," in ,4294967295,*) ;; *) die "the server side reported remote-auth '$server_auth', not a verified client certificate" ;; esac
[ -z "$(echo "$server_auth" | tr ',' '\n' | grep -vx 4294967295)" ] || die "the server side reported remote-auth '$server_auth'"
check "server side: remote-auth $server_auth (nfsd's peer-authenticated: the token's certificate verified)"
unauth=$(grep -E "$HS_LINE" /tmp/token-journal.txt | grep -c " role=client auth=unauth " || true)
check "the refused xprtsec=tls mount: $unauth client unauth handshake(s), no client certificate sent"

say "--- the key is not extractable"
"${P11[@]}" --login --pin "$PIN" --list-objects --type privkey > /tmp/token-list.out 2>&1 || die "listing the token's private key"
access=$(sed -n 's/^\s*Access:\s*//p' /tmp/token-list.out | head -1)
case "$access" in *"never extractable"*) ;; *) cat /tmp/token-list.out; die "the key is not marked never extractable: $access" ;; esac
case "$access" in *sensitive*) ;; *) die "the key is not sensitive: $access" ;; esac
# CKA_EXTRACTABLE true shows as a bare "extractable"
case "${access//never extractable/}" in *extractable*) die "the key is extractable: $access" ;; esac
check "private key object: Access: $access"
rm -f /tmp/token-priv.out
rc=0; "${P11[@]}" --login --pin "$PIN" --read-object --type privkey --id 01 --output-file /tmp/token-priv.out \
    > /tmp/token-read.out 2>&1 || rc=$?
# whatever it exits with: what it wrote must not load as a private key (DER or PEM)
size=$(stat -c %s /tmp/token-priv.out 2>/dev/null || echo 0)
if [ "$size" -gt 0 ]; then
    for form in DER PEM; do
        if openssl pkey -inform "$form" -in /tmp/token-priv.out -noout 2>/dev/null; then
            die "pkcs11-tool --read-object wrote the private key ($size bytes, $form) out of the token"
        fi
    done
fi
check "pkcs11-tool --read-object --type privkey: exit $rc, $size bytes written, none of them a private key: $(tr '\n' ' ' < /tmp/token-read.out | cut -c1-120)"
rm -f /tmp/token-priv.out
say "PASS"
