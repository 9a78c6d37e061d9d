#!/usr/bin/env bash
# Builds the tests under AddressSanitizer + UndefinedBehaviorSanitizer and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
export BUILD_DIR=${BUILD_DIR:-build-asan} BUILD_TYPE=RelWithDebInfo
# LeakSanitizer is on; scripts/lsan.supp names, with a comment each, the leaks that are libtorch's
# own (it is not instrumented, and not ours to fix). ODR checking is off: libtorch and its
# dependencies define some globals twice, which is theirs too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:detect_odr_violation=0}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
scripts/setup.sh
scripts/build.sh -DDPTORCH_SANITIZE=ON -DDPTORCH_BUILD_BENCH=OFF
cd "$BUILD_DIR" && ctest --output-on-failure --timeout 1800 -j "${JOBS:-$(nproc)}" "$@"
