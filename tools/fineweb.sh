#!/bin/bash
# From nothing to every shard set the configs in yaml/paper/ read (docs/fineweb.md):
#   1. the FineWeb-edu 10BT sample (its parquet files), downloaded with huggingface_hub; resumable
#   2. an 8k BPE tokenizer trained on 100 MB of it                          -> $DATA/tokenizer.model
#   3. shards with rows of 256, 512 and 1024 (= 256 x 4) tokens             -> $DATA/shards-256, -512, -1024
#   4. with MEMTRAIN_LLM (a Hugging Face model directory such as Llama-3.2-1B): dual shards of 4 chunks of
#      256 encoder and 256 decoder tokens                                 -> $DATA/shards-llama32-dual
# Every step is skipped when its output exists, and a shard build killed half-way resumes where it stopped,
# so the script can simply be run again. Settings (environment variables):
#   MEMTRAIN_DATA      output root, default data/fineweb (the paper configs' paths)
#   MEMTRAIN_CORPUS    use these parquet/jsonl/txt sources instead of downloading (space-separated)
#   MEMTRAIN_DOWNLOAD  where the sample is downloaded, default data/fineweb-edu
#   MEMTRAIN_VOCAB     tokenizer vocabulary, default 8000
#   MEMTRAIN_WORKERS   processes per shard build, default: all CPUs
#   MEMTRAIN_LLM       decoder model directory for the dual shards (step 4 is skipped without it)
#   MEMTRAIN_SHARDS_ARGS  more `memtrain data shards` arguments, e.g. "--val-fraction 0.005"
#   MEMTRAIN_PYTHON    the Python that has memtrain installed, default python
set -euo pipefail
PY=${MEMTRAIN_PYTHON:-python}
DATA=${MEMTRAIN_DATA:-data/fineweb}
DOWNLOAD=${MEMTRAIN_DOWNLOAD:-data/fineweb-edu}
VOCAB=${MEMTRAIN_VOCAB:-8000}
WORKERS=${MEMTRAIN_WORKERS:-$(nproc 2>/dev/null || echo 2)}
mkdir -p "$DATA"
step() { echo "[$(date -u +%H:%M:%S)] $*"; }

if [ -n "${MEMTRAIN_CORPUS:-}" ]; then
  read -r -a CORPUS <<< "$MEMTRAIN_CORPUS"
else
  step "download HuggingFaceFW/fineweb-edu sample/10BT into $DOWNLOAD"
  "$PY" - "$DOWNLOAD" <<'PYEOF'
import sys
from huggingface_hub import snapshot_download

snapshot_download("HuggingFaceFW/fineweb-edu", repo_type="dataset", allow_patterns="sample/10BT/*.parquet",
                  local_dir=sys.argv[1])
PYEOF
  CORPUS=("$DOWNLOAD/sample/10BT")
fi

if [ ! -f "$DATA/tokenizer.model" ]; then
  step "tokenizer: vocab $VOCAB"
  "$PY" -m memtrain data tokenizer --input "${CORPUS[@]}" --out "$DATA" --vocab-size "$VOCAB" --threads "$WORKERS"
fi

for ROW in 256 512 1024; do
  OUT="$DATA/shards-$ROW"
  if [ -f "$OUT/memtrain_shards.json" ]; then step "$OUT: done before"; continue; fi
  step "shards: rows of $ROW tokens -> $OUT"
  # shellcheck disable=SC2086
  "$PY" -m memtrain data shards --input "${CORPUS[@]}" --tokenizer "$DATA/tokenizer.model" --out "$OUT" \
    --row-len "$ROW" --workers "$WORKERS" --no-progress ${MEMTRAIN_SHARDS_ARGS:-}
done

if [ -n "${MEMTRAIN_LLM:-}" ]; then
  OUT="$DATA/shards-llama32-dual"
  if [ -f "$OUT/memtrain_shards.json" ]; then
    step "$OUT: done before"
  else
    step "dual shards: 4 chunks of 256 encoder / 256 decoder tokens -> $OUT"
    # shellcheck disable=SC2086
    "$PY" -m memtrain data shards --input "${CORPUS[@]}" --tokenizer "$DATA/tokenizer.model" --out "$OUT" \
      --decoder-tokenizer "$MEMTRAIN_LLM" --chunk-len 256 --chunks 4 --decoder-chunk-len 256 --no-progress \
      ${MEMTRAIN_SHARDS_ARGS:-}
  fi
else
  step "dual shards skipped: set MEMTRAIN_LLM to the decoder's model directory to make them"
fi
step "done: $(ls -d "$DATA"/shards-* | tr '\n' ' ')"
