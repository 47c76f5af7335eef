"""``memtrain submit``, ``memtrain sweep`` and ``memtrain config-get``."""

from __future__ import annotations

import argparse
from pathlib import Path

from memtrain.errors import UserError


def _slurm_overrides(args) -> list[tuple[str, object]]:
    """--nodes etc. as config overrides (flags win over the config's slurm section), set as values: argparse
    has already typed them (``--time 10:00:00`` and ``--account 12345`` stay text, never YAML)."""
    out: list[tuple[str, object]] = []
    for flag, key in (
        ("nodes", "nodes"),
        ("gpus_per_node", "gpus_per_node"),
        ("tasks_per_node", "tasks_per_node"),
        ("cpus_per_task", "cpus_per_task"),
        ("time", "time"),
        ("partition", "partition"),
        ("account", "account"),
        ("launcher", "launcher"),
        ("signal_seconds", "signal_seconds"),
        ("max_requeues", "max_requeues"),
    ):
        v = getattr(args, flag, None)
        if v is not None:
            out.append((f"slurm.{key}", v))
    if getattr(args, "no_requeue", False):
        out.append(("slurm.requeue", False))
    return out


def cmd_submit(args) -> int:
    from memtrain.config import load_config
    from memtrain.launch.jobs import record_submission
    from memtrain.launch.slurm import check_workdir, partitions_to_check, prepare_job, resolve, safe_job_name, sbatch

    cfg = load_config(args.config, args.set + _slurm_overrides(args))
    check_workdir(Path(args.workdir or "."))
    cfg = resolve(cfg, partitions_to_check(args.dry_run), args.dry_run)
    script, text = prepare_job(cfg, Path(args.workdir or ".").resolve())
    if args.dry_run:
        print(text, end="")
        print(f"# written to {script} (not submitted: --dry-run)")
        return 0
    job = sbatch(script)
    workdir = Path(args.workdir or ".").resolve()
    record_submission(script.parent, job, safe_job_name(cfg.run.name), [workdir / cfg.run.out_dir])
    print(
        f"submitted job {job}: {cfg.run.name} on {cfg.slurm.nodes} node(s) x {cfg.slurm.ranks_per_node} rank(s); "
        f"script {script}; logs {script.parent / 'logs'}; run dir {cfg.run.out_dir}"
    )
    _say_setup(cfg.slurm.setup)
    print(f"follow it with: memtrain jobs {cfg.run.out_dir}")
    return 0


def _say_setup(lines: list[str]) -> None:
    """A job's set-up lines run as shell in the job: say which, once, where the user submits."""
    if lines:
        print("the job runs these slurm.setup lines first: " + "; ".join(lines))


def cmd_config_get(args) -> int:
    from memtrain.config import load_config

    cfg = load_config(args.config, args.set)
    node = cfg.model_dump(mode="json")
    for part in args.key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"{args.key}: not a config field")
        node = node[part]
    print(node)
    return 0


def cmd_sweep(args) -> int:
    if args.target == "collect":
        if not args.rest:
            raise UserError("usage: memtrain sweep collect SWEEP_DIR [--peak-tflops X]")
        from memtrain.launch.collect import collect

        rows = collect(args.rest[0], peak_tflops=args.peak_tflops)
        root = Path(args.rest[0])
        print((root / "results.md").read_text(), end="")
        print(
            f"{len(rows)} run(s): {root / 'results.csv'}, {root / 'results.md'}, {root / 'scaling.png'}, "
            f"{root / 'loss_vs_compute.png'}"
        )
        return 0
    from memtrain.launch.jobs import record_submission
    from memtrain.launch.slurm import (
        check_workdir,
        new_job_dir,
        partitions_to_check,
        render,
        resolve,
        safe_job_name,
        sbatch,
    )
    from memtrain.launch.sweep import expand, resource_groups, run_local, write_points

    grid, points = expand(args.target, args.set + _slurm_overrides(args))
    print(f"sweep {grid.name}: {len(points)} point(s) from {args.target} into {grid.out_dir}")
    if args.local:
        codes = run_local(grid, points, threads_per_rank=args.threads)
        failed = [p.name for p, c in zip(points, codes) if c != 0]
        if failed:
            raise UserError(f"sweep {grid.name}: {len(failed)} point(s) failed: {', '.join(failed)}")
        print(f"sweep {grid.name}: done; collect with `memtrain sweep collect {grid.out_dir}`")
        return 0
    partitions = partitions_to_check(args.dry_run, hint="use --local or --dry-run")
    for p in points:  # every point is resolved and checked before anything is written or submitted
        p.cfg = resolve(p.cfg, partitions, args.dry_run)
    workdir = Path(args.workdir or ".").resolve()
    check_workdir(workdir)
    root = write_points(grid, points)
    for gi, (_, group) in enumerate(resource_groups(points).items()):
        job_dir = new_job_dir(workdir, f"{grid.name}-g{gi}")
        listing = job_dir / "configs.txt"
        listing.write_text("".join(f"{(root / 'configs' / (p.name + '.yaml')).resolve()}\n" for p in group))
        text = render(
            group[0].cfg, None, workdir, job_dir, array_list=listing, n_array=len(group), job_name=f"{grid.name}-g{gi}"
        )
        script = job_dir / "job.sbatch"
        script.write_text(text)
        if args.dry_run:
            print(text, end="")
            print(f"# {script}: array of {len(group)} point(s) (not submitted: --dry-run)")
        else:
            job = sbatch(script)
            runs = [workdir / p.run_dir for p in group]
            record_submission(job_dir, job, safe_job_name(f"{grid.name}-g{gi}"), runs, sweep=root.resolve())
            print(f"submitted array job {job}: {len(group)} point(s) ({', '.join(p.name for p in group)})")
            _say_setup(group[0].cfg.slurm.setup)
    if not args.dry_run:
        print(f"follow them with: memtrain jobs {root}")
    return 0


def cmd_jobs(args) -> int:
    from memtrain.launch.jobs import fill_states, find_jobs, table

    jobs = find_jobs(Path(args.target))
    if not jobs:
        print(f"{args.target}: no jobs submitted yet")
        return 0
    print(table(fill_states(jobs)))
    return 0


def cmd_cancel(args) -> int:
    from memtrain.launch.jobs import cancel, fill_states, find_jobs

    jobs = fill_states(find_jobs(Path(args.target)))
    if args.job:
        wanted = set(args.job)
        jobs = [j for j in jobs if j.job_id in wanted or j.base_id in wanted]
        if not jobs:
            raise UserError(f"--job {', '.join(args.job)}: not among the jobs of {args.target} (see memtrain jobs)")
    for line in cancel(jobs, now=args.now):
        print(line)
    return 0


def cmd_scale(args) -> int:
    from memtrain.launch.collect import run_record
    from memtrain.launch.scaling import describe_network, predict, resolve_network, table

    step, params, tokens = args.step_time, args.params, args.tokens_per_step
    if args.from_run:
        rec = run_record(Path(args.from_run))
        if rec is None or not rec.get("tokens_per_s") or not rec.get("params"):
            raise UserError(f"--from-run {args.from_run}: no finished run with logged tokens/s and a checkpoint")
        per_step = rec["tokens"] / max(rec["steps"], 1)
        step, params, tokens = per_step / rec["tokens_per_s"], rec["params"], per_step
        print(
            f"from {args.from_run}: {rec['ranks']} rank(s), {params:,} parameters, "
            f"{step * 1e3:.1f} ms/step, {tokens:,.0f} tokens/step"
        )
    if step is None or params is None:
        raise UserError("give --step-time and --params, or --from-run RUN_DIR")
    net = resolve_network(args.net, args.intra_gbps, args.inter_gbps, args.latency_us, args.calibration)
    try:
        nodes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        raise UserError(f"--nodes: expected comma-separated integers, got {args.nodes!r}") from None
    rows = [
        predict(
            step,
            params,
            n,
            args.gpus_per_node,
            net,
            zero_stage=args.zero_stage,
            bytes_per_param=args.bytes_per_param,
            pipeline_stages=args.pipeline_stages,
            micro_batches=args.micro_batches,
            overlap=args.overlap,
            tokens_per_step_1gpu=tokens,
        )
        for n in nodes
    ]
    print(describe_network(net))
    print(table(rows))
    return 0


def _add_slurm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int)
    p.add_argument("--tasks-per-node", dest="tasks_per_node", type=int, help="CPU ranks per node when no GPUs")
    p.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--launcher", choices=["srun", "torchrun", "deepspeed"])
    p.add_argument(
        "--signal-seconds",
        dest="signal_seconds",
        type=int,
        help="checkpoint-and-requeue signal this many seconds before the limit (0: none)",
    )
    p.add_argument("--no-requeue", dest="no_requeue", action="store_true")
    p.add_argument(
        "--max-requeues",
        dest="max_requeues",
        type=int,
        help="most times a preempted job requeues itself (slurm.max_requeues)",
    )


def register(sub) -> None:
    """Add the launch subcommands to the top-level subparsers."""
    s = sub.add_parser("submit", help="render a Slurm batch script for a config and submit it")
    s.add_argument("config")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_slurm_flags(s)
    s.add_argument("--workdir", help="job working directory (default: current)")
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    s.set_defaults(func=cmd_submit)

    w = sub.add_parser("sweep", help="expand a grid into runs (local or a Slurm job array); `sweep collect DIR`")
    w.add_argument("target", help="GRID.yaml, or 'collect'")
    w.add_argument("rest", nargs="*", help="with collect: the sweep directory")
    w.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every point, after the grid"
    )
    _add_slurm_flags(w)
    w.add_argument("--local", action="store_true", help="run the points here, one after another")
    w.add_argument("--threads", type=int, default=1, help="with --local: CPU threads per rank")
    w.add_argument("--dry-run", action="store_true", help="print the job array scripts instead of submitting")
    w.add_argument("--workdir", help="job working directory (default: current)")
    w.add_argument("--peak-tflops", type=float, default=None, help="with collect: per-rank peak for MFU")
    w.set_defaults(func=cmd_sweep)

    j = sub.add_parser("jobs", help="the Slurm jobs memtrain submitted: state, restarts, last step, log")
    j.add_argument(
        "target", nargs="?", default=".", help="a run directory, a sweep directory or a working directory (default: .)"
    )
    j.set_defaults(func=cmd_jobs)

    k = sub.add_parser("cancel", help="stop the Slurm jobs of a run, a sweep or a working directory")
    k.add_argument("target", help="a run directory, a sweep directory or a working directory")
    k.add_argument("--job", action="append", default=[], metavar="ID", help="only this job (repeatable)")
    k.add_argument("--now", action="store_true", help="cancel at once (default: running jobs checkpoint, then stop)")
    k.set_defaults(func=cmd_cancel)

    c = sub.add_parser("scale", help="predict step time and scaling efficiency on N nodes")
    c.add_argument("--from-run", help="take step time, parameters and tokens/step from a finished run")
    c.add_argument("--step-time", type=float, help="measured seconds per step on one GPU")
    c.add_argument("--params", type=float, help="model parameters")
    c.add_argument("--tokens-per-step", type=float, help="tokens per step on one GPU (for tokens/s)")
    c.add_argument("--nodes", default="1,2,4,8", help="comma-separated node counts")
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    c.add_argument("--pipeline-stages", type=int, default=1)
    c.add_argument("--micro-batches", type=int, default=1)
    c.add_argument("--bytes-per-param", type=float, default=2.0, help="gradient/parameter bytes on the wire")
    c.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden by compute")
    c.add_argument(
        "--net", default="h100-nvlink-ib8x400", choices=["h100-nvlink-ib8x400", "a100-nvlink-ib4x200", "ethernet-100g"]
    )
    c.add_argument("--intra-gbps", type=float, help="override: per-GPU bandwidth inside a node (GB/s)")
    c.add_argument("--inter-gbps", type=float, help="override: network bandwidth per node (GB/s)")
    c.add_argument("--latency-us", type=float, help="override: per-collective latency in and across nodes (µs)")
    c.add_argument(
        "--calibration",
        metavar="FILE",
        help="a network fitted by tools/calibrate_scaling.py (JSON); replaces --net, the overrides still apply",
    )
    c.set_defaults(func=cmd_scale)

    g = sub.add_parser("config-get", help="print one field of a resolved config (for scripts)")
    g.add_argument("config")
    g.add_argument("key", help="dotted field, e.g. run.out_dir")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.set_defaults(func=cmd_config_get)
