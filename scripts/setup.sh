#!/usr/bin/env bash
# Installs every dependency of dptorch from Debian packages. Idempotent: a no-op when all are present.
set -euo pipefail
packages=(build-essential cmake ninja-build ccache clang-format libtorch-dev libopenblas0-openmp
          zlib1g-dev libgloo-dev googletest libgtest-dev libgmock-dev libcli11-dev nlohmann-json3-dev
          dataset-fashion-mnist)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
