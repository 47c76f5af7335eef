#!/usr/bin/env bash
# DeepSpeed on a GPU machine: the ZeRO 0-3 (and, with 2 GPUs, pipeline) equivalence of tests/test_deepspeed.py
# on CUDA with NCCL, then the throughput of the paper-size memory model (yaml/paper/memory_mixer_e512_d512.yaml)
# under the plain engine and each ZeRO stage. Results go under $OUT (default runs/gpu_check_deepspeed):
#   env.txt  equivalence.{log,json}  bench_zero.{txt,json}  summary.txt
# tools/gpu_check.sh calls this script when it exists; alone:
#   OUT=$OUT bash tools/gpu_check_deepspeed.sh        (offline wheels in .whl/: docs/distributed.md)
# Where the GPU machine's Python lacks deepspeed or mosaicml-streaming, their wheels (and the few of their needs
# it lacks) are installed from .whl/ (see docs/distributed.md for the list and how to build it). Budget: about 6 minutes
# on one H100. DS_CHECK_DEVICE=cpu runs the same stages on CPU (how the script itself is tested), and
# DS_CHECK_BENCH_CONFIG=yaml/tiny.yaml benchmarks a smaller model; DS_CHECK_EQ_CAP and DS_CHECK_BENCH_CAP (240, 300 s)
# cap the two stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check_deepspeed}
PY=${PYTHON:-python3}
DEVICE=${DS_CHECK_DEVICE:-cuda}
BENCH_CONFIG=${DS_CHECK_BENCH_CONFIG:-yaml/paper/memory_mixer_e512_d512.yaml}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
fail() { echo "gpu_check_deepspeed: FAILED: $1" | tee -a "$OUT/summary.txt"; status=1; }

if ! "$PY" -c "import deepspeed, pydantic, yaml, hjson, zstd, snappy, brotli, catalogue" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || fail "installing .whl/*.whl"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    fail "deepspeed is not importable and there is no .whl/ to install it from"
  fi
fi

source tools/gpu_env.sh
memtrain_install || true

{
  date -u '+%Y-%m-%d %H:%M UTC'
  echo "commit ${MEMTRAIN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  "$PY" -c "from memtrain.data.streaming_compat import import_streaming; print('streaming', import_streaming().__version__)"
} > "$OUT/env.txt" 2>&1 || fail "environment (see env.txt)"
cat "$OUT/env.txt"
if [ "$DEVICE" = cuda ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$NGPU" -ge 1 ] || fail "no CUDA device"
  NPROC=$(( NGPU >= 2 ? 2 : 1 ))
else
  NPROC=2
fi

echo "== ZeRO 0-3 equivalence on $DEVICE, $NPROC rank(s)" | tee -a "$OUT/summary.txt"
timeout "${DS_CHECK_EQ_CAP:-240}" "$PY" tools/ds_equivalence.py --device "$DEVICE" --nproc "$NPROC" --work /tmp/ds_equivalence \
  --json "$OUT/equivalence.json" > "$OUT/equivalence.log" 2>&1 || fail "equivalence (see equivalence.log)"
grep -E '^(zero|pipeline|ds_equivalence)' "$OUT/equivalence.log" | tee -a "$OUT/summary.txt"

echo "== ZeRO throughput: $BENCH_CONFIG" | tee -a "$OUT/summary.txt"
if [ "$DEVICE" = cuda ]; then BENCH_ARGS=(--steps 10 --warmup 3); else BENCH_ARGS=(--steps 2 --warmup 1 --batch-size 1); fi
timeout "${DS_CHECK_BENCH_CAP:-300}" "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29517 tools/bench_deepspeed.py \
  "$BENCH_CONFIG" --device "$DEVICE" --variants plain,zero0,zero1,zero2,zero3 \
  "${BENCH_ARGS[@]}" --json "$OUT/bench_zero.json" > "$OUT/bench_zero.txt" 2>&1 || fail "ZeRO benchmark (see bench_zero.txt)"
grep -E '^(#|\|)' "$OUT/bench_zero.txt" | tee -a "$OUT/summary.txt"

echo "== gpu_check_deepspeed: $([ $status = 0 ] && echo ALL GREEN || echo FAILURES)" | tee -a "$OUT/summary.txt"
exit $status
