#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine, builds, and runs the main job: dptrain, private
# training on Fashion-MNIST at epsilon = 3 (a linear model on scattering features, dptrain's default).
# Extra arguments go to dptrain (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
DPTORCH_BUILD_TESTS=OFF scripts/build.sh -DDPTORCH_BUILD_TESTS=OFF -DDPTORCH_BUILD_BENCH=OFF >/dev/null
exec build/tools/dptrain --out "${OUT:-runs/dptrain}" "$@"
