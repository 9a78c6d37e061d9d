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
quietly cmake -S tests/install_consumer -B "$prefix/consumer-build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
quietly cmake --build "$prefix/consumer-build"
"$prefix/consumer-build/consumer"
rm -rf "$prefix"
echo "install_test: the installed package builds and runs a consumer"
