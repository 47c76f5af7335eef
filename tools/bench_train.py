#!/usr/bin/env python
"""Training throughput of run configs on the current device (a benchmark, not a test).

For each config: build the model, run warm-up steps, then time full training steps (forward, backward,
AdamW step) on random tokens with the config's first-stage objectives, and print tokens/s. The first
config given is the baseline; every row also shows its ratio to it. JSON goes to --json.

    python tools/bench_train.py yaml/quickstart.yaml yaml/paper/memory_mixer_e512_d512.yaml \
        --steps 5 --batch-size 2 --json runs/bench/cpu.json
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

from memtrain.config import load_config
from memtrain.engine.distributed import pick_device
from memtrain.engine.optim import build_optimizer
from memtrain.engine.trainer import autocast_for
from memtrain.errors import UserError
from memtrain.fileio import write_json
from memtrain.models import build_model
from memtrain.objectives import SpecialTokens, compute_losses


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def bench_one(path: str, steps: int, warmup: int, batch_size: int | None, dev: torch.device,
              precision: str | None, vocab: int) -> dict:
    cfg = load_config(path)
    bs = batch_size or cfg.data.batch_size
    model = build_model(cfg.model, vocab).to(dev)
    opt = build_optimizer(model, cfg.optim, dev)
    weights = cfg.stages()[0].weights.active()
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    prec = precision or cfg.train.precision
    autocast = autocast_for(prec, dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab, (bs, cfg.model.seq_len), generator=gen).to(dev)

    def step():
        with autocast():
            total, _ = compute_losses(model, ids, weights, special)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = bs * cfg.model.seq_len
    return {"config": path, "kind": cfg.model.kind, "objectives": weights, "batch_size": bs,
            "seq_len": cfg.model.seq_len, "precision": prec,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "ms_per_step": round(dt * 1e3, 1), "tokens_per_s": round(tokens / dt, 1),
            "peak_mem_GiB": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="override every config's data.batch_size")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    try:
        dev = pick_device(args.device)
        rows = [bench_one(c, args.steps, args.warmup, args.batch_size, dev, args.precision, args.vocab)
                for c in args.configs]
    except UserError as err:
        print(f"bench_train: error: {err}", file=sys.stderr)
        return 2
    base = rows[0]["tokens_per_s"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = {"device": device_name(dev), "torch": torch.__version__, "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "steps": args.steps}
    print(f"# {header['device']}, torch {header['torch']}, commit {commit}, {header['date']}")
    print("| config | params (M) | batch x seq | precision | ms/step | tokens/s | ratio to first |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio_to_first"] = round(r["tokens_per_s"] / base, 3)
        print(f"| {r['config']} | {r['params_M']} | {r['batch_size']} x {r['seq_len']} | {r['precision']} | "
              f"{r['ms_per_step']} | {r['tokens_per_s']:,.0f} | {r['ratio_to_first']} |")
    if args.json:
        write_json(args.json, {**header, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
