#!/usr/bin/env bash
# Formats every C++ file with the repository's .clang-format; with --check, only reports (exit 1
# if any file would change).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.h' '*.cpp')
if [ "${1:-}" = "--check" ]; then
  clang-format --dry-run --Werror "${files[@]}"
else
  clang-format -i "${files[@]}"
fi
