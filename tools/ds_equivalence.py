#!/usr/bin/env python
"""DeepSpeed equivalence check on any device: ZeRO 0-3 (and a 2-stage pipeline when there are 2 ranks) train
the tiny memory model exactly like one plain process on the same global batch.

The CPU test suite checks this with 2 gloo ranks (tests/test_deepspeed.py); this script runs the same
comparison where the tests cannot, e.g. on CUDA with NCCL (tools/gpu_check_deepspeed.sh):

    python tools/ds_equivalence.py --device cuda --nproc 1 --json runs/ds_equivalence.json
    python tools/ds_equivalence.py --device cpu --nproc 2          # what the tests do, as one script

It builds the tiny tokenizer and shards from the bundled demo corpus, trains the reference in this process,
launches ``torchrun --nproc_per_node NPROC -m memtrain train`` for each DeepSpeed variant, and compares every
logged loss and every weight. Exit code 0 when every variant is within tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import _build, tiny_config, tiny_raw, write_yaml  # noqa: E402  (the tests' tiny data and configs)

from memtrain.engine.distributed import free_port  # noqa: E402
from memtrain.engine.trainer import train  # noqa: E402
from memtrain.fileio import write_json  # noqa: E402

STEPS = 6
BATCH = 4


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss/total"]
    return out


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))


def compare(run: Path, ref: Path) -> dict:
    la, lb = losses(run), losses(ref)
    wa, wb = final_weights(run), final_weights(ref)
    keys = [k for k in wb if not k.endswith("conv.bias")]  # see tests/test_engine.py on the mixers' biases
    return {
        "steps": sorted(la) == sorted(lb) == list(range(1, STEPS + 1)),
        "max_loss_diff": max(abs(la[s] - lb[s]) for s in lb),
        "max_weight_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in keys),
        "same_names": sorted(wa) == sorted(wb),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, min(2, GPUs) on CUDA)")
    p.add_argument("--loss-tol", type=float, default=None, help="default 2e-5 on CPU, 2e-4 on CUDA")
    p.add_argument("--weight-tol", type=float, default=None, help="default 2e-4 on CPU, 2e-3 on CUDA")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if cuda else 2)
    loss_tol = args.loss_tol or (2e-4 if cuda else 2e-5)
    weight_tol = args.weight_tol or (2e-3 if cuda else 2e-4)
    work = Path(args.work or tempfile.mkdtemp(prefix="ds_equivalence-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    data = _build(work / "data", offset=0, n_docs=150, vocab_size=400)
    device = [f"train.device={args.device}"]
    run = ("train.steps=6", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=3", "train.keep_ckpts=5")
    ref = work / "reference"
    t0 = time.time()
    train(tiny_config(data.shards, ref, *run, *device, f"data.batch_size={nproc * BATCH}"))
    variants = {f"zero{s}": ["dist.engine=deepspeed", f"dist.zero_stage={s}"] for s in range(4)}
    if nproc == 2:
        variants["pipeline2-zero1"] = ["dist.engine=deepspeed", "dist.zero_stage=1", "dist.pipeline_stages=2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    results = {}
    ok = True
    for name, sets in variants.items():
        out = work / name
        config = write_yaml(work / f"{name}.yaml", tiny_raw(data.shards, out, [*run, *device, *sets]))
        start = time.time()
        for _attempt in range(2):  # one retry if the start lost streaming's shared-memory race with another job
            done = subprocess.run(
                [
                    *launcher,
                    "--nproc_per_node",
                    str(nproc),
                    "--master_port",
                    str(free_port()),
                    "-m",
                    "memtrain",
                    "train",
                    str(config),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                timeout=600,
            )
            if done.returncode == 0 or "FileExistsError: [Errno 17] File exists: '/0" not in done.stderr:
                break
        row = {"returncode": done.returncode, "seconds": round(time.time() - start, 1)}
        if done.returncode == 0:
            row.update(compare(out, ref))
            row["ok"] = (
                row["steps"]
                and row["same_names"]
                and row["max_loss_diff"] <= loss_tol
                and row["max_weight_diff"] <= weight_tol
            )
        else:
            row["ok"] = False
            (work / f"{name}.stderr").write_text(done.stderr)
            errors = [ln for ln in done.stderr.splitlines() if "Error" in ln and "rank" in ln]
            row["stderr_tail"] = "\n".join(errors[-6:]) or done.stderr[-2000:]
        ok &= row["ok"]
        results[name] = row
        print(
            f"{name}: {'OK' if row['ok'] else 'FAILED'} {json.dumps({k: v for k, v in row.items() if k != 'stderr_tail'})}",
            flush=True,
        )
        if not row["ok"] and "stderr_tail" in row:
            print(row["stderr_tail"], file=sys.stderr)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "nproc": nproc,
        "backend": "nccl" if cuda else "gloo",
        "torch": torch.__version__,
        "loss_tol": loss_tol,
        "weight_tol": weight_tol,
        "seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ok": ok,
        "variants": results,
    }
    if args.json:
        write_json(args.json, summary)
    print(f"ds_equivalence: {'ALL OK' if ok else 'FAILURES'} ({nproc} rank(s) on {summary['device']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
