#!/usr/bin/env bash
# Racing admins (design §3.4): two backends and eight proxies start at the
# same instant on one transport that has room for only six blkdevs.  Every
# process gets slots of its own or fails with a clear "no free ... slot"
# error; no slot is held by two owners, and every owner listed is alive.
source "$(dirname "$0")/functions.sh"
require_built
require jq nbdinfo

backing0=$TEST_DIR/backing0.img
backing1=$TEST_DIR/backing1.img
truncate -s 16M "$backing0" "$backing1"
# 6 blkdevs for 8 proxies; 12 channels = 6 proxies x 2 queues.  Default
# liveness timing: nothing here dies, and a loaded machine must not make a
# stalled starter look dead.
format_transport size=64M blkdevs=6 channels=12
go=$TEST_DIR/go

# Proxies that lose the race must not outlive the test.
_race_cleanup() {
    local f
    for f in "$TEST_DIR"/racer-*.pid; do
        [[ -s $f ]] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
}
on_exit _race_cleanup

# Each racer waits for the start signal.  A proxy that finds its backend not
# yet published (the backends start at the same time) tries again; any
# other failure is final.
backend_racer() {
    local i=$1
    while [[ ! -e $go ]]; do sleep 0.005; done
    exec nbdkit -f -v -U "$TEST_DIR/backend-$i.sock" -P "$TEST_DIR/backend-$i.pid" \
        "$CBD_PLUGIN" transport="$TRANSPORT" file="$TEST_DIR/backing$i.img" hostname="storage$i" \
        >"$TEST_DIR/backend-$i.log" 2>&1
}
proxy_racer() {
    local i=$1 backend=$2 try
    while [[ ! -e $go ]]; do sleep 0.005; done
    for ((try = 0; try < 600; try++)); do
        "$CBD_PROXY" connect backend="$backend" transport="$TRANSPORT" unix="$TEST_DIR/racer-$i.sock" \
            pidfile="$TEST_DIR/racer-$i.pid" queues=2 hostname="compute$i" >"$TEST_DIR/racer-$i.log" 2>&1 && exit 0
        grep -q "is not live" "$TEST_DIR/racer-$i.log" || exit 1
        sleep 0.02
    done
    exit 1
}

backend_pids=()
racer_pids=()
for i in 0 1; do
    backend_racer "$i" &
    backend_pids+=("$!")
    _cbd_pids+=("$!")
done
for i in 0 1 2 3 4 5 6 7; do
    proxy_racer "$i" $((i % 2)) &
    racer_pids+=("$!")
    _cbd_pids+=("$!")
done
touch "$go"

# Settled when every proxy serves (pid file) or has given up.
_settled() {
    local i
    for i in 0 1 2 3 4 5 6 7; do
        [[ -s $TEST_DIR/racer-$i.pid ]] || ! kill -0 "${racer_pids[i]}" 2>/dev/null || return 1
    done
    [[ -s $TEST_DIR/backend-0.pid && -s $TEST_DIR/backend-1.pid ]]
}
_wait_until 90 "all racers to serve or give up" _settled

serving=()
refused=0
for i in 0 1 2 3 4 5 6 7; do
    if [[ -s $TEST_DIR/racer-$i.pid ]]; then
        serving+=("$i")
    else
        wait "${racer_pids[i]}" || true
        grep -Eq "no free (host|blkdev) slot|no free channel" "$TEST_DIR/racer-$i.log" ||
            { cat "$TEST_DIR/racer-$i.log" >&2; fail "proxy $i failed without a clear no-free-slot error"; }
        log "proxy $i: $(grep -Eo 'no free [a-z]+( slot)?' "$TEST_DIR/racer-$i.log")"
        refused=$((refused + 1))
    fi
done
log "${#serving[@]} proxies serve, $refused refused"
((${#serving[@]} == 6 && refused == 2)) || fail "expected 6 serving proxies and 2 refusals"
for i in "${serving[@]}"; do
    nbdinfo --size "nbd+unix:///?socket=$TEST_DIR/racer-$i.sock" >/dev/null || fail "proxy $i does not serve"
done

json=$(list_json)
expected_pids=$( { cat "$TEST_DIR"/backend-[01].pid; for i in "${serving[@]}"; do cat "$TEST_DIR/racer-$i.pid"; done; } | sort -n)
# One host slot per process, distinct, alive, and owned by the live pid that
# claimed it.
[[ $(jq -r '.hosts[].owner_pid' <<<"$json" | sort -n) == "$expected_pids" ]] ||
    fail "host slot owners differ from the running processes: $(jq -c '[.hosts[] | {id, owner_pid, hostname}]' <<<"$json")"
for pid in $expected_pids; do kill -0 "$pid" 2>/dev/null || fail "owner pid $pid is not running"; done
jq -e '[.hosts[], .backends[], .blkdevs[], .channels[]] | all(.alive)' <<<"$json" >/dev/null ||
    fail "a listed slot is not alive"
# Two backends in distinct slots on distinct hosts, each with its own pid.
jq -e '(.backends | length) == 2 and ([.backends[].owner_host] | unique | length) == 2' <<<"$json" >/dev/null ||
    fail "backends: $(jq -c '.backends' <<<"$json")"
# Six blkdevs on six distinct hosts; each proxy host owns exactly one blkdev
# and two channels, all with the pid of that host's owner.
jq -e '
  (.hosts | map({key: (.id | tostring), value: .owner_pid}) | from_entries) as $pid |
  (.blkdevs | length) == 6 and ([.blkdevs[].owner_host] | unique | length) == 6 and
  (.channels | length) == 12 and
  ([.channels[].owner_host] | group_by(.) | map(length) | all(. == 2)) and
  ([.channels[].owner_host] | unique) == ([.blkdevs[].owner_host] | sort) and
  ([.blkdevs[], .channels[] | .owner_pid == $pid[(.owner_host | tostring)]] | all) and
  ([.channels[] | .attached] | all)' <<<"$json" >/dev/null || {
    grep -h "reclaimed\|took over\|judged" "$TEST_DIR"/backend-*.log >&2 || true
    fail "slots shared or mismatched: $(jq -c '{blkdevs: [.blkdevs[] | {id, owner_host, owner_pid}],
        channels: [.channels[] | {id, owner_host, owner_pid, blkdev}]}' <<<"$json")"
}
log "owners: $(jq -c '[.hosts[] | "\(.hostname)=\(.owner_pid)"]' <<<"$json")"

# Clean shutdown releases everything.
for i in "${serving[@]}"; do kill -TERM "$(cat "$TEST_DIR/racer-$i.pid")"; done
for i in "${serving[@]}"; do wait "${racer_pids[i]}" || fail "proxy $i did not stop cleanly"; done
for pid in "${backend_pids[@]}"; do stop_process "$pid" || fail "backend $pid did not stop cleanly"; done
_cbd_pids=()
[[ $(list_json | jq '[.hosts[], .backends[], .blkdevs[], .channels[]] | length') == 0 ]] ||
    fail "slots left after every process stopped"
log "PASS"
