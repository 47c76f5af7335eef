#!/usr/bin/env python
"""Frozen-encoder precomputation on the current device: precompute memories/s, and decoder training tokens/s
from precomputed memories against training the same model with its frozen encoder in the loop.

Everything runs in one process, on one device, in one invocation:

1. token shards: the first ``--docs`` documents of the bundled demo corpus, tokenized with the demo tokenizer
   (``data/demo/tokenizer.model``, or one trained here), rows of the config's ``chunk_len x n_chunks``;
2. the encoder: the config's model trained for one step (``memtrain.engine.trainer.train``), so that its
   checkpoint serves as ``model.frozen_encoder``;
3. ``memtrain precompute`` of the train split (timed: memories/s, the job's own count);
4. training, paired: two copies of the same model (frozen encoder loaded from that checkpoint, same seed)
   with the trainer's engine (``build_engine``: micro-batches, clipping, AdamW, schedule), one fed by the
   token loader with the encoder in the loop, one by the loader with ``data.memories``. Steps alternate
   between the two (loading the batch included), ``--warmup`` untimed then ``--steps`` timed each; tokens/s
   of each is rows x row length / its median step time, and the ratio is the median of the per-pair ratios,
   so a machine whose load changes during the run affects both sides alike.

    python tools/bench_precompute.py yaml/quickstart.yaml --steps 40 --json runs/bench/precompute-cpu.json
    python tools/bench_precompute.py yaml/quickstart.yaml --set model.encoder.n_layers=8 --device cuda

Prints a markdown table with device, torch, commit and date; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from memtrain.devices import device_name
from memtrain.fileio import write_json

REPO = Path(__file__).resolve().parents[1]


def make_tokens(work: Path, row_len: int, docs: int, tokenizer: str | None) -> Path:
    """Token shards of the first ``docs`` demo documents (rows of ``row_len``)."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path
    from memtrain.data.ingest import build_shards
    from memtrain.data.tokenizer import train_tokenizer

    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).slice(0, docs)
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps({"id": row["id"], "text": row["text"]}) + "\n")
    tok = Path(tokenizer) if tokenizer else REPO / "data" / "demo" / "tokenizer.model"
    if not tok.is_file():
        tok = train_tokenizer([str(corpus)], work / "tok", vocab_size=4096, threads=2)
    out = work / "tokens"
    build_shards(
        [str(corpus)], tok, out, row_len=row_len, val_fraction=0.0, workers=2, shard_size="4mb", progress=False
    )
    return out


def paired_steps(loop_cfg, mem_cfg, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds per training step (next batch + engine step) of the two configs, steps alternating."""
    from memtrain.data.loader import make_loader, read_shard_info
    from memtrain.data.memories import open_memories
    from memtrain.engine.distributed import init_distributed
    from memtrain.engine.engines import build_engine
    from memtrain.engine.trainer import build_for_run
    from memtrain.objectives import special_tokens

    info = read_shard_info(loop_cfg.data.shards)
    dist = init_distributed(loop_cfg.train.device)
    sides = {}
    for name, cfg in (("loop", loop_cfg), ("mem", mem_cfg)):
        memories = open_memories(cfg, info) if cfg.data.memories else None
        loader = make_loader(
            cfg.data.shards, "train", cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed, memories=memories
        )
        model, frozen = build_for_run(cfg, dist.device, info.vocab_size)
        if memories is not None:
            memories.check_encoder(model)
        engine = build_engine(cfg, model, dist, frozen, info.vocab_size)
        engine.start_stage(frozen)
        model.train()
        sides[name] = (iter(loader), engine, cfg.stages()[0].weights.active(), loader)
    special = special_tokens(loop_cfg.objective, info.special_ids)
    times: dict[str, list[float]] = {"loop": [], "mem": []}
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    try:
        for i in range(warmup + steps):
            for name, (it, engine, weights, _) in sides.items():
                sync()
                t0 = time.perf_counter()
                engine.train_step([next(it).to(dist.device)], weights, special)
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        for *_, loader in sides.values():
            loader.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "yaml" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps of each variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    ap.add_argument("--docs", type=int, default=300, help="demo documents to tokenize")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.model (default: data/demo's, else trained here)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="memory storage dtype")
    ap.add_argument("--batch-size", type=int, default=256, help="precompute rows per encoder call")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="training precision")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from memtrain.config import apply_overrides, config_from_dict, read_yaml
    from memtrain.engine.trainer import train
    from memtrain.errors import UserError
    from memtrain.precompute.job import run_precompute

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    work.mkdir(parents=True, exist_ok=True)
    base = (
        ["train.progress=false", "train.eval_every=0", "train.ckpt_every=0", f"train.device={device}"]
        + ([f"train.precision={args.precision}"] if args.precision else [])
        + ([f"train.threads={args.threads}"] if args.threads else [])
    )

    def config(out: str, *extra: str):
        raw = apply_overrides(read_yaml(args.config), args.set + base + [f"run.out_dir={out}", *extra])
        return config_from_dict(raw, source=args.config)

    try:
        cfg = config(str(work / "probe"))
        if cfg.model.kind != "memory" or cfg.model.no_memory:
            raise UserError(f"{args.config}: the benchmark needs a memory model with memories")
        tokens = make_tokens(work, cfg.model.seq_len, args.docs, args.tokenizer)
        enc_run = work / "encoder"
        train(config(str(enc_run), f"data.shards={tokens}", "train.steps=1", "curriculum=[]"))

        mem = work / "memories"
        t0 = time.perf_counter()
        pre = run_precompute(
            enc_run,
            tokens,
            mem,
            splits=["train"],
            dtype=args.dtype,
            batch_size=args.batch_size,
            device=device,
            progress=False,
        )
        pre_wall = time.perf_counter() - t0

        frozen = [
            f"data.shards={tokens}",
            f"model.frozen_encoder.checkpoint={enc_run}",
            "curriculum=[]",
            f"train.steps={args.warmup + args.steps}",
        ]
        times = paired_steps(
            config(str(work / "loop"), *frozen),
            config(str(work / "mem"), *frozen, f"data.memories={mem}"),
            args.warmup,
            args.steps,
        )
    except UserError as err:
        print(f"bench_precompute: error: {err}", file=sys.stderr)
        return 2

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    tokens_per_step = cfg.data.batch_size * cfg.optim.grad_accum * cfg.model.seq_len
    loop = tokens_per_step / statistics.median(times["loop"])
    memo = tokens_per_step / statistics.median(times["mem"])
    ratio = statistics.median(a / b for a, b in zip(times["loop"], times["mem"]))
    weights = cfg.stages()[0].weights.active()
    result = {
        "device": device_name(torch.device("cuda" if device == "cuda" else "cpu")),
        "torch": torch.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "config": args.config,
        "overrides": args.set,
        "objectives": weights,
        "model": {
            "chunk_len": cfg.model.chunk_len,
            "n_chunks": cfg.model.n_chunks,
            "encoder": cfg.model.encoder.model_dump(),
            "decoder": cfg.model.decoder.model_dump(),
        },
        "batch_size": cfg.data.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "precompute": {
            "memories": pre["memories"],
            "seconds": round(pre["seconds"], 2),
            "memories_per_s": round(pre["memories_per_s"], 1),
            "wall_s_with_setup": round(pre_wall, 2),
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "precision": pre["precision"],
        },
        "train_tokens_per_s": {"encoder in the loop": round(loop, 1), "precomputed memories": round(memo, 1)},
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "speedup_median_of_pairs": round(ratio, 3),
    }
    print(f"# {result['device']}, torch {result['torch']}, commit {commit}, {result['date']}")
    print(
        f"# {args.config} {' '.join(args.set)}: C x L = {cfg.model.n_chunks} x {cfg.model.chunk_len}, "
        f"objectives {weights}, batch {cfg.data.batch_size}, {args.steps} timed steps each, interleaved"
    )
    print("| measurement | value |")
    print("|---|---|")
    print(
        f"| precompute ({args.dtype} storage, {pre['precision']} compute, batch {args.batch_size}) | "
        f"{pre['memories_per_s']:,.0f} memories/s ({pre['memories']:,} memories in {pre['seconds']:.1f} s) |"
    )
    print(f"| train, encoder in the loop | {loop:,.0f} tokens/s |")
    print(f"| train, precomputed memories | {memo:,.0f} tokens/s |")
    print(f"| ratio (precomputed / in the loop, median of {args.steps} pairs) | {ratio:.2f}x |")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
