"""``memtrain data ...`` subcommands: tokenizer, shards, merge, bench, prepare-demo.

:func:`register` adds them to the ``data`` command's subparsers; each handler takes the parsed ``args`` and
returns an exit code (user errors raise :class:`memtrain.errors.UserError`, which the main CLI prints).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from memtrain.errors import UserError

DEMO_VAL_FRACTION = 0.02


def _row_len(args) -> int:
    """--row-len, or --chunk-len x --chunks."""
    if args.row_len is not None:
        if args.chunk_len is not None or args.chunks is not None:
            raise UserError("give either --row-len or --chunk-len with --chunks, not both")
        return args.row_len
    if args.chunk_len is None or args.chunks is None:
        raise UserError("give --row-len N, or --chunk-len L together with --chunks C (rows of L x C tokens)")
    if args.chunk_len < 1 or args.chunks < 1:
        raise UserError(f"--chunk-len and --chunks must be >= 1, got {args.chunk_len} and {args.chunks}")
    return args.chunk_len * args.chunks


def _add_row_len(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument(
        "--row-len",
        type=int,
        default=None,
        metavar="N",
        help="tokens per row (= model.chunk_len x model.n_chunks)" + (f"; default {default}" if default else ""),
    )
    p.add_argument("--chunk-len", type=int, default=None, metavar="L", help="with --chunks: rows of L x C tokens")
    p.add_argument("--chunks", type=int, default=None, metavar="C", help="with --chunk-len: rows of L x C tokens")


def cmd_tokenizer(args) -> int:
    """``memtrain data tokenizer``: train a SentencePiece tokenizer; prints where it went."""
    from memtrain.data.tokenizer import Tokenizer, train_tokenizer

    t0 = time.time()
    path = train_tokenizer(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        sample_bytes=int(args.sample_mb * 1e6),
        threads=args.threads,
        seed=args.seed,
        verbose=args.verbose,
    )
    tok = Tokenizer.load(path)
    print(
        f"{path}: {args.model_type} tokenizer, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}…, "
        f"trained in {time.time() - t0:.1f} s"
    )
    return 0


def cmd_shards(args) -> int:
    """``memtrain data shards``: tokenize and pack a corpus into train/val MDS shards; prints a summary."""
    from memtrain.data.ingest import build_shards, format_summary

    if args.decoder_tokenizer:  # two token streams of the same text spans (memtrain.data.dual)
        from memtrain.data.dual import build_dual_shards, format_dual_summary

        if args.row_len is not None or args.chunk_len is None or args.chunks is None:
            raise UserError(
                "--decoder-tokenizer: give --chunk-len L and --chunks C (spans are cut per chunk), not --row-len"
            )
        print(
            format_dual_summary(
                build_dual_shards(
                    args.input,
                    args.tokenizer,
                    args.decoder_tokenizer,
                    args.out,
                    chunk_len=args.chunk_len,
                    n_chunks=args.chunks,
                    decoder_chunk_len=args.decoder_chunk_len,
                    val_fraction=args.val_fraction,
                    shard_size=args.shard_size,
                    seed=args.seed,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                )
            )
        )
        return 0
    summary = build_shards(
        args.input,
        args.tokenizer,
        args.out,
        row_len=_row_len(args),
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_size=args.shard_size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        unit_size=args.unit_size,
        rank=args.rank,
        world=args.world,
        merge=not args.no_merge,
    )
    print(format_summary(summary))
    return 0


def cmd_bench(args) -> int:
    """``memtrain data bench``: raw-encode and ingest tokens/s on one corpus, and their ratio."""
    from memtrain.data import demo_corpus_path
    from memtrain.data.bench import bench_ingest, format_bench

    sources = args.input or [str(demo_corpus_path())]
    repeat = args.repeat if args.repeat is not None else (1 if args.input else 4)
    no_len = args.row_len is None and args.chunk_len is None and args.chunks is None
    row_len = 512 if no_len else _row_len(args)
    print(format_bench(bench_ingest(sources, args.tokenizer, row_len, args.workers, args.unit_size, repeat=repeat)))
    return 0


def cmd_merge(args) -> int:
    """``memtrain data merge``: publish a sliced build whose units are all written."""
    from memtrain.data.ingest import format_summary, merge_shards, partial_dir

    out = Path(args.out)
    if not partial_dir(out).is_dir():
        raise UserError(f"--out {out}: no build in progress ({partial_dir(out)} does not exist)")
    info = merge_shards(out, overwrite=args.overwrite)
    if info is None:
        from memtrain.data import units
        from memtrain.data.ingest import PLAN_FILE
        from memtrain.data.memory_manifest import read_json

        plan = read_json(partial_dir(out) / PLAN_FILE)
        left = units.missing(partial_dir(out), {s: plan["units"] for s in plan["splits"]})
        raise UserError(
            f"--out {out}: {len(left)} unit(s) not written yet ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}); run the remaining slices first"
        )
    print(format_summary({**info, "out_dir": str(out), "merged": True}))
    return 0


def _demo_shards_match(shards: Path, tokenizer: Path, row_len: int, vocab_size: int, corpus: Path) -> str | None:
    """A description of the existing demo shards if they match the request, else None."""
    from memtrain.data.ingest import INFO_FILE
    from memtrain.data.tokenizer import file_sha256

    info_path = shards / INFO_FILE
    if not (info_path.is_file() and tokenizer.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
        ok = (
            info.get("row_len") == row_len
            and info.get("vocab_size") == vocab_size
            and info.get("tokenizer_sha256") == file_sha256(tokenizer)
            and [Path(s).name for s in info.get("sources", [])] == [corpus.name]
            and all((shards / s / "index.json").is_file() for s in info.get("splits", {}))
        )
    except (OSError, ValueError):
        return None
    if not ok:
        return None
    parts = ", ".join(f"{k} {v['rows']:,} rows" for k, v in info["splits"].items())
    return f"rows of {row_len} tokens, vocab {vocab_size}: {parts}"


def _is_demo_dir(shards: Path, corpus: Path) -> bool:
    from memtrain.data.ingest import INFO_FILE

    try:
        info = json.loads((shards / INFO_FILE).read_text())
        return [Path(s).name for s in info.get("sources", [])] == [corpus.name]
    except (OSError, ValueError):
        return False


def cmd_prepare_demo(args) -> int:
    """``memtrain data prepare-demo``: tokenizer + shards of the bundled demo corpus under ``--out``.

    Writes ``OUT/tokenizer.model`` and ``OUT/shards/``; does nothing when they already match.
    """
    from memtrain.data import demo_corpus_path
    from memtrain.data.ingest import build_shards, format_summary
    from memtrain.data.tokenizer import TOKENIZER_FILE, train_tokenizer

    no_len = args.row_len is None and args.chunk_len is None and args.chunks is None
    row_len = 256 if no_len else _row_len(args)
    corpus = demo_corpus_path()
    if not corpus.is_file():
        raise UserError(f"{corpus}: the bundled demo corpus is missing from this installation")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    shards = out / "shards"
    tok_path = out / TOKENIZER_FILE
    have = _demo_shards_match(shards, tok_path, row_len, args.vocab_size, corpus)
    if have:
        print(f"{shards}: demo shards already prepared ({have}); nothing to do")
        return 0
    overwrite = shards.exists() and _is_demo_dir(shards, corpus)
    if shards.exists() and any(shards.iterdir()) and not overwrite:
        raise UserError(f"{shards}: exists and is not demo shards; choose another --out")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-tokenizer-", dir=out) as tmp:
        new_tok = train_tokenizer(
            [str(corpus)], tmp, vocab_size=args.vocab_size, model_type="bpe", threads=args.workers
        )
        t_tok = time.time() - t0
        summary = build_shards(
            [str(corpus)],
            new_tok,
            shards,
            row_len=row_len,
            val_fraction=args.val_fraction,
            workers=args.workers,
            seed=0,
            overwrite=overwrite,
            progress=not args.no_progress,
        )
        os.replace(new_tok, tok_path)
    print(f"{tok_path}: bpe tokenizer, vocab {args.vocab_size}, trained in {t_tok:.1f} s")
    print(format_summary(summary))
    print(f"demo data ready in {time.time() - t0:.1f} s")
    return 0


def register(subparsers) -> None:
    """Add ``tokenizer``, ``shards`` and ``prepare-demo`` to the ``memtrain data`` subparsers."""
    t = subparsers.add_parser(
        "tokenizer",
        help="train a SentencePiece tokenizer on parquet/jsonl/txt text",
        description="Train a SentencePiece tokenizer (byte fallback; ids pad 0, unk 1, "
        "bos 2, eos 3, <sep> 4, <blank> 5) and write OUT/tokenizer.model.",
    )
    t.add_argument(
        "--input", nargs="+", required=True, metavar="SRC", help="parquet / jsonl / txt files, directories or globs"
    )
    t.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.model")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="e.g. 4096 or 8000")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument(
        "--sample-mb",
        type=float,
        default=100.0,
        metavar="MB",
        help="train on at most this much text, sampled evenly by document (default 100)",
    )
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0, help="which documents are sampled from a larger corpus")
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    t.set_defaults(func=cmd_tokenizer)

    s = subparsers.add_parser(
        "shards",
        help="tokenize and pack text into train/val MDS shards",
        description="Tokenize documents (EOS after each), pack them into rows of exactly "
        "N tokens, split train/val by document id, write zstd MDS shards.",
    )
    s.add_argument(
        "--input", nargs="+", required=True, metavar="SRC", help="parquet / jsonl / txt files, directories or globs"
    )
    s.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.model (or its directory)")
    s.add_argument("--out", required=True, metavar="DIR", help="shard directory to create")
    _add_row_len(s)
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="fraction of documents held out for validation (default 0.01; 0 = none)",
    )
    s.add_argument("--workers", type=int, default=2, help="processes, each writing whole units (default 2)")
    s.add_argument("--shard-size", default="32mb", help="MDS shard size limit (default 32mb)")
    s.add_argument(
        "--unit-size",
        default="256mb",
        metavar="SIZE",
        help="text per unit of work: parquet files are cut into row ranges of about this much text, a jsonl "
        "or txt file is one unit (default 256mb)",
    )
    s.add_argument(
        "--rank",
        type=int,
        default=None,
        help="with --world: write slice RANK of WORLD (default: a Slurm array task, else torchrun's RANK, else all)",
    )
    s.add_argument("--world", type=int, default=None, help="number of slices (see --rank)")
    s.add_argument(
        "--no-merge", action="store_true", help="write this slice's units only; `memtrain data merge` publishes"
    )
    s.add_argument("--seed", type=int, default=0, help="salt of the train/val split hash (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--decoder-tokenizer",
        metavar="DIR",
        default=None,
        help="also tokenize with this Hugging Face tokenizer (an LLM decoder's directory): chunks are cut "
        "on text spans that fit both tokenizers (docs/llm_decoders.md)",
    )
    s.add_argument(
        "--decoder-chunk-len",
        type=int,
        default=None,
        metavar="N",
        help="with --decoder-tokenizer: decoder tokens per chunk (default: --chunk-len)",
    )
    s.set_defaults(func=cmd_shards)

    b = subparsers.add_parser(
        "bench",
        help="tokens/s of `data shards` against the raw tokenizer",
        description="Encode a corpus with SentencePiece alone (text in memory, WORKERS running processes), then "
        "build shards from it with `memtrain data shards` (everything included), and print both rates and "
        "their ratio.",
    )
    b.add_argument("--input", nargs="+", default=None, metavar="SRC", help="corpus (default: the bundled demo corpus)")
    b.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.model (or its directory)")
    _add_row_len(b, default=512)
    b.add_argument("--workers", type=int, default=2, help="processes for both (default 2)")
    b.add_argument("--unit-size", default=None, metavar="SIZE", help="default: 4 units per worker")
    b.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="measure on the corpus's documents N times over (default 4 for the bundled corpus, else 1)",
    )
    b.set_defaults(func=cmd_bench)

    m = subparsers.add_parser(
        "merge",
        help="publish a sliced `data shards` build",
        description="Merge the units of OUT.partial (written by `memtrain data shards --rank R --world W`) into "
        "the shard directory OUT. The last slice to finish does this itself unless it ran with --no-merge.",
    )
    m.add_argument("--out", required=True, metavar="DIR", help="the --out of the sliced build")
    m.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    m.set_defaults(func=cmd_merge)

    d = subparsers.add_parser(
        "prepare-demo",
        help="tokenizer + shards of the bundled demo corpus",
        description="Train a tokenizer on the bundled demo corpus (Python and PostgreSQL "
        "documentation) and write OUT/tokenizer.model and OUT/shards. Does "
        "nothing if OUT already holds matching demo shards.",
    )
    d.add_argument("--out", required=True, metavar="DIR", help="e.g. data/demo (shards go to DIR/shards)")
    d.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="default 4096")
    _add_row_len(d, default=256)
    d.add_argument(
        "--val-fraction", type=float, default=DEMO_VAL_FRACTION, metavar="F", help=f"default {DEMO_VAL_FRACTION}"
    )
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_prepare_demo)
