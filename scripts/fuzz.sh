#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan) into ${BUILD_DIR:-build-fuzz} and
# runs each for ${FUZZ_SECONDS:-60} seconds, inputs up to 4 KiB (checkpoints: 64 KiB), 512 MB per
# allocation, 10 s per input. A finding is written as fuzz/findings/<target>/crash-* (or leak-*,
# timeout-*, oom-*) and makes the script fail; turn each into a regression test with its input.
# Usage:
#   scripts/fuzz.sh [target...]   (default: every target: idx accountant_state dptrain_config
#                                  dpaccount_args checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx accountant_state dptrain_config dpaccount_args checkpoint)
CC=clang CXX=clang++ cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDPTORCH_FUZZ=ON -DDPTORCH_BUILD_TESTS=OFF -DDPTORCH_BUILD_EXAMPLES=OFF -DDPTORCH_BUILD_TOOLS=OFF \
  -DDPTORCH_BUILD_BENCH=OFF -DDPTORCH_INSTALL=OFF >/dev/null
cmake --build "$build_dir" --parallel "${JOBS:-$(nproc)}" \
  --target $(printf 'fuzz_%s ' "${targets[@]}")
# libtorch is not instrumented; its own leak at start-up is suppressed (scripts/lsan.supp).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0} LSAN_OPTIONS=suppressions=$PWD/scripts/lsan.supp
status=0
for target in "${targets[@]}"; do
  corpus=$build_dir/corpus/$target findings=fuzz/findings/$target seeds=fuzz/seeds/$target
  max_len=4096
  mkdir -p "$corpus" "$findings"
  if [ "$target" = checkpoint ]; then
    # A checkpoint depends on this build's torch: the target writes its seeds itself.
    seeds=$build_dir/seeds/checkpoint max_len=65536
    mkdir -p "$seeds"
    DPTORCH_FUZZ_SEEDS=$seeds "$build_dir/fuzz/fuzz_checkpoint"
  fi
  echo "== fuzz: $target for ${seconds} s"
  if ! "$build_dir/fuzz/fuzz_$target" "$corpus" "$seeds" -max_total_time="$seconds" \
      -max_len="$max_len" -malloc_limit_mb=512 -rss_limit_mb=4096 -timeout=10 \
      -artifact_prefix="$findings/" -print_final_stats=1 2>&1 | tail -n 20; then
    status=1
  fi
done
exit $status
