#!/usr/bin/env bash
# run-fuzzer.sh FUZZER SEED_DIR WORK_DIR SECONDS
#
# Runs a libFuzzer target for a bounded time: first over the committed seeds
# (every one must pass), then fuzzing into a scratch corpus in the build
# tree.  CBD_FUZZ_SECONDS in the environment overrides SECONDS.  The last
# status lines (executions, coverage, exec/s) are printed for the record.
set -euo pipefail
fuzzer=$1 seeds=$2 work=$3 seconds=${CBD_FUZZ_SECONDS:-$4}
mkdir -p "$work"
log=$work/fuzz.log
"$fuzzer" -runs=0 "$seeds" >"$log" 2>&1 || { cat "$log"; echo "a seed input fails"; exit 1; }
status=0
"$fuzzer" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 "$work" "$seeds" >"$log" 2>&1 || status=$?
grep -E '^#[0-9]+.*(DONE|INITED)|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb' "$log" || true
if ((status != 0)); then
    tail -n 60 "$log"
    exit "$status"
fi
