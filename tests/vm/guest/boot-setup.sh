#!/bin/bash
# After hsd's .deb is installed (first boot), before the soft-reboot: what an operator configures
# for NFS over TLS at boot.  A certificate set under /etc/hsd-vm/pki, hsd's configuration at the
# first path hsd.service reads (/etc/tlshd/config, tlshd's key-file format; forky's ktls-utils ships
# that file: it is edited, as an operator would, and the shipped copy kept), and an fstab entry
# for an NFSv4.2 mount with xprtsec=tls of this guest's own export (nfs-server.service serves it:
# x-systemd.requires orders the mount after the loopback server; hsd.service's own ordering,
# Before=remote-fs-pre.target, is what the mount relies on for its handshakes).
set -eu
. ../scenarios/_lib.sh
PKI=$BOOT_PKI
make_pki
config=$BOOT_CONF
mkdir -p "$(dirname "$config")" /etc/hsd-vm
if [ -e "$config" ]; then cp -a "$config" "$BOOT_CONF_SHIPPED"; say "$config is $(dpkg -S "$config" 2>&1): kept"; fi
agent_config "$config" server
chmod 600 "$config"
cp -a "$config" "$BOOT_CONF_COPY"
mkdir -p /mnt/boot-tls
echo "localhost:/ /mnt/boot-tls nfs4 xprtsec=tls,vers=4.2,proto=tcp,_netdev,x-systemd.requires=nfs-server.service 0 0" >> /etc/fstab
systemctl daemon-reload
check "boot configuration written: $config, $(grep -c . /etc/fstab) fstab lines"
