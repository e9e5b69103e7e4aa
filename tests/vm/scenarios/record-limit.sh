#!/bin/bash
# record-limit: RFC 8449 record_size_limit.  GnuTLS peers (gnutls-serv --echo as the server,
# gnutls-cli as the client) announce a 512-byte limit; hsd_tlslite reports it, hsd.ktls sets
# TLS_TX_MAX_PAYLOAD_LEN on the real kernel, and a relay between the two counts the records the
# kernel puts on the wire after one 64 KiB write (record_limit.py).  forky (Linux 7.2): every
# record at most the limit, the peer gets every byte.  trixie (Linux 6.12, no such option): hsd
# logs one warning for the process, and the scenario prints what the peer did with 16 KiB records.
# variants: tlslite
# limit: 300
set -eu
. ./_lib.sh
modprobe tls || die "modprobe tls"
make_pki
. /etc/os-release
case "$VERSION_CODENAME" in
    forky) expect=enforced ;;
    trixie) expect=absent ;;
    *) die "no expectation for $VERSION_CODENAME (kernel $(uname -r))" ;;
esac
say "kernel $(uname -r) ($VERSION_CODENAME): TLS_TX_MAX_PAYLOAD_LEN expected $expect"
python3 record_limit.py --expect "$expect"
