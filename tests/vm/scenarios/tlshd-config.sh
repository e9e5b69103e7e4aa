#!/bin/bash
# tlshd-config: `hsd check` accepts the reference agent's own configuration as the guest's package
# ships it (every file ktls-utils installs under /etc, verified unmodified against the package's
# checksums): exit 0, no warning.  `hsd check` with no -c finds the same file by itself.
# ktls-utils 1.0.0 (trixie) ships /etc/tlshd.conf, 1.4.0 (forky) /etc/tlshd/config.
# limit: 120
set -eu
. ./_lib.sh

shipped=$(dpkg-query -L ktls-utils | grep '^/etc/' | while read -r f; do [ -f "$f" ] && echo "$f"; done)
[ -n "$shipped" ] || die "ktls-utils ships no configuration file under /etc"
echo "$shipped" | grep -qxE '/etc/tlshd\.conf|/etc/tlshd/config' \
    || die "ktls-utils ships neither /etc/tlshd.conf nor /etc/tlshd/config: $shipped"
verify=$(dpkg --verify ktls-utils 2>&1 || true)
[ -z "$verify" ] || die "ktls-utils' files differ from the package: $verify"
check "ktls-utils ships, unmodified: $(echo $shipped)"

# check_clean LABEL ARGS...: hsd ARGS exits 0 and writes no warning
check_clean() {
    local label=$1 rc=0; shift
    hsd "$@" > /tmp/check.out 2> /tmp/check.err || rc=$?
    sed 's/^/  /' /tmp/check.out /tmp/check.err
    [ "$rc" -eq 0 ] || die "$label: hsd $* exited $rc"
    if grep -q "warning:" /tmp/check.out /tmp/check.err; then die "$label: hsd $* warned"; fi
    [ ! -s /tmp/check.err ] || die "$label: hsd $* wrote to stderr"
    grep -q "configuration OK" /tmp/check.out || die "$label: hsd $* did not say 'configuration OK'"
}
for f in $shipped; do
    check_clean "$f" check -c "$f"
    say "AGENT-CONFIG shipped sha256=$(sha256sum < "$f" | cut -d' ' -f1) path=$f"
    check "hsd check -c $f: exit 0, no warning"
done
check_clean default check
grep -qi "^config file: /etc/tlshd" /tmp/check.out || die "hsd check without -c did not pick up the shipped file"
check "hsd check (no -c) reads $(grep -i '^config file:' /tmp/check.out | cut -d' ' -f3-): exit 0, no warning"
say "PASS"
