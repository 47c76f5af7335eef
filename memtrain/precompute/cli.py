"""``memtrain precompute``: frozen-encoder memories for MDS token shards (docs/precompute.md).

memtrain precompute CKPT --shards TOKENS_DIR --out MEM_DIR [--split train,val] [--dtype bf16|fp16|fp32]
                    [--batch-size N] [--tasks causal,copy,blank_copy] [--rank I --world N]
memtrain precompute --merge MEM_DIR
memtrain precompute --verify MEM_DIR
"""

from __future__ import annotations

import argparse
import json

from memtrain.errors import UserError


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def cmd_precompute(args) -> int:
    from memtrain.precompute import job

    if args.merge or args.verify:
        if args.checkpoint or args.shards or args.out:
            raise UserError("--merge / --verify take only the memory directory: memtrain precompute --merge MEM_DIR")
        if args.merge:
            job.merge_memories(args.merge, require_complete=True)
            print(f"{args.merge}: merged; memtrain_memories.json written")
        if args.verify:
            counts = job.verify_memories(args.verify)
            print(
                f"{args.verify}: every memory shard matches the manifest ("
                + ", ".join(f"{s} {n:,} samples" for s, n in counts.items())
                + ")"
            )
        return 0
    if not (args.checkpoint and args.shards and args.out):
        raise UserError("usage: memtrain precompute CKPT --shards TOKENS_DIR --out MEM_DIR (or --merge MEM_DIR)")
    summary = job.run_precompute(
        args.checkpoint,
        args.shards,
        args.out,
        splits=_csv(args.split),
        dtype=args.dtype,
        batch_size=args.batch_size,
        tasks=_csv(args.tasks),
        rank=args.rank,
        world=args.world,
        device=args.device,
        precision=args.precision,
        delimiter_id=args.delimiter_id,
        n_delimiters=args.n_delimiters,
        filler_id=args.filler_id,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(
        f"{summary['out']}: slice {summary['rank']}/{summary['world']}: {summary['computed']} unit(s) computed, "
        f"{summary['skipped']} already done; {summary['memories']:,} memories in {summary['seconds']:.1f} s "
        f"({summary['memories_per_s']:,.0f} memories/s on {summary['device']}, {summary['precision']}); "
        + ("merged: memtrain_memories.json written" if summary["merged"] else "other slices still running")
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``precompute`` to the top-level subcommands."""
    p = sub.add_parser(
        "precompute",
        help="store a frozen encoder's memories of token shards as memory shards",
        description="Run a frozen encoder (of an autoencoder or memory-model checkpoint) over MDS "
        "token shards and write aligned MDS memory shards; train with data.memories.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint or run directory (autoencoder or memory model)")
    p.add_argument("--shards", help="token shard directory (memtrain data shards)")
    p.add_argument("--out", help="memory-shard directory to write (resumed if it holds this job)")
    p.add_argument("--split", help="comma-separated splits (default: every split with rows)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="storage dtype (default bf16)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per encoder call (default 64)")
    p.add_argument(
        "--tasks",
        help="causal,copy,blank_copy: whose memories to store (default: all the chunk count "
        "allows; causal is always stored)",
    )
    p.add_argument("--delimiter-id", type=int, default=None, help="as objective.delimiter_id (default <sep>)")
    p.add_argument("--n-delimiters", type=int, default=None, help="as objective.n_delimiters (default 1)")
    p.add_argument("--filler-id", type=int, default=None, help="as objective.filler_id (default <blank>)")
    p.add_argument("--rank", type=int, default=None, help="this slice (default: Slurm array task, torchrun RANK, 0)")
    p.add_argument("--world", type=int, default=None, help="number of slices (default: array size, WORLD_SIZE, 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="encoder compute (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.add_argument("--merge", metavar="MEM_DIR", help="only merge the finished units of MEM_DIR into its index")
    p.add_argument("--verify", metavar="MEM_DIR", help="re-hash every memory shard of MEM_DIR against its manifest")
    p.set_defaults(func=cmd_precompute)
