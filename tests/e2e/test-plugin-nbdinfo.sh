#!/usr/bin/env bash
# Storage node alone: `nbdkit cbd ... format=true` formats a fresh transport,
# serves the backing file as an ordinary NBD export (nbdinfo sees its size),
# and publishes a live host and a backend with the export size that
# `cbd-proxy list` shows while it runs. After SIGTERM no slot stays alive.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo nbdcopy jq

image=$TEST_DIR/disk.img
make_image "$image" 96M
expected_size=$(stat -c %s "$image")

# The transport does not exist yet: format=true must create and format it.
# The --run command runs while nbdkit serves; it records what it sees.
run_client nbdkit -U - "$CBD_PLUGIN" transport="$TRANSPORT" file="$image" format=true \
    --run "nbdinfo \"\$uri\" >'$TEST_DIR/nbdinfo.txt' &&
           nbdinfo --size \"\$uri\" >'$TEST_DIR/size.txt' &&
           sleep 0.5 &&
           '$CBD_PROXY' list transport='$TRANSPORT' >'$TEST_DIR/list.txt' &&
           '$CBD_PROXY' list transport='$TRANSPORT' --json >'$TEST_DIR/list.json'" \
    >"$TEST_DIR/nbdkit.log" 2>&1 ||
    { cat "$TEST_DIR/nbdkit.log" >&2; fail "nbdkit --run failed"; }

cat "$TEST_DIR/nbdinfo.txt"
grep -q "export-size: $expected_size" "$TEST_DIR/nbdinfo.txt" ||
    fail "nbdinfo does not show export-size $expected_size"
[[ $(cat "$TEST_DIR/size.txt") == "$expected_size" ]] ||
    fail "nbdinfo --size says $(cat "$TEST_DIR/size.txt"), backing file has $expected_size bytes"

cat "$TEST_DIR/list.txt"
jq . "$TEST_DIR/list.json" >/dev/null || fail "cbd-proxy list --json is not valid JSON"
jq -e '[.hosts[] | select(.alive == true)] | length >= 1' "$TEST_DIR/list.json" >/dev/null ||
    fail "list shows no live host while nbdkit serves"
jq -e --argjson size "$expected_size" \
    '[.backends[] | select(.alive == true and .size == $size)] | length == 1' \
    "$TEST_DIR/list.json" >/dev/null ||
    fail "list shows no live backend with size $expected_size while nbdkit serves"
human=$(numfmt --to=iec "$expected_size")   # e.g. 96M
grep -Eq "$expected_size|${human%[A-Z]}(\.0+)? ?${human: -1}(i?B)?" "$TEST_DIR/list.txt" ||
    fail "plain list output does not mention the export size"

# nbdkit has exited (--run ends it): its slots must be released.
list_json >"$TEST_DIR/after.json"
jq -e '[.hosts[], .backends[] | select(.alive == true)] | length == 0' "$TEST_DIR/after.json" >/dev/null ||
    { jq . "$TEST_DIR/after.json" >&2; fail "slots still alive after nbdkit exited"; }

# A second start on the now formatted transport must attach, not reformat
# or refuse, and still serve the same bytes.
run_client nbdkit -U - "$CBD_PLUGIN" transport="$TRANSPORT" file="$image" format=true \
    --run "nbdcopy \"\$uri\" '$TEST_DIR/copy.img'" >"$TEST_DIR/nbdkit2.log" 2>&1 ||
    { cat "$TEST_DIR/nbdkit2.log" >&2; fail "second nbdkit start failed"; }
cmp "$image" "$TEST_DIR/copy.img" || fail "nbdkit's own export does not read back the backing file"

log "PASS"
