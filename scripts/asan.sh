#!/usr/bin/env bash
# Builds the tests under AddressSanitizer + UndefinedBehaviorSanitizer and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
export BUILD_DIR=${BUILD_DIR:-build-asan} BUILD_TYPE=RelWithDebInfo
# libtorch itself is not instrumented; leaks inside it are not ours to report.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_odr_violation=0} UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
scripts/setup.sh
scripts/build.sh -DDPTORCH_SANITIZE=ON -DDPTORCH_BUILD_BENCH=OFF
cd "$BUILD_DIR" && ctest --output-on-failure --timeout 1800 -j "${JOBS:-$(nproc)}" "$@"
