#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine, builds, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DDPTORCH_WERROR=ON "$@"
cd "${BUILD_DIR:-build}"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest --output-on-failure --timeout 900 -j "${JOBS:-$(nproc)}"
