#!/usr/bin/env bash
# Mutation check of the privacy-critical code: for each one-line breakage in scripts/mutations.txt
# (file<TAB>exact substring<TAB>replacement<TAB>name), applies it, rebuilds the test binary, runs
# the tests, restores the file, and reports whether the tests CAUGHT the breakage (they fail),
# let it SURVIVE (they pass), or it did not build (BUILD-FAILED). A substring that does not occur
# exactly once in its file is an ERROR (the list needs re-targeting), never a pass.
#
# Usage: scripts/mutate.sh [-f GTEST_FILTER] [-t SECONDS] [-l LIST] [-n] [-d] [NAME...]
#   NAME...     run only the mutations with these names (default: all)
#   -f FILTER   --gtest_filter for the test run (default: $MUTATE_FILTER, else all tests, ~2 min
#               here); the privacy pins alone take a second: -f '*AccountantPins*:*CalibrationPins*:
#               *AdaptivePins*:*EngineNoisePins*:*NoiseScale*:*ClippedSumReference*:*GdpClosedForm*'
#   -t SECONDS  per-mutation limit on the test run, a timeout counts as caught (default 900)
#   -l LIST     the mutation list (default scripts/mutations.txt)
#   -n          skip the final rebuild of the unmutated sources (leaves a mutated binary!)
#   -d          dry run: check every pattern and show each mutation's diff; no build, no tests
# Environment: BUILD_DIR (default build), an already configured build directory.
#
# The file under mutation is restored after every mutation and on any exit (Ctrl-C included), and
# touched so that ninja rebuilds it; the script ends with a rebuild of the clean sources.
set -uo pipefail
cd "$(dirname "$0")/.."
shopt -u patsub_replacement 2>/dev/null || true

build_dir=${BUILD_DIR:-build}
filter=${MUTATE_FILTER:-*}
limit=900
list=scripts/mutations.txt
final_build=1
dry_run=0
while getopts "f:t:l:ndh" opt; do
  case $opt in
    f) filter=$OPTARG ;;
    t) limit=$OPTARG ;;
    l) list=$OPTARG ;;
    n) final_build=0 ;;
    d) dry_run=1 final_build=0 ;;
    h) sed -n '2,19p' "$0"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
only=("$@")

if [[ ! -f $build_dir/build.ninja ]]; then
  echo "mutate.sh: $build_dir is not a configured build directory; run scripts/build.sh first" >&2
  exit 2
fi
if [[ ! -f $list ]]; then
  echo "mutate.sh: no mutation list $list" >&2
  exit 2
fi

log_dir=$(mktemp -d "${TMPDIR:-/tmp}/dptorch-mutate.XXXXXX")
backup=$log_dir/original
mutated_file=""

restore() {
  if [[ -n $mutated_file ]]; then
    cat "$backup" >"$mutated_file"
    # A dry run leaves the build as it was; otherwise ninja must rebuild the restored file.
    if [[ $dry_run -eq 1 ]]; then touch -r "$backup" "$mutated_file"; else touch "$mutated_file"; fi
    mutated_file=""
  fi
}
on_exit() {
  local status=$?
  restore
  exit "$status"
}
trap on_exit EXIT
trap 'echo; echo "mutate.sh: interrupted, $mutated_file restored"; exit 130' INT TERM

wanted() {
  [[ ${#only[@]} -eq 0 ]] && return 0
  local n
  for n in "${only[@]}"; do [[ $n == "$1" ]] && return 0; done
  return 1
}

caught=0 survived=0 build_failed=0 errors=0 checked=0
declare -a report
declare -A seen
while IFS=$'\t' read -r file pattern replacement name rest || [[ -n ${file:-} ]]; do
  [[ -z ${file// /} || ${file:0:1} == "#" ]] && continue
  if [[ -z ${pattern:-} || -z ${name:-} || -n ${rest:-} ]]; then
    wanted "${name:-}" || continue
    report+=("ERROR         ${name:-$file}: malformed line (want file<TAB>substring<TAB>replacement<TAB>name)")
    errors=$((errors + 1))
    continue
  fi
  wanted "$name" || continue
  seen[$name]=1
  if [[ ! -f $file ]]; then
    report+=("ERROR         $name: $file does not exist")
    errors=$((errors + 1))
    continue
  fi
  # The whole file, trailing newlines included (the x keeps $(...) from stripping them).
  content=$(cat "$file"; printf x)
  content=${content%x}
  without=${content//"$pattern"/}
  count=$(((${#content} - ${#without}) / ${#pattern}))
  if [[ $count -ne 1 ]]; then
    what=$([[ $count -eq 0 ]] && echo "pattern not found" || echo "pattern ambiguous ($count matches)")
    report+=("ERROR         $name: $what in $file")
    errors=$((errors + 1))
    continue
  fi

  cp -p "$file" "$backup"
  mutated_file=$file
  printf '%s' "${content/"$pattern"/"$replacement"}" >"$file"
  echo "== $name: $file"
  echo "   - $pattern"
  echo "   + $replacement"
  if [[ $dry_run -eq 1 ]]; then
    diff -u "$backup" "$file" | tail -n +3 | grep '^[-+]' | sed 's/^/   /'
    restore
    checked=$((checked + 1))
    report+=("$(printf '%-13s %s' "APPLIES" "$name")")
    continue
  fi
  log=$log_dir/$name.log
  start=$SECONDS
  if ! ninja -C "$build_dir" dptorch_tests >"$log" 2>&1; then
    result="BUILD-FAILED"
    build_failed=$((build_failed + 1))
  else
    timeout "$limit" "$build_dir/tests/dptorch_tests" --gtest_filter="$filter" --gtest_brief=1 \
      >>"$log" 2>&1
    status=$?
    if [[ $status -eq 0 ]]; then
      result="SURVIVED"
      survived=$((survived + 1))
    else
      result="CAUGHT"
      caught=$((caught + 1))
      if [[ $status -eq 124 ]]; then
        name="$name (timeout after ${limit}s)"
      else
        # How many tests failed, and the first two, for the report.
        failing=$(grep -o '^\[  FAILED  \] [^ ,(]*' "$log" | sed 's/^\[  FAILED  \] //' | sort -u)
        if [[ -n $failing ]]; then
          name="$name [$(wc -l <<<"$failing") failed: $(head -2 <<<"$failing" | paste -sd' ' -)]"
        fi
      fi
    fi
  fi
  restore
  line=$(printf '%-13s %s (%ds)' "$result" "$name" $((SECONDS - start)))
  echo "   $line"
  report+=("$line")
done <"$list"
for name in "${only[@]}"; do
  if [[ -z ${seen[$name]:-} ]]; then
    report+=("ERROR         $name: no mutation of that name in $list")
    errors=$((errors + 1))
  fi
done

if [[ $final_build -eq 1 ]]; then
  echo "== rebuilding the unmutated sources"
  ninja -C "$build_dir" dptorch_tests >"$log_dir/final.log" 2>&1 ||
    echo "mutate.sh: the final rebuild failed; see $log_dir/final.log" >&2
fi

echo
echo "Mutation results (filter '$filter'; logs in $log_dir):"
for line in "${report[@]}"; do echo "  $line"; done
if [[ $dry_run -eq 1 ]]; then
  echo "$checked apply cleanly, $errors errors"
  [[ $errors -eq 0 ]]
  exit
fi
echo "$caught caught, $survived survived, $build_failed build-failed, $errors errors"
[[ $survived -eq 0 && $errors -eq 0 && $build_failed -eq 0 ]]
