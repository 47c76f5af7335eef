#!/usr/bin/env bash
# GPU check for the fused kernels: CUDA kernel tests (bf16 + fp32, random ragged shapes, the 50-step
# triton-vs-torch training match), per-operator benchmarks, and the training benchmarks of the mixer
# autoencoder and the memory model. Results go under $OUT (default runs/gpu_check):
#   env.txt  kernels_test.log  bench_ops.{txt,json}  bench_ae.{txt,json}  bench_memory.{txt,json}  bench.json
#   train_cuda.log and train_cuda/profile/ (a tiny run on CUDA: the log line's MFU and memory, a trace, a memory snapshot)
# Budget: about 8 minutes on one H100, at most GPU_CHECK_BUDGET seconds (570) in all: each stage has a cap and
# gets what is left; a stage that fails or times out is reported and the others still run; the exit code is
# non-zero if any stage failed. Order: tests, autoencoder benchmark, memory benchmark, CUDA training, operator benchmarks.
# bench.json gathers every number with env.txt, the kernel tests' result line and summary.txt: one file per run
# (docs/performance/ keeps them).
#   MEMTRAIN_COMMIT=<short hash> bash tools/gpu_check.sh   (a copy without .git; offline wheels: docs/performance.md)
#   GPU_CHECK_QUICK=1 bash tools/gpu_check.sh  (fewer benchmark variants, about 5 minutes)
# It then runs tools/gpu_check_deepspeed.sh if that exists (about 6 more minutes, so past a 10-minute limit on
# one command): set GPU_CHECK_DEEPSPEED=0 here and run that script as a command of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
: > "$OUT/summary.txt"
fail() { echo "gpu_check: FAILED: $1" | tee -a "$OUT/summary.txt"; status=1; }
# One deadline for the whole check (it is meant to end within a 10-minute command limit): each stage gets its own cap or
# what is left, whichever is less, so a slow stage shortens the later ones instead of losing them all.
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))
limit() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }

# The image's Python may lack pydantic (memtrain.config), mosaicml-streaming (the demo shards of the training check) and
# deepspeed: with no package index there, they come as wheels in .whl/ (docs/performance.md), installed apart in /tmp/site.
if ! "$PY" -c "import pydantic, yaml, streaming, deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || fail "installing .whl/*.whl"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

source tools/gpu_env.sh
memtrain_install || true

{
  date -u '+%Y-%m-%d %H:%M UTC'
  echo "commit ${MEMTRAIN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1 || fail "environment"
cat "$OUT/env.txt"

echo "== kernel tests on CUDA" | tee -a "$OUT/summary.txt"
# -v --durations: each test's name and the slowest ones in the log; a per-test limit where pytest-timeout is there
PER_TEST=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120" || true)
timeout "$(limit "${GPU_CHECK_TEST_CAP:-200}")" "$PY" -m pytest -v --durations=15 --noconftest -p no:cacheprovider -rs $PER_TEST tests/test_kernels.py \
  tests/test_kernels_models.py > "$OUT/kernels_test.log" 2>&1 || fail "kernel tests (see kernels_test.log)"
tail -3 "$OUT/kernels_test.log" | tee -a "$OUT/summary.txt"

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then VARIANTS=torch,torch+compile,triton; else VARIANTS=torch,torch+compile,triton,triton+compile; fi
VARIANTS=${GPU_CHECK_VARIANTS:-$VARIANTS}  # e.g. torch,torch+compile to measure a subset again
bench() {  # name config cap: each variant's row is written to the JSON as soon as it is measured
  echo "== training benchmark: $2" | tee -a "$OUT/summary.txt"
  timeout "$(limit "$3")" "$PY" -m memtrain.bench "$2" --variants "$VARIANTS" --steps 10 --warmup 3 --profile 12 \
    --json "$OUT/bench_$1.json" > "$OUT/bench_$1.txt" 2>&1 || fail "benchmark $1 (see bench_$1.txt)"
  grep -E '^(#|\|)' "$OUT/bench_$1.txt" | tee -a "$OUT/summary.txt" || true
}
bench ae paper/mixer_autoencoder_d1024_c512 "${GPU_CHECK_BENCH_CAP:-180}"

bench memory paper/memory_mixer_e512_d512 "${GPU_CHECK_BENCH_CAP:-180}"

echo "== training on CUDA: log line with MFU, profile trace and memory snapshot" | tee -a "$OUT/summary.txt"
train_check() {
  "$PY" -m memtrain data prepare-demo --out "$OUT/demo" --vocab-size 512 --row-len 32 > "$OUT/train_cuda.log" 2>&1 &&
  "$PY" -m memtrain train tiny --set data.shards="$OUT/demo/shards" --set run.out_dir="$OUT/train_cuda" \
    --set train.device=cuda --set train.precision=bf16 --set train.progress=false \
    --set 'train.profile={start: 5, steps: 3}' >> "$OUT/train_cuda.log" 2>&1 &&
  grep -q 'MFU ' "$OUT/train_cuda.log" && grep -q 'mem ' "$OUT/train_cuda.log" &&
  test -s "$OUT"/train_cuda/profile/trace-rank0-steps5-7.json && test -s "$OUT"/train_cuda/profile/memory-rank0-steps5-7.pickle
}
( export -f train_check; export PY OUT; timeout "$(limit 45)" bash -c train_check ) || fail "CUDA training check (see train_cuda.log)"
grep -E '^step (10|40)/' "$OUT/train_cuda.log" | tee -a "$OUT/summary.txt" || true

if [ "${GPU_CHECK_OPS:-1}" = 1 ]; then  # GPU_CHECK_OPS=0 leaves them out
  echo "== operator benchmarks" | tee -a "$OUT/summary.txt"
  timeout "$(limit 120)" "$PY" -m memtrain.kernels.bench_ops --json "$OUT/bench_ops.json" > "$OUT/bench_ops.txt" 2>&1 \
    || fail "operator benchmarks (see bench_ops.txt)"
  grep '^|' "$OUT/bench_ops.txt" | tee -a "$OUT/summary.txt" || true
fi

"$PY" - "$OUT" <<'PY' || fail "bench.json"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
parts = {name: json.loads((out / f"bench_{name}.json").read_text())
         for name in ("ae", "memory", "ops") if (out / f"bench_{name}.json").exists()}
parts["env"] = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
log = out / "kernels_test.log"
parts["kernel_tests"] = log.read_text().strip().splitlines()[-1] if log.exists() and log.read_text().strip() else None
parts["summary"] = (out / "summary.txt").read_text().splitlines()
(out / "bench.json").write_text(json.dumps(parts, indent=2))
PY

if [ -f tools/gpu_check_deepspeed.sh ] && [ "${GPU_CHECK_DEEPSPEED:-1}" = 1 ]; then
  echo "== tools/gpu_check_deepspeed.sh" | tee -a "$OUT/summary.txt"
  OUT="$OUT/deepspeed" bash tools/gpu_check_deepspeed.sh > "$OUT/deepspeed.log" 2>&1 || fail "gpu_check_deepspeed.sh (see deepspeed.log)"
fi

echo "== gpu_check: $([ $status = 0 ] && echo ALL GREEN || echo FAILURES)" | tee -a "$OUT/summary.txt"
exit $status
