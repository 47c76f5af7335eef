"""``memtrain convert deepspeed | reference | hf``."""

from __future__ import annotations

import argparse


def _cmd_deepspeed(args) -> int:
    from memtrain.convert.ds import convert_deepspeed

    out = convert_deepspeed(args.src, args.out)
    print(f"memtrain: wrote {out}/model.safetensors (+ config.yaml, meta.json) from the DeepSpeed state of {args.src}")
    return 0


def _cmd_reference(args) -> int:
    from memtrain.convert.reference import convert_reference

    out = convert_reference(
        args.file,
        args.arch,
        args.out,
        injection=args.injection,
        memory_position=args.memory_position,
        shards=args.shards,
    )
    print(f"memtrain: wrote {out} (memtrain checkpoint of the reference {args.arch})")
    return 0


def _cmd_hf(args) -> int:
    from memtrain.convert.hf import convert_hf

    out = convert_hf(args.src, args.out, tokenizer=args.tokenizer)
    print(
        f"memtrain: wrote {out} (LlamaForCausalLM, tokenizer and model card; "
        "AutoModelForCausalLM / AutoTokenizer.from_pretrained load it)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and its subcommands to the top-level subparsers ``sub``."""
    from memtrain.convert.reference import ARCHS

    c = sub.add_parser(
        "convert",
        help="convert checkpoints: DeepSpeed -> safetensors, reference code -> memtrain, memtrain -> Hugging Face",
    )
    csub = c.add_subparsers(dest="convert_command", metavar="CONVERT_COMMAND", required=True)

    d = csub.add_parser("deepspeed", help="a DeepSpeed ZeRO or pipeline checkpoint -> one model.safetensors + config")
    d.add_argument("src", help="run directory (its newest checkpoint) or checkpoint directory")
    d.add_argument("--out", required=True, help="new folder for model.safetensors, config.yaml, meta.json")
    d.set_defaults(func=_cmd_deepspeed)

    r = csub.add_parser("reference", help="a checkpoint of the paper's reference code -> memtrain checkpoint")
    r.add_argument("file", help="the reference model.safetensors (or the folder holding it)")
    r.add_argument("--arch", required=True, choices=ARCHS, help="the reference class that saved it")
    r.add_argument("--out", required=True, help="new folder for the memtrain checkpoint")
    r.add_argument(
        "--injection",
        default="unroll",
        choices=["unroll", "repeat"],
        help="autoencoding-mixer: how its decoder read the memory (the reference default: unroll)",
    )
    r.add_argument(
        "--memory-position",
        type=int,
        default=-1,
        choices=[-1, -2],
        help="encoder position that is the memory: -1 (default) or -2 (clm_encoder=True)",
    )
    r.add_argument("--shards", help="data.shards to write into the converted config (for memtrain eval)")
    r.set_defaults(func=_cmd_reference)

    h = csub.add_parser("hf", help="a memtrain transformer causal LM -> Hugging Face LlamaForCausalLM folder")
    h.add_argument("src", help="run directory (its newest checkpoint) or checkpoint directory")
    h.add_argument("--out", required=True, help="new folder for config.json, model.safetensors, tokenizer, README.md")
    h.add_argument("--tokenizer", metavar="PATH", help="the run's tokenizer.model (default: found with the run)")
    h.set_defaults(func=_cmd_hf)
