#!/usr/bin/env bash
# The whole test suite from a fresh Debian 12 machine: installs what is missing, configures,
# builds, runs every ctest label except bench. Exits non-zero on any failure.
# Usage: tests/run.sh [extra ctest args]   (BUILD_DIR overrides the build folder, default build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
"$root/deploy/scripts/install-deps.sh" "$build"
cmake -S "$root" -B "$build" -DKVTIER_PYTHON="$build/venv/bin/python" >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure --timeout 1200 -LE bench -j"$(nproc)" "$@"
