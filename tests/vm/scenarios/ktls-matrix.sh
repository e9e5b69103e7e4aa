#!/bin/bash
# ktls-matrix: an hsd backend does the TLS 1.3 handshake on a raw TCP socket against
# openssl s_server/s_client, hsd.ktls installs the keys in the real kernel, data flows through
# kTLS both ways; every suite (AES-GCM-128/256, AES-CCM-128, ChaCha20-Poly1305) x both roles.
# ktls-matrix@openssl (the default) uses hsd_openssl, ktls-matrix@tlslite hsd_tlslite.
# variants: openssl tlslite
# limit: 300
set -eu
. ./_lib.sh
modprobe tls || die "modprobe tls"
make_pki
BACKEND=$(variant_backend)
python3 ktls_matrix.py "$BACKEND"
