"""The ``memtrain`` command line.

    memtrain train CONFIG [--set a.b=c ...] [--resume]
    memtrain eval CHECKPOINT_OR_RUN [...] [--objectives causal,copy] [--batches N] [--greedy]
    memtrain data tokenizer | shards | prepare-demo ...
    memtrain configs list | show NAME | copy NAME... --to DIR
    memtrain --version

CONFIG may be a YAML file or the name of a shipped config (``tiny``, ``paper/memory_mixer_e512_d512``).

Every user error ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from memtrain.errors import UserError
from memtrain.fileio import write_json


def _cmd_train(args) -> int:
    from memtrain.config import load_config
    from memtrain.engine.trainer import train
    from memtrain.launch.env import adopt_slurm_env

    adopt_slurm_env()  # an srun task per rank: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID
    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, stop_after=args.stop_after, preemption=getattr(args, "preemption", None))
    if summary.get("preempted"):
        from memtrain.engine.preempt import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE
    if summary.get("eval") and int(os.environ.get("RANK", "0")) == 0:  # one table, not one per torchrun rank
        from memtrain.eval.report import results_table

        print(results_table({cfg.run.name: summary["eval"]}))
    return 0


def _provenance_lines(checkpoints: list[str]) -> str:
    """One line per evaluated checkpoint: which memtrain (version, commit) trained it."""
    from memtrain.engine.checkpoint import read_meta, resolve_checkpoint
    from memtrain.version import describe_meta

    return "\n".join(
        f"# {path}: trained by {describe_meta(read_meta(path))}"
        for path in dict.fromkeys(resolve_checkpoint(c) for c in checkpoints)
    )


def _cmd_eval(args) -> int:
    from memtrain.eval.report import evaluate_checkpoints, per_chunk_table, results_table, write_eval_report

    objectives = [o for o in (args.objectives or "").split(",") if o] or None
    memories = [m for m in (args.memories or "").split(",") if m] or None
    results = evaluate_checkpoints(
        args.checkpoints,
        shards=args.shards,
        split=args.split,
        batches=args.batches,
        batch_size=args.batch_size,
        objectives=objectives,
        greedy=args.greedy,
        device=args.device,
        per_chunk=args.per_chunk,
        memories=memories,
    )
    print(results_table(results))
    print(_provenance_lines(args.checkpoints))
    if args.per_chunk:
        print("\ntoken accuracy (CE) by chunk position:\n" + per_chunk_table(results))
    if args.out:
        write_eval_report(args.out, results)
    if args.json:
        write_json(args.json, results)
    return 0


def _cmd_configs(args) -> int:
    from memtrain.shipped import configs_dir, copy_configs, resolve_config, shipped_configs

    if args.configs_command == "list":
        table = shipped_configs()
        width = max(map(len, table))
        print(f"# shipped configs in {configs_dir()} (use a name wherever a CONFIG is asked for)")
        for name, path in table.items():
            first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "")
            print(f"{name:{width}s}  {first.lstrip('# ').strip()}")
        return 0
    if args.configs_command == "show":
        path = resolve_config(args.name)
        if not path.is_file():
            raise UserError(f"{args.name}: no shipped config of that name (see: memtrain configs list)")
        sys.stdout.write(path.read_text())
        return 0
    for target in copy_configs(args.names, args.to, force=args.force):
        print(target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memtrain", description="Train, measure and scale memory models for language.")
    p.add_argument("--version", action="version", version=_version(), help="print the version (and commit) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="run config: a YAML file, or a shipped config by name (memtrain configs list)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in run.out_dir (starts fresh if there is none)",
    )
    t.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="train at most N steps in this invocation, then checkpoint and exit (continue with --resume)",
    )
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate checkpoints and print a metric table")
    e.add_argument("checkpoints", nargs="+", help="checkpoint directories or run directories (newest checkpoint)")
    e.add_argument("--shards", help="shard directory (default: the one the checkpoint was trained on)")
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--batches", type=int, default=16, help="number of batches (default 16)")
    e.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's)")
    e.add_argument(
        "--objectives", help="comma-separated: causal,copy,blank_copy,reconstruction (default: all that apply)"
    )
    e.add_argument(
        "--greedy",
        action="store_true",
        help="exact match by free-running greedy regeneration also for causal/copy (slower)",
    )
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument(
        "--per-chunk",
        action="store_true",
        help="also report loss and accuracy per chunk position (chunk c of a memory model reads c memories)",
    )
    e.add_argument(
        "--memories",
        help="comma-separated: normal,zero,shuffle: evaluate with the encoder's memories, "
        "all-zero memories, or memories of other rows of the batch (default normal)",
    )
    e.add_argument("--out", help="write report.json, report.md and plots into this directory")
    e.add_argument("--json", help="also write the results as JSON to this file")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("configs", help="list, show or copy out the run configs that ship with memtrain")
    csub = c.add_subparsers(dest="configs_command", metavar="CONFIGS_COMMAND", required=True)
    csub.add_parser("list", help="every shipped config by name, with its first comment line")
    cs = csub.add_parser("show", help="print a shipped config")
    cs.add_argument("name", help="shipped config name, e.g. tiny or paper/memory_mixer_e512_d512")
    cc = csub.add_parser("copy", help="copy shipped configs into a folder to edit them")
    cc.add_argument("names", nargs="+", metavar="NAME", help="shipped config names, or 'all'")
    cc.add_argument("--to", default=".", help="destination folder (default: the current one); sub-folders are kept")
    cc.add_argument("--force", action="store_true", help="overwrite files that exist")
    c.set_defaults(func=_cmd_configs)

    d = sub.add_parser("data", help="tokenizers and MDS shards")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    from memtrain.data.cli import register

    register(dsub)

    from memtrain.launch.cli import register as register_launch

    register_launch(sub)
    from memtrain.bench import register as register_bench

    register_bench(sub)
    from memtrain.eval.cli import register as register_measurements

    register_measurements(sub)
    from memtrain.precompute.cli import register as register_precompute

    register_precompute(sub)
    from memtrain.convert.cli import register as register_convert

    register_convert(sub)
    from memtrain.inference import register as register_inference  # encode, generate

    register_inference(sub)
    from memtrain.convert.export_decoder import register as register_export

    register_export(sub)
    from memtrain.hub import register as register_hub  # export

    register_hub(sub)
    from memtrain.eval.capability import register as register_capability

    register_capability(sub)
    return p


def _version() -> str:
    from memtrain.version import describe

    return describe()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    early = None
    if argv[:1] == ["train"]:  # before the parser's imports (torch): a preemption signal in start-up is remembered
        from memtrain.engine.preempt import Preemption

        early = Preemption()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preemption = early
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"memtrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("memtrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output stopped early (`memtrain configs list | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    finally:
        if early is not None:  # train restores it itself; this covers a refusal before training started
            early.restore()


if __name__ == "__main__":
    sys.exit(main())
