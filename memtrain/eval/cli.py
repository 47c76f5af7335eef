"""``memtrain probe``, ``memtrain capacity`` and ``memtrain repro``: the paper's measurements as commands.

memtrain probe RUN_OR_CHECKPOINT_OR_CONFIG [...] [--decoder mixer|transformer] [--injection repeat|unroll]
               [--length N] [--memory-position -1|-2] [--steps N] [--untrained] [--controls]
               [--random-tokens] [--config OVERLAY.yaml] [--shards DIR] [--out DIR] [--set a.b=c ...]
memtrain capacity --d-model 128 --lengths 8,16,32,64 [--arch mixer] [--steps N] [--out DIR] ...
memtrain repro [--out runs/repro] [--quick] [--doc docs/reproduction.md] [--seeds N] [--corpus PATH]
"""

from __future__ import annotations

import argparse

from memtrain.errors import UserError


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 2:
        raise UserError(f"{what}: expected numbers >= 2, got {text!r}")
    return values


def _cmd_probe(args) -> int:
    from memtrain.eval.probe import ProbeSettings, probe_all, probe_table

    settings = ProbeSettings(
        out=args.out,
        decoder=args.decoder,
        injection=args.injection,
        length=args.length,
        memory_position=args.memory_position,
        steps=args.steps,
        random_tokens=args.random_tokens,
        shards=args.shards,
        overlay=args.config,
        overrides=tuple(args.set),
        resume=True,
    )
    results = probe_all(args.sources, settings, untrained=args.untrained, controls=args.controls)
    print(probe_table(results))
    print(f"report: {args.out}/report.md")
    return 0


def _cmd_capacity(args) -> int:
    from memtrain.eval.capacity import CapacitySettings, capacity_table, run_capacity

    settings = CapacitySettings(
        out=args.out,
        d_model=args.d_model,
        lengths=_int_list(args.lengths, "--lengths"),
        arch=args.arch,
        n_layers=args.layers,
        n_heads=args.heads,
        steps=args.steps,
        shards=args.shards,
        overlay=args.config,
        overrides=tuple(args.set),
    )
    result = run_capacity(settings)
    print(capacity_table(result))
    print(f"report: {args.out}/report.md")
    return 0


def _cmd_repro(args) -> int:
    from memtrain.eval.repro import run_repro

    options = [
        ("--out", args.out, "runs/repro"),
        ("--configs", args.configs, "yaml/repro"),
        ("--shards", args.shards, None),
        ("--corpus", args.corpus, None),
        ("--vocab-size", args.vocab_size, 4096),
        ("--val-fraction", args.val_fraction, 0.02),
        ("--seeds", args.seeds, None),
        ("--doc", args.doc, None),
    ]
    command = " ".join(
        ["memtrain repro"]
        + (["--quick"] if args.quick else [])
        + [f"{flag} {value}" for flag, value, default in options if value != default]
        + [f"--set {s}" for s in args.set]
    )
    run_repro(
        out=args.out,
        quick=args.quick,
        doc=args.doc,
        shards=args.shards,
        configs=args.configs,
        overrides=tuple(args.set),
        command=command,
        rewrite_doc=args.rewrite_doc,
        seeds=args.seeds,
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
    )
    return 0


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the generated run config, e.g. --set optim.lr=1e-3 (repeatable)",
    )


def register(subparsers) -> None:
    """Add ``probe``, ``capacity`` and ``repro`` to the top-level ``memtrain`` subparsers."""
    p = subparsers.add_parser("probe", help="information-retention probe: regenerate the input from one frozen memory")
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="run or checkpoint directory (autoencoder, memory model or causal LM), or a YAML run "
        "config (its untrained model)",
    )
    p.add_argument("--decoder", choices=["mixer", "transformer"], help="probe decoder (default mixer)")
    p.add_argument(
        "--injection",
        choices=["repeat", "unroll"],
        help="how the memory reaches the decoder (default: repeat for mixer, unroll for transformer)",
    )
    p.add_argument("--length", type=int, help="tokens to regenerate (default: the source's context)")
    p.add_argument(
        "--memory-position",
        type=int,
        choices=[-1, -2],
        help="encoder position read as the memory (default: the source's; -2 for a causal LM)",
    )
    p.add_argument("--steps", type=int, help="probe training steps (default 1000)")
    p.add_argument("--untrained", action="store_true", help="probe the untrained encoder of each source's config")
    p.add_argument("--controls", action="store_true", help="also probe the untrained encoder of each checkpoint")
    p.add_argument(
        "--random-tokens", action="store_true", help="train and measure on uniformly random token rows instead of text"
    )
    p.add_argument(
        "--config",
        metavar="OVERLAY.yaml",
        help="partial run config laid over the probe defaults (decoder, optim, train, data), "
        "e.g. yaml/paper/probe_mixer_d1024.yaml",
    )
    p.add_argument("--shards", help="shard directory (default: the source's; re-packed to the probe length if needed)")
    p.add_argument("--out", default="runs/probe", help="output directory: one run per probe, plus the report")
    _add_set(p)
    p.set_defaults(func=_cmd_probe)

    c = subparsers.add_parser("capacity", help="capacity curve: how many tokens one memory vector regenerates")
    c.add_argument("--d-model", type=int, default=128, help="encoder and decoder width (default 128)")
    c.add_argument("--lengths", default="8,16,32,64", help="chunk lengths, comma-separated (default 8,16,32,64)")
    c.add_argument("--arch", choices=["mixer", "transformer"], default="mixer")
    c.add_argument("--layers", type=int, default=2, help="layers per stack (default 2)")
    c.add_argument("--heads", type=int, default=4, help="heads per layer (default 4)")
    c.add_argument("--steps", type=int, help="training steps per length (default 1000)")
    c.add_argument("--config", metavar="OVERLAY.yaml", help="partial run config laid over the defaults")
    c.add_argument(
        "--shards",
        default="data/demo/shards",
        help="shards whose corpus is re-packed to each length (default data/demo/shards)",
    )
    c.add_argument("--out", default="runs/capacity", help="output directory (default runs/capacity)")
    _add_set(c)
    c.set_defaults(func=_cmd_capacity)

    r = subparsers.add_parser("repro", help="the paper's measurements in miniature, written to docs/reproduction.md")
    r.add_argument("--out", default="runs/repro", help="output directory (default runs/repro)")
    r.add_argument("--quick", action="store_true", help="a shortened run (tens of steps) that checks the pipeline")
    r.add_argument(
        "--doc",
        default=None,
        help="markdown file to write (default docs/reproduction.md; with --quick: OUT/reproduction.md)",
    )
    r.add_argument("--shards", help="shard directory for every run (default: the configs'; data/demo/shards)")
    r.add_argument("--configs", default="yaml/repro", help="directory of the run configs (default yaml/repro)")
    r.add_argument(
        "--corpus",
        metavar="PATH",
        help="parquet / jsonl / txt file, directory or glob: make the tokenizer and shards of every run from it "
        "(in OUT/data) instead of using the bundled demo corpus",
    )
    r.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary made for --corpus (default 4096)")
    r.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of the --corpus documents held out for evaluation (default 0.02; more for a small corpus)",
    )
    r.add_argument(
        "--seeds",
        type=int,
        help="train and probe every model this many times; numbers become mean ± sd (default: repro.yaml's seeds)",
    )
    r.add_argument(
        "--rewrite-doc", action="store_true", help="run nothing: write the document again from OUT/report.json"
    )
    _add_set(r)
    r.set_defaults(func=_cmd_repro)
