#!/usr/bin/env bash
# Installs what kvtier needs to build, test and run on Debian 12, as root, only what is
# missing. Python tools go into a venv under the build directory (pyenv's python3, which sees
# PyPI), never into the system. Usage: install-deps.sh [BUILD_DIR]
set -euo pipefail
build_dir=${1:-build}

apt_pkgs=(build-essential cmake pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
          liburing-dev libjemalloc-dev redis-server libhiredis-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages: ${missing[*]} (run as root to install)" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python test tools and the Python client's dependencies, in a venv under the build dir.
py=${KVTIER_PYTHON:-python3}
venv="$build_dir/venv"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$build_dir"
  "$py" -m venv "$venv"
fi
req="$(dirname "$0")/requirements-test.txt"
stamp="$venv/.req-$(md5sum "$req" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
