#!/usr/bin/env bash
# The test command: installs what is missing, builds cbd and runs every test.
#
#   1. plain build (warnings are errors): unit, end-to-end (including the
#      kernel nbd driver in QEMU guests, device-DAX across two guest
#      kernels, the Debian package and the man pages);
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build: unit and
#      end-to-end tests again (the QEMU guest tests are left to the plain run);
#   3. clang build of the libFuzzer targets, each run for a bounded time.
#
# Build directories: build/, build-asan/, build-fuzz/ (reused when present).
# CBD_FUZZ_SECONDS sets each fuzzer's run time (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
jobs=$(nproc)
failed=()

# suite NAME BUILD_DIR CTEST_ARGS -- CMAKE_ARGS...
suite() {
    local name=$1 dir=$2 ctest_args=$3
    shift 4
    echo "==== $name: configure and build ($dir)"
    mkdir -p "$dir"
    if ! cmake -S . -B "$dir" -DCBD_WERROR=ON "$@" >"$dir/configure.log" 2>&1; then
        cat "$dir/configure.log"
        failed+=("$name (configure)")
        return
    fi
    if ! cmake --build "$dir" -j "$jobs" >"$dir/build.log" 2>&1; then
        tail -n 60 "$dir/build.log"
        failed+=("$name (build)")
        return
    fi
    echo "==== $name: tests"
    # shellcheck disable=SC2086 # ctest_args is a list of words
    if ! (cd "$dir" && ctest --output-on-failure --timeout 900 $ctest_args); then
        failed+=("$name (tests)")
    fi
}

suite "plain" build "" -- -DCMAKE_BUILD_TYPE=RelWithDebInfo
suite "sanitizers" build-asan "-E e2e/test-vm-" -- -DCMAKE_BUILD_TYPE=Debug -DCBD_SANITIZE=ON
CC=clang CXX=clang++ suite "fuzz" build-fuzz "-L fuzz" -- -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCBD_SANITIZE=ON \
    -DCBD_FUZZ_SECONDS="${CBD_FUZZ_SECONDS:-60}"

if ((${#failed[@]})); then
    echo "test.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "test.sh: all suites passed"
