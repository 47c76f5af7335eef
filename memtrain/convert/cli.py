"""``memtrain convert deepspeed``."""
from __future__ import annotations

import argparse


def _cmd_deepspeed(args) -> int:
    from memtrain.convert.ds import convert_deepspeed

    out = convert_deepspeed(args.src, args.out)
    print(f"memtrain: wrote {out}/model.safetensors (+ config.yaml, meta.json) from the DeepSpeed state of {args.src}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and its subcommands to the top-level subparsers ``sub``."""
    c = sub.add_parser("convert", help="convert checkpoints: DeepSpeed -> safetensors")
    csub = c.add_subparsers(dest="convert_command", metavar="CONVERT_COMMAND", required=True)

    d = csub.add_parser("deepspeed", help="a DeepSpeed ZeRO or pipeline checkpoint -> one model.safetensors + config")
    d.add_argument("src", help="run directory (its newest checkpoint) or checkpoint directory")
    d.add_argument("--out", required=True, help="new folder for model.safetensors, config.yaml, meta.json")
    d.set_defaults(func=_cmd_deepspeed)
