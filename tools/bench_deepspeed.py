#!/usr/bin/env python
"""Training throughput of one run config under the plain engine and each DeepSpeed ZeRO stage (a benchmark,
not a test).

Run it under the launcher that the training would use: every rank builds the model, then for each variant
(``plain`` = DDP, ``zero0`` .. ``zero3``, optionally ``zeroN-offload``) builds the engine, runs warm-up steps and
times full optimizer steps on random tokens with the config's first-stage objectives (the same
``engine.train_step`` the training loop calls). It prints tokens/s over all ranks and the ratio to the first
variant, measured in the same run, and writes JSON (--json) on rank 0.

    torchrun --nproc_per_node 2 tools/bench_deepspeed.py yaml/tiny.yaml --steps 20 --json runs/bench/ds.json
    python tools/bench_deepspeed.py yaml/paper/memory_mixer_e512_d512.yaml --variants plain,zero1,zero2,zero3
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch
import torch.distributed as dist

from memtrain.config import apply_overrides, config_from_dict, read_yaml
from memtrain.devices import device_name
from memtrain.engine.distributed import init_deepspeed, shutdown
from memtrain.engine.engines import build_engine
from memtrain.errors import UserError
from memtrain.fileio import write_json
from memtrain.models import build_model
from memtrain.objectives import SpecialTokens

VARIANTS = {
    "plain": {"dist.engine": "plain"},
    **{f"zero{s}": {"dist.engine": "deepspeed", "dist.zero_stage": s} for s in range(4)},
    **{
        f"zero{s}-offload": {"dist.engine": "deepspeed", "dist.zero_stage": s, "dist.offload_optimizer": True}
        for s in (1, 2, 3)
    },
}


def bench_variant(raw: dict, name: str, info, args, vocab: int) -> dict:
    sets = [f"{k}={json.dumps(v)}" for k, v in VARIANTS[name].items()]
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(raw)), sets), source=f"{args.config} ({name})")
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab).to(info.device)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, info, [], vocab)
    engine.start_stage([])
    weights = cfg.stages()[0].weights.active()
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    gen = torch.Generator().manual_seed(info.rank)
    batches = [
        torch.randint(6, vocab, (cfg.data.batch_size, cfg.model.seq_len), generator=gen).to(info.device)
        for _ in range(cfg.optim.grad_accum)
    ]

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        if info.distributed:
            dist.barrier()

    for _ in range(args.warmup):
        engine.train_step(batches, weights, special)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step(batches, weights, special)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = cfg.data.batch_size * cfg.optim.grad_accum * info.world_size * cfg.model.seq_len
    row = {
        "variant": name,
        "engine": engine.describe() if hasattr(engine, "describe") else name,
        "ms_per_step": 1000 * seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": tokens,
        "n_params": n_params,
    }
    if info.device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    del engine, model
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument(
        "--variants",
        default="plain,zero0,zero1,zero2,zero3",
        help=f"comma-separated, first = baseline; from {', '.join(VARIANTS)}",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="rows per rank (default: the config's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--json", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    try:
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise UserError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        raw = apply_overrides(
            read_yaml(args.config),
            list(args.set)
            + ["train.progress=false", f"train.device={args.device}"]
            + ([f"data.batch_size={args.batch_size}"] if args.batch_size else [])
            + ([f"train.precision={args.precision}"] if args.precision else []),
        )
        info = init_deepspeed(args.device)  # one process group for every variant (DDP uses it too)
    except UserError as err:
        print(f"bench_deepspeed: error: {err}", file=sys.stderr)
        return 2
    try:
        rows = [bench_variant(raw, name, info, args, args.vocab) for name in names]
    finally:
        shutdown(info)
    base = rows[0]["tokens_per_s"]
    if info.is_main:
        print(
            f"# {args.config} on {info.world_size} rank(s), {device_name(info.device)}; torch {torch.__version__}; "
            f"{args.steps} timed steps after {args.warmup} warm-up; {time.strftime('%Y-%m-%d %H:%M')}"
        )
        print("| variant | engine | ms/step | tokens/s | vs " + names[0] + " | peak GiB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            peak = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
            print(
                f"| {r['variant']} | {r['engine']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['tokens_per_s'] / base:.2f}x | {peak} |"
            )
        if args.json:
            write_json(
                args.json,
                {
                    "config": args.config,
                    "world_size": info.world_size,
                    "device": device_name(info.device),
                    "torch": torch.__version__,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "rows": rows,
                },
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
