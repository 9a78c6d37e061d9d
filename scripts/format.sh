#!/usr/bin/env bash
# Formats every C++ file with the repository's .clang-format; with --check, only reports (exit 1
# if any file would change).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tracked files; without a usable git (an export, or a clone owned by another user), the
# same folders found on disk.
if ! mapfile -t files < <(git ls-files '*.h' '*.cpp' 2>/dev/null) || [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(find include src tests tools bench examples -name '*.h' -o -name '*.cpp' | sort)
fi
[ ${#files[@]} -gt 0 ] || { echo "format: no C++ files found" >&2; exit 1; }
if [ "${1:-}" = "--check" ]; then
  clang-format --dry-run --Werror "${files[@]}"
  echo "format: ${#files[@]} files are formatted"
else
  clang-format -i "${files[@]}"
fi
