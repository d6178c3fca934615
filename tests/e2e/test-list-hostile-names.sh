#!/usr/bin/env bash
# Names a peer writes into its own slots (host names, export names) reach
# whoever runs `cbd-proxy list`: the text output escapes control characters
# and non-ASCII bytes (\x1b, \x07, \xff) so no escape sequence reaches the
# terminal; --json carries the names exactly, as valid JSON with the usual
# keys.
source "$(dirname "$0")/functions.sh"
require_built
require jq

host=$'evil\e[2J\e]0;owned\a'
export_name=$'disk\e[31m\x01\x7f'
proxy_host=$'vm\e[H\\'
backing=$TEST_DIR/backing.img
truncate -s 16M "$backing"
fast_transport
start_backend file="$backing" hostname="$host" export="$export_name"
start_proxy hostname="$proxy_host"

"$CBD_PROXY" list transport="$TRANSPORT" >"$TEST_DIR/list.txt" || fail "cbd-proxy list failed"
cat "$TEST_DIR/list.txt" >&2
# Nothing but printable ASCII and newlines.
if LC_ALL=C grep -q '[^[:print:]]' "$TEST_DIR/list.txt"; then
    fail "the text output holds control or non-ASCII bytes: $(LC_ALL=C grep -n '[^[:print:]]' "$TEST_DIR/list.txt" | cat -A)"
fi
grep -qF 'hostname evil\x1b[2J\x1b]0;owned\x07' "$TEST_DIR/list.txt" || fail "the backend's host name is not shown escaped"
grep -qF 'export "disk\x1b[31m\x01\x7f"' "$TEST_DIR/list.txt" || fail "the export name is not shown escaped"
grep -qF 'hostname vm\x1b[H\\' "$TEST_DIR/list.txt" || fail "the proxy's host name is not shown escaped"

list_json >"$TEST_DIR/list.json" || fail "cbd-proxy list --json failed"
jq -e . "$TEST_DIR/list.json" >/dev/null || fail "--json is not valid JSON"
[[ $(jq -r '.hosts[] | select(.owner_pid == '"$BACKEND_PID"') | .hostname' "$TEST_DIR/list.json") == "$host" ]] ||
    fail "--json does not carry the backend's host name exactly"
[[ $(jq -r '.backends[0].export' "$TEST_DIR/list.json") == "$export_name" ]] ||
    fail "--json does not carry the export name exactly"
[[ $(jq -r '.hosts[] | select(.owner_pid == '"$PROXY_PID"') | .hostname' "$TEST_DIR/list.json") == "$proxy_host" ]] ||
    fail "--json does not carry the proxy's host name exactly"
# Every key of the documented schema is there.
jq -e '(.transport | type == "string") and
       (.geometry | has("version") and has("uuid") and has("region_size") and has("checksum") and has("flush")
                    and has("heartbeat_interval_ms") and has("dead_after_ms") and has("hosts") and has("backends")
                    and has("blkdevs") and has("channels") and (.channel | has("sq_entries") and has("cq_entries")
                    and has("data_size"))) and
       (.backends[0] | has("id") and has("state") and has("epoch") and has("alive") and has("owner_host")
                       and has("owner_pid") and has("export") and has("size") and has("block_min")
                       and has("block_preferred") and has("block_max") and has("caps")) and
       (.blkdevs[0] | has("backend") and has("backend_epoch") and has("queues")) and
       (.channels[0] | has("backend") and has("blkdev") and has("generation") and has("attached") and has("requests")
                       and has("bytes") and has("errors") and has("in_flight") and has("handler_completed")
                       and has("handler_errors"))' "$TEST_DIR/list.json" >/dev/null ||
    fail "--json lacks keys of its schema"

# A name that is not UTF-8 still gives a valid document (U+FFFD for the
# bytes that are not) and an escaped text line.
stop_all || fail "a server did not stop cleanly"
start_backend file="$backing" hostname=$'bad\xff\xfename'
"$CBD_PROXY" list transport="$TRANSPORT" | grep -qF 'hostname bad\xff\xfename' || fail "a non-UTF-8 name is not escaped"
list_json | jq -e '.hosts[] | select(.hostname == "bad\ufffd\ufffdname")' >/dev/null ||
    fail "--json does not replace the bytes that are not UTF-8"
stop_all || fail "a server did not stop cleanly"
log "PASS"
