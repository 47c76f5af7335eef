#!/usr/bin/env python
"""Token rows per second the shard loader delivers to one rank, with 0, 1 and 2 DataLoader workers.

Builds shard directories of the bundled demo corpus (repeated until it holds about ``--tokens`` tokens, rows of
each ``--row-len``, demo tokenizer of 4096 ids) under ``--work`` (kept and reused by later runs), or measures an
existing shard directory or URL given with ``--shards``. For every worker count it opens the training loader
(``make_loader``: shuffled, as training reads it), waits for the first batch (reported as start-up time: what
each epoch start costs, when the workers start again), then counts the tokens of the batches it delivers in
``--seconds`` of wall time or until the epoch ends, whichever comes first (the steady rate within an epoch).
Nothing else runs meanwhile, so this is the loader's ceiling on the machine; a training step in the same process
takes its share of the cores. The last column is the CPU time the training process itself spent per second of
wall time (with workers, the loading runs in them instead).

    python tools/bench_loader.py                                   # rows of 512 and 1024, batch 32
    python tools/bench_loader.py --row-len 512 --batch-size 64 --workers 0,2 --seconds 10
    python tools/bench_loader.py --shards data/demo/shards --json runs/bench/loader.json

Prints a markdown table with the machine's CPU count, torch, commit and date; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(work: Path, row_len: int, tokens: int) -> Path:
    """A shard directory of about ``tokens`` tokens in rows of ``row_len`` under ``work`` (reused if there)."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path
    from memtrain.data.ingest import build_shards
    from memtrain.data.loader import read_shard_info
    from memtrain.data.tokenizer import train_tokenizer

    out = work / f"rows{row_len}-tokens{tokens}"
    if (out / "memtrain_shards.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tok" / "tokenizer.model"
    demo = REPO / "data" / "demo" / "tokenizer.model"
    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).to_pylist()
    corpus = work / f"corpus-{tokens}.jsonl"
    if not corpus.is_file():
        chars = 0
        tmp = corpus.with_suffix(".tmp")
        with open(tmp, "w") as f:
            copy = 0
            while chars < 4 * tokens:  # about 4 characters per token with a vocabulary of 4096
                for row in table:
                    f.write(json.dumps({"id": f"{row['id']}-{copy}", "text": row["text"]}) + "\n")
                    chars += len(row["text"])
                copy += 1
        os.replace(tmp, corpus)
    if demo.is_file():
        tok = demo
    elif not tok.is_file():
        tok = train_tokenizer([str(corpus)], work / "tok", vocab_size=4096, sample_bytes=5_000_000)
    print(f"building {out} ...", file=sys.stderr, flush=True)
    build_shards([str(corpus)], tok, out, row_len=row_len, val_fraction=0, workers=2, progress=False)
    read_shard_info(out)
    return out


def measure(shards: str, batch_size: int, workers: int, seconds: float, cache_dir: str | None) -> dict:
    """Start-up time and steady tokens/s of the shuffled training loader with ``workers`` workers."""
    from memtrain.data.loader import make_loader

    t0 = time.perf_counter()
    with make_loader(shards, "train", batch_size, True, 0, num_workers=workers, cache_dir=cache_dir) as loader:
        per_epoch = len(loader)
        it = loader.epoch()
        first = next(it)
        startup = time.perf_counter() - t0
        tokens = batches = 0
        cpu0 = time.process_time()
        t1 = time.perf_counter()
        elapsed = 0.0
        for batch in it:
            tokens += batch.numel()
            batches += 1
            elapsed = time.perf_counter() - t1
            if elapsed >= seconds:
                break
        cpu = time.process_time() - cpu0
        it.close()
    if not batches:
        raise SystemExit(f"{shards}: one batch of {batch_size} rows is the whole epoch; use a smaller --batch-size")
    return {
        "row_len": int(first.shape[1]),
        "batch_size": batch_size,
        "workers": workers,
        "startup_s": round(startup, 3),
        "batches": batches,
        "batches_per_epoch": per_epoch,
        "seconds": round(elapsed, 3),
        "tokens_per_s": tokens / elapsed,
        "rows_per_s": batches * batch_size / elapsed,
        "main_cpu": cpu / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", action="append", help="shard directory or URL to measure (repeatable)")
    p.add_argument("--row-len", default="512,1024", help="row lengths of the built shards (comma-separated)")
    p.add_argument("--tokens", type=int, default=32_000_000, help="about this many tokens per built directory")
    p.add_argument("--work", default=str(REPO / "runs" / "bench" / "loader"), help="where built shards are kept")
    p.add_argument("--batch-size", default="32", help="rows per batch (comma-separated)")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts (comma-separated)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed wall time per measurement (at most one epoch)")
    p.add_argument("--cache-dir", help="data.cache_dir for a URL")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from memtrain.data.streaming_compat import import_streaming

    streaming = import_streaming()
    import torch

    if args.shards:
        dirs = list(args.shards)
    else:
        dirs = [str(build(Path(args.work), int(n), args.tokens)) for n in args.row_len.split(",")]
    rows = []
    for shards in dirs:
        for bs in (int(b) for b in args.batch_size.split(",")):
            for w in (int(x) for x in args.workers.split(",")):
                r = measure(shards, bs, w, args.seconds, args.cache_dir)
                r["shards"] = shards
                rows.append(r)
                print(
                    f"rows of {r['row_len']}, batch {bs}, {w} workers: {r['tokens_per_s'] / 1e6:.2f}M tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip() or "unknown",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "streaming": streaming.__version__,
    }
    print(
        f"\nLoader throughput, one rank: {meta['cpus']} CPU cores, torch {meta['torch']}, "
        f"mosaicml-streaming {meta['streaming']}, commit {meta['commit']}, {meta['date']}\n"
    )
    print("| row length | batch | workers | first batch (s) | tokens/s | rows/s | training process CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['row_len']} | {r['batch_size']} | {r['workers']} | {r['startup_s']:.2f} | "
            f"{r['tokens_per_s'] / 1e6:.2f}M | {r['rows_per_s']:,.0f} | {100 * r['main_cpu']:.0f}% |"
        )
    if args.json:
        from memtrain.fileio import write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {**meta, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
