#!/usr/bin/env bash
# Access control:
#  - transport files are created mode 0600 whatever the umask, by
#    `cbd-proxy format` and by `nbdkit cbd format=true`;
#  - a backend with allow-hosts= serves the hosts listed and refuses any
#    other: that proxy fails to attach within attach-timeout with a message
#    naming allow-hosts (not a hang), and leaves no slot behind.
# (Read-only exports refusing writes with EPERM: test-proxy-errors.sh.)
source "$(dirname "$0")/functions.sh"
require_built
require jq nbdinfo

# ---- modes ----
umask 000
"$CBD_PROXY" format transport="$TRANSPORT" size=64M >"$TEST_DIR/format.log" 2>&1 || fail "cbd-proxy format failed"
mode=$(stat -c %a "$TRANSPORT")
log "cbd-proxy format: mode $mode"
[[ $mode == 600 ]] || fail "cbd-proxy format created the transport with mode $mode, want 600"
rm -f "$TRANSPORT"

backing=$TEST_DIR/backing.img
truncate -s 16M "$backing"
start_backend file="$backing" format=true transport-size=64M
mode=$(stat -c %a "$TRANSPORT")
log "nbdkit cbd format=true: mode $mode"
[[ $mode == 600 ]] || fail "nbdkit cbd format=true created the transport with mode $mode, want 600"
stop_all || fail "nbdkit did not stop cleanly"
umask 022

# ---- allow-hosts ----
fast_transport
start_backend file="$backing" allow-hosts=compute-a,compute-b hostname=storage
start_proxy hostname=compute-b
nbdinfo --size "$PROXY_URI" >/dev/null || fail "a listed host is not served"

start=$SECONDS
status=0
run_client "$CBD_PROXY" connect backend=0 transport="$TRANSPORT" unix="$TEST_DIR/intruder.sock" \
    hostname=intruder attach-timeout=3 >"$TEST_DIR/intruder.log" 2>&1 || status=$?
cat "$TEST_DIR/intruder.log" >&2
((status != 0 && status != 124 && status != 137)) || fail "the refused proxy did not fail cleanly (status $status)"
((SECONDS - start < 20)) || fail "the refused proxy took $((SECONDS - start))s to give up"
grep -q "allow-hosts" "$TEST_DIR/intruder.log" || fail "the refused proxy's error does not name allow-hosts"
grep -q '"intruder"' "$TEST_DIR/intruder.log" || fail "the refused proxy's error does not name its host"
log "refused proxy gave up after $((SECONDS - start))s"
# It left nothing behind: the backend's host and the served proxy only.
_only_served() {
    list_json | jq -e '[.hosts[].hostname] | sort == ["compute-b", "storage"]' >/dev/null &&
        list_json | jq -e '(.blkdevs | length) == 1 and (.channels | length) == 2' >/dev/null
}
_wait_until 10 "the refused proxy's slots to be released" _only_served
nbdinfo --size "$PROXY_URI" >/dev/null || fail "the listed host is no longer served"
stop_all || fail "a server did not stop cleanly"
log "PASS"
