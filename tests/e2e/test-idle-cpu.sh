#!/usr/bin/env bash
# Neither daemon burns a core while idle (design §3.10): after some I/O and
# one second without any, nbdkit cbd and cbd-proxy together use well under
# a tenth of a CPU over the next five seconds.  A poller that kept spinning
# (or slept only microseconds) would use a whole core here.
source "$(dirname "$0")/functions.sh"
require_built
require nbdinfo qemu-io

backing=$TEST_DIR/backing.img
truncate -s 64M "$backing"
format_transport
start_backend file="$backing"
start_proxy

run_client qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' "$PROXY_URI" >/dev/null
sleep 1

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)
backend_before=$(cpu_ticks "$BACKEND_PID")
proxy_before=$(cpu_ticks "$PROXY_PID")
sleep 5
backend_used=$(($(cpu_ticks "$BACKEND_PID") - backend_before))
proxy_used=$(($(cpu_ticks "$PROXY_PID") - proxy_before))
percent() { awk -v t="$1" -v hz="$ticks_per_second" 'BEGIN { printf "%.1f", 100 * t / hz / 5 }'; }
log "idle CPU over 5 s: nbdkit cbd $(percent "$backend_used")%, cbd-proxy $(percent "$proxy_used")% of one CPU"
# 5% of one CPU each: generous for a loaded machine, far below a spinning poller.
limit=$((ticks_per_second * 5 * 5 / 100))
((backend_used <= limit)) || fail "nbdkit cbd used $backend_used ticks while idle (limit $limit)"
((proxy_used <= limit)) || fail "cbd-proxy used $proxy_used ticks while idle (limit $limit)"

stop_all
log "PASS"
