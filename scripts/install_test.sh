#!/usr/bin/env bash
# Installs dptorch into a prefix under the build folder and builds a tiny consumer with
# find_package(dptorch), then runs it. (Under the build folder, not /tmp: /tmp may be noexec.)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=$(realpath "${BUILD_DIR:-build}")
prefix="$build_dir/install-test"
rm -rf "$prefix"
# Quiet when it works; the whole output of a failing step.
quietly() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    echo "install_test: failed: $*" >&2
    exit 1
  fi
  rm -f "$log"
}
quietly cmake --install "$build_dir" --prefix "$prefix"
# The export names imported targets (torch, OpenMP::OpenMP_CXX, ...) that dptorchConfig.cmake finds
# again on the user's machine, never a library path of this one.
targets=$(find "$prefix" -name dptorchTargets.cmake)
if grep -E 'INTERFACE_LINK_LIBRARIES "(.*;)?/' "$targets"; then
  echo "install_test: the exported dptorch::dptorch links absolute paths (above)" >&2
  exit 1
fi
# Only public headers are installed, and none includes an internal one.
if [ -n "$(find "$prefix/include/dptorch" -name '*_internal.h' -o -name fft.h -o -name numerics.h -o -name philox.h)" ]; then
  echo "install_test: internal headers were installed" >&2
  exit 1
fi
quietly cmake -S tests/install_consumer -B "$prefix/consumer-build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
quietly cmake --build "$prefix/consumer-build"
"$prefix/consumer-build/consumer"
rm -rf "$prefix"
echo "install_test: the installed package builds and runs a consumer"
