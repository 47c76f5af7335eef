#!/usr/bin/env python
"""Calibrate ``memtrain scale``'s communication terms on this machine (CPU, gloo), and check its predictions.

    python tools/calibrate_scaling.py run --out DIR [--d-models 32,96,320] [--repeats 3] [--steps 200]
    python tools/calibrate_scaling.py report DIR/measurements.json      # refit and print from saved numbers
    python tools/calibrate_scaling.py fit --intra A.json --inter B.json --out CAL.json   # worker results
    python tools/calibrate_scaling.py sweep SWEEP_DIR [--calibration CAL.json]   # a collected sweep

``run`` measures, each ``--repeats`` times (interleaved, so that a shared machine's load falls on every
layout alike):

* **gloo all-reduce** of ``--allreduce-kib`` sizes between two processes, *intra-node* (two processes of one
  node, over ``127.0.0.1``) and *inter-node* (one process on each of two simulated nodes of
  ``tools/fake_nodes.py``, ``node0`` at ``127.0.0.1`` and ``node1`` at ``127.0.0.2``: each its own mount and
  UTS namespace, both on this machine's one network stack, so this link is loopback TCP too);
* **training step time** of ``yaml/tiny.yaml`` at each ``--d-models`` width (encoder and decoder) in four
  layouts: ``1x1`` (one rank), ``shared`` (two independent one-rank runs at once: the ranks share the cores
  as a two-rank run's do, but never communicate), ``1x2`` (one node, two ranks) and ``2x1`` (two nodes, one
  rank each). Batch scripts rendered as ``memtrain submit`` renders them (``--launcher torchrun``), run on
  simulated nodes, one CPU thread per rank (each rank a core of its own, as each GPU is its own device), the
  step time read from the run as ``memtrain sweep collect`` reads it (tokens per step over the median
  tokens/s of the logged windows after the first).

It then fits each link's latency and bandwidth to the medians of the all-reduce times
(:func:`memtrain.launch.scaling.fit_allreduce`), writes ``DIR/calibration.json`` (read by
:func:`memtrain.launch.scaling.load_calibration`), predicts the two-rank step times with
:func:`memtrain.launch.scaling.predict` (DDP, fp32 gradients: 4 bytes per parameter, no overlap) and prints
measured against predicted, with ``DIR/measurements.json`` holding every raw number and ``DIR/report.md``
the tables.

``allreduce-worker`` is one rank of the all-reduce benchmark (started by ``run``; on a GPU cluster under
``srun`` with ``--backend nccl``); ``fit`` turns two of its results into a calibration file. ``sweep``
compares the runs of a collected ``memtrain sweep`` with ``predict()`` and fits the overlap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from memtrain.errors import UserError  # noqa: E402
from memtrain.launch import scaling  # noqa: E402
from memtrain.tables import markdown_table  # noqa: E402

#: the single-rank baseline: two independent 1 x 1 runs at the same time (see :func:`train_point`)
SHARED = "shared"
#: the measured layouts, ``NODESxRANKS`` per node; ``1x1`` is the single-rank baseline of ``predict()``
LAYOUTS = ["1x1", SHARED, "1x2", "2x1"]
LINKS = ("intra", "inter")
BYTES_PER_PARAM = 4  # fp32 gradients on the wire (train.precision fp32; DDP all-reduces them as they are)


# ----------------------------------------------------------------------------------------------------
# all-reduce (gloo here; NCCL on a GPU cluster)


def allreduce_worker(args) -> int:
    """One rank of the all-reduce benchmark: rank, world size and rendezvous from the environment (``RANK`` /
    ``WORLD_SIZE`` / ``LOCAL_RANK``, or Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``;
    ``MASTER_ADDR`` / ``MASTER_PORT``). With ``--backend nccl`` the buffers are on GPU ``LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))))
        torch.cuda.set_device(device)
    init = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    dist.init_process_group(args.backend, init_method=init, rank=rank, world_size=world)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {}
    try:
        for kib in args.sizes_kib:
            buf = torch.ones(max(int(kib * 1024) // 4, 1), dtype=torch.float32, device=device)
            for _ in range(args.warmup):
                dist.all_reduce(buf)
            per: list[float] = []
            for _ in range(args.iters):
                dist.barrier()
                sync()
                t = time.perf_counter()
                dist.all_reduce(buf)
                sync()
                per.append(time.perf_counter() - t)
            # the collective is done when its slowest rank is done
            slowest = torch.tensor(per, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[str(buf.numel() * 4)] = slowest.tolist()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "seconds": times}))
    return 0


def _worker_argv(out: Path, sizes_kib: list[float], iters: int) -> list[str]:
    sizes = ",".join(f"{k:g}" for k in sizes_kib)
    me = str(Path(__file__).resolve())
    return [sys.executable, me, "allreduce-worker", "--out", str(out), "--sizes-kib", sizes, "--iters", str(iters)]


def _read_times(out: Path, what: str) -> dict[int, float]:
    """Bytes -> median seconds of one all-reduce, from a worker's output file."""
    if not out.is_file():
        raise RuntimeError(f"the {what} all-reduce benchmark wrote no result ({out})")
    raw = json.loads(out.read_text())["seconds"]
    return {int(b): statistics.median(ts) for b, ts in raw.items()}


def allreduce_intra(work: Path, sizes_kib: list[float], iters: int, tag: str) -> dict[int, float]:
    """Two processes of this machine (one node) over 127.0.0.1."""
    from fake_nodes import free_port

    out = work / f"allreduce-intra-{tag}.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    argv = _worker_argv(out, sizes_kib, iters)
    procs = [subprocess.Popen(argv, env=dict(env, RANK=str(r))) for r in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        raise RuntimeError(f"intra-node all-reduce benchmark failed (exit codes {codes})")
    return _read_times(out, "intra-node")


def allreduce_inter(cluster, work: Path, sizes_kib: list[float], iters: int, tag: str) -> dict[int, float]:
    """One process on each of two simulated nodes, rendezvous on ``node0``."""
    out = work / f"allreduce-inter-{tag}.json"
    argv = _worker_argv(out, sizes_kib, iters)
    job, done = cluster.step(argv, env={"MASTER_ADDR": cluster.names[0], "OMP_NUM_THREADS": "1"}, timeout=600)
    if done.returncode != 0:
        logs = "".join(p.read_text() for p in sorted(job.dir.glob("task*.out")))
        raise RuntimeError(f"inter-node all-reduce benchmark failed:\n{done.stderr}{logs[-3000:]}")
    return _read_times(out, "inter-node")


# ----------------------------------------------------------------------------------------------------
# training runs


def prepare_data(work: Path) -> Path:
    """Demo shards of rows of 32 tokens (yaml/tiny.yaml's 4 x 8), vocabulary 4096, under ``work/demo``."""
    out = work / "demo"
    argv = [sys.executable, "-m", "memtrain", "data", "prepare-demo", "--out", str(out), "--vocab-size", "4096"]
    subprocess.run([*argv, "--row-len", "32", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return out / "shards"


def render(work: Path, shards: Path, d_model: int, nodes: int, per_node: int, steps: int, name: str) -> Path:
    """The batch script ``memtrain submit yaml/tiny.yaml --nodes N --tasks-per-node R --launcher torchrun``
    renders for this point; returns its path."""
    from memtrain.config import load_config
    from memtrain.launch.slurm import prepare_job

    run_dir = work / "runs" / name
    overrides = [
        ("run.name", name),
        ("run.out_dir", str(run_dir)),
        ("data.shards", str(shards)),
        ("data.num_canonical_nodes", 2),
        ("model.encoder.d_model", d_model),
        ("model.decoder.d_model", d_model),
        ("train.steps", steps),
        ("train.log_every", max(steps // 10, 1)),
        ("train.eval_every", 0),
        ("train.ckpt_every", steps),
        ("train.precision", "fp32"),
        ("train.threads", 1),
        ("train.device", "cpu"),
        ("slurm.nodes", nodes),
        ("slurm.tasks_per_node", per_node),
        ("slurm.cpus_per_task", 1),
        ("slurm.launcher", "torchrun"),
        ("slurm.signal_seconds", 0),
    ]
    cfg = load_config(ROOT / "yaml" / "tiny.yaml", overrides)
    script, _ = prepare_job(cfg, work)
    return script


def step_time(run_dir: Path) -> tuple[float, int]:
    """(seconds per step, parameters) of a finished run, read as ``memtrain sweep collect`` reads it."""
    from memtrain.launch.collect import run_record

    rec = run_record(run_dir)
    if rec is None or not rec.get("tokens_per_s") or not rec.get("steps"):
        raise RuntimeError(f"{run_dir}: no finished run with logged tokens/s")
    return rec["tokens"] / rec["steps"] / rec["tokens_per_s"], int(rec["params"])


def train_point(clusters, work: Path, shards: Path, d_model: int, layout: str, steps: int, tag: str) -> list[dict]:
    """Run one layout (``1x1``, ``1x2``, ``2x1``, or ``shared``: two independent 1 x 1 runs at once, whose
    ranks share the machine's cores as the two ranks of a two-rank run do, but never communicate); one row
    per run."""
    nodes, per_node = (1, 1) if layout == SHARED else map(int, layout.split("x"))
    names = [f"d{d_model}-{layout}{i}-{tag}" for i in (0, 1)] if layout == SHARED else [f"d{d_model}-{layout}-{tag}"]
    jobs = []
    for name in names:
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a point measured again starts from scratch
        script = render(work, shards, d_model, nodes, per_node, steps, name)
        job = clusters[nodes].job(script, env={"OMP_NUM_THREADS": "1"})
        job.start()
        jobs.append((name, script, job))
    rows = []
    for name, script, job in jobs:
        rc = job.wait(900).rc
        if rc != 0:
            logs = "".join(p.read_text()[-2000:] for p in sorted(script.parent.glob("logs/*.out")))
            raise RuntimeError(f"{name}: the job failed (exit {rc}):\n{logs}")
        seconds, params = step_time(work / "runs" / name)
        load = round(os.getloadavg()[0], 2)  # the machine's load when the run ended (it may be shared)
        rows.append(
            {"d_model": d_model, "layout": layout, "repeat": tag, "step_s": seconds, "params": params, "load": load}
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# fit and check


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fit_links(allreduce: dict[str, list[dict[int, float]]]) -> dict[str, scaling.LinkFit]:
    """Each link's fit to the median over repeats of every size's median all-reduce time."""
    fits = {}
    for link in LINKS:
        sizes = sorted({b for rep in allreduce[link] for b in rep})
        med = [statistics.median(rep[b] for rep in allreduce[link] if b in rep) for b in sizes]
        try:
            fits[link] = scaling.fit_allreduce([float(b) for b in sizes], med, ranks=2)
        except ValueError as exc:
            raise UserError(f"{link}-node all-reduce: {exc}") from None
    return fits


def _per_repeat(runs: list[dict], layout: str) -> dict[str, float]:
    """Repeat -> step time of ``layout`` in that repeat (the mean of the two runs of ``shared``)."""
    out: dict[str, list[float]] = {}
    for r in runs:
        if r["layout"] == layout:
            out.setdefault(r["repeat"], []).append(r["step_s"])
    return {k: statistics.fmean(v) for k, v in out.items()}


def check(train: list[dict], net: scaling.Network) -> list[dict]:
    """Per width and two-rank layout: the measured step time (median over repeats, and its spread) against
    ``predict()``, once from the median ``1x1`` step time (the model as ``memtrain scale`` uses it: each
    rank computes as fast as one rank alone) and once from the median ``shared`` step time (the compute of a
    rank while another one computes beside it, which is what a rank gets on this machine). ``ratio`` is the
    median over repeats of the step time over that repeat's ``1x1`` one (runs of one repeat ran back to back);
    ``excess`` is the median over repeats of the step time minus that repeat's ``shared`` one: what
    communication (and waiting for the other rank) added."""
    rows = []
    for d in sorted({r["d_model"] for r in train}):
        runs = [r for r in train if r["d_model"] == d]
        params = runs[0]["params"]
        alone, shared = _per_repeat(runs, "1x1"), _per_repeat(runs, SHARED)
        t1, ts = statistics.median(alone.values()), statistics.median(shared.values())
        for layout in LAYOUTS:
            mine = _per_repeat(runs, layout)
            med, lo, hi = spread(list(mine.values()))
            row = {
                "d_model": d,
                "params": params,
                "layout": layout,
                "repeats": len(mine),
                "measured_s": med,
                "min_s": lo,
                "max_s": hi,
                "ratio": statistics.median(t / alone[k] for k, t in mine.items() if k in alone),
            }
            if layout in (SHARED, "1x1"):
                rows.append(row)
                continue
            nodes, per_node = map(int, layout.split("x"))
            pred = scaling.predict(t1, params, nodes, per_node, net, bytes_per_param=BYTES_PER_PARAM)
            row.update(
                predicted_s=pred["step_s"],
                predicted_comm_s=pred["comm_s"],
                predicted_ratio=pred["step_s"] / t1,
                error=(pred["step_s"] - med) / med,
                predicted_shared_s=ts + pred["comm_s"],
                error_shared=(ts + pred["comm_s"] - med) / med,
                excess_s=statistics.median(t - shared[k] for k, t in mine.items() if k in shared),
            )
            rows.append(row)
    return rows


def effective_fits(rows: list[dict]) -> list[list]:
    """Per two-rank layout, latency and bandwidth fitted to the training runs' excess over ``shared`` (one
    all-reduce of the fp32 gradients per step), or why they cannot be."""
    out = []
    for layout, link in (("1x2", "intra"), ("2x1", "inter")):
        mine = [r for r in rows if r["layout"] == layout]
        try:
            fit = scaling.fit_allreduce(
                [float(r["params"] * BYTES_PER_PARAM) for r in mine], [r["excess_s"] for r in mine], ranks=2
            )
        except ValueError as exc:
            out.append([f"{link} ({layout})", "–", "–", f"not fittable: {exc}"])
            continue
        out.append(
            [f"{link} ({layout})", f"{fit.latency_s * 1e6:.0f}", f"{fit.gbps:.3f}", f"{fit.median_rel_error:.1%}"]
        )
    return out


def report(meas: dict) -> tuple[str, scaling.Network]:
    """The markdown report of a measurements record, and the fitted network."""
    fits = fit_links(meas["allreduce"])
    net = scaling.calibration_network(meas.get("name", "calibrated"), fits["intra"], fits["inter"])
    repeats = len(meas["allreduce"]["intra"])
    out = [f"Measured {meas['date']} on {meas['machine']}, commit {meas['commit']}, {repeats} repeat(s)."]
    loads = [r["load"] for r in meas["train"] if isinstance(r.get("load"), (int, float))]
    if loads:
        med, lo, hi = spread(loads)
        out[0] += f" Load average (1 min) as the runs ended: median {med:.1f} ({lo:.1f}–{hi:.1f})."
    out.append("")
    sizes = sorted({b for link in LINKS for rep in meas["allreduce"][link] for b in rep})
    cells = []
    for b in sizes:
        row = [f"{b / 1024:,.0f}"]
        for link in LINKS:
            ts = [rep[b] for rep in meas["allreduce"][link] if b in rep]
            med, lo, hi = spread(ts)
            fit = fits[link]
            model = scaling.allreduce_time(b, 2, fit.gbps, fit.latency_s)
            row += [f"{med * 1e3:.3f} ({lo * 1e3:.3f}–{hi * 1e3:.3f})", f"{model * 1e3:.3f}"]
        cells.append(row)
    header = ["KiB", "intra ms (min–max)", "intra fit ms", "inter ms (min–max)", "inter fit ms"]
    out += ["gloo all-reduce, 2 ranks (median of repeats):", "", markdown_table(header, cells), ""]
    fit_rows = [
        [link, f"{f.latency_s * 1e6:.1f}", f"{f.gbps:.3f}", f"{f.median_rel_error:.1%}", f.points]
        for link, f in fits.items()
    ]
    header = ["link", "latency α (µs)", "bandwidth (GB/s)", "median fit error", "sizes"]
    out += ["Fitted terms:", "", markdown_table(header, fit_rows), ""]
    rows = check(meas["train"], net)

    def ms(r: dict, key: str) -> str:
        return f"{r[key] * 1e3:.2f}" if key in r else ""

    def pct(r: dict, key: str) -> str:
        return f"{r[key]:+.0%}" if key in r else ""

    cells = [
        [
            r["d_model"],
            f"{r['params']:,}",
            r["layout"],
            f"{r['measured_s'] * 1e3:.2f} ({r['min_s'] * 1e3:.2f}–{r['max_s'] * 1e3:.2f})",
            f"{r['ratio']:.2f}",
            ms(r, "predicted_s"),
            pct(r, "error"),
            ms(r, "predicted_shared_s"),
            pct(r, "error_shared"),
            ms(r, "excess_s"),
            ms(r, "predicted_comm_s"),
        ]
        for r in rows
    ]
    header = [
        "d_model",
        "params",
        "layout",
        "measured ms/step (min–max)",
        "/ 1x1",
        "predicted from 1x1",
        "error",
        "predicted from shared",
        "error",
        "measured − shared",
        "predicted comm",
    ]
    out += ["Training step time, ms (median of repeats) against `predict()`:", ""]
    out += [markdown_table(header, cells), ""]
    out += ["Communication terms fitted to the training runs (excess over `shared` against gradient bytes):", ""]
    out += [markdown_table(["link", "latency α (µs)", "bandwidth (GB/s)", "median fit error"], effective_fits(rows))]
    out.append("")
    return "\n".join(out), net


def fit_worker_file(path: Path) -> scaling.LinkFit:
    """The latency and bandwidth of one ``allreduce-worker`` result (over its own world size)."""
    try:
        raw = json.loads(path.read_text())
        world = int(raw["world_size"])
        sizes = [float(b) for b in raw["seconds"]]
        times = [statistics.median(ts) for ts in raw["seconds"].values()]
        return scaling.fit_allreduce(sizes, times, world)
    except (OSError, KeyError, TypeError, ValueError, AttributeError, statistics.StatisticsError) as exc:
        raise UserError(f"{path}: not an all-reduce result of this tool's worker, or not fittable ({exc})") from None


def cmd_fit(args) -> int:
    fits = {"intra": fit_worker_file(Path(args.intra)), "inter": fit_worker_file(Path(args.inter))}
    net = scaling.calibration_network(args.name, fits["intra"], fits["inter"])
    measured = {"intra": str(args.intra), "inter": str(args.inter)}
    Path(args.out).write_text(json.dumps(scaling.calibration_dict(net, measured), indent=1) + "\n")
    for link, fit in fits.items():
        print(
            f"{link}: latency {fit.latency_s * 1e6:.1f} us, {fit.gbps:.3f} GB/s (median error {fit.median_rel_error:.1%})"
        )
    print(f"{scaling.describe_network(net)}; written to {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------
# a collected sweep (a GPU cluster): measured step times against predict(), and the overlap fitted


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """Per run of a collected sweep (``memtrain sweep collect`` wrote ``results.csv``): parameters, nodes,
    ranks per node (nodes from the run's config.yaml) and the step time (tokens per step / tokens per s)."""
    import csv

    import yaml

    path = sweep_dir / "results.csv"
    if not path.is_file():
        raise UserError(f"{path}: not found (run `memtrain sweep collect {sweep_dir}` first)")
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            try:
                ranks, steps, tokens, tps = (float(rec[k]) for k in ("ranks", "steps", "tokens", "tokens_per_s"))
                params = float(rec["params"])
            except (KeyError, TypeError, ValueError):
                continue  # a run without throughput or checkpoint: nothing to compare
            cfg_path = Path(rec.get("run_dir", "")) / "config.yaml"
            cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
            nodes = int(((cfg or {}).get("slurm") or {}).get("nodes", 1))
            if steps <= 0 or tps <= 0:
                continue
            per_node = max(int(ranks) // nodes, 1)
            out.append(
                {
                    "run": rec["run"],
                    "params": params,
                    "nodes": nodes,
                    "per_node": per_node,
                    "step_s": tokens / steps / tps,
                }
            )
    if not out:
        raise UserError(f"{path}: no run with tokens/s, steps and parameters")
    return out


def fit_overlap(points: list[tuple[float, float, float]]) -> float:
    """The overlap ``f`` in ``step = t1 + (1 - f) comm`` that fits ``(t1, comm, measured step)`` points best
    (least squares), within [0, 1]."""
    num = sum(c * (m - t1) for t1, c, m in points)
    den = sum(c * c for _, c, _ in points)
    if den == 0:
        return 0.0
    return min(max(1.0 - num / den, 0.0), 1.0)


def sweep_check(
    rows: list[dict], net: scaling.Network, bytes_per_param: float, zero_stage: int
) -> tuple[list[dict], float]:
    """Every multi-rank run against ``predict()`` from the one-rank run of the same model, with the fitted
    overlap; returns (table rows, overlap)."""
    base = {r["params"]: r["step_s"] for r in rows if r["nodes"] * r["per_node"] == 1}
    pairs = []
    for r in rows:
        t1 = base.get(r["params"])
        if t1 is None or r["nodes"] * r["per_node"] == 1:
            continue
        p = scaling.predict(t1, r["params"], r["nodes"], r["per_node"], net, zero_stage, bytes_per_param)
        pairs.append((r, t1, p["comm_s"]))
    if not pairs:
        raise UserError("the sweep needs a one-rank run and multi-rank runs of the same model (same parameters)")
    f = fit_overlap([(t1, c, r["step_s"]) for r, t1, c in pairs])
    out = []
    for r, t1, c in pairs:
        pred = t1 + (1 - f) * c
        error = (pred - r["step_s"]) / r["step_s"]
        out.append({**r, "t1_s": t1, "predicted_s": pred, "error": error, "efficiency": t1 / r["step_s"]})
    return out, f


def cmd_sweep(args) -> int:
    net = scaling.resolve_network(args.net, calibration=args.calibration)
    rows, f = sweep_check(sweep_rows(Path(args.sweep_dir)), net, args.bytes_per_param, args.zero_stage)
    table = [
        [r["run"], f"{r['params']:,.0f}", r["nodes"], r["per_node"], f"{r['t1_s'] * 1e3:.2f}"]
        + [f"{r['step_s'] * 1e3:.2f}", f"{r['predicted_s'] * 1e3:.2f}", f"{r['error']:+.0%}", f"{r['efficiency']:.3f}"]
        for r in rows
    ]
    header = ["run", "params", "nodes", "ranks/node", "1-rank ms", "measured ms", "predicted ms", "error", "efficiency"]
    print(scaling.describe_network(net))
    print(markdown_table(header, table))
    print(f"fitted overlap: {f:.2f} (memtrain scale --overlap {f:.2f})")
    return 0


# ----------------------------------------------------------------------------------------------------
# command line


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    return [int(x) for x in _floats(text)]


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), gloo"


def cmd_run(args) -> int:
    from fake_nodes import FakeNodes

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards).resolve() if args.shards else prepare_data(work)
    clusters = {n: FakeNodes(work / f"cluster{n}", nodes=n, isolate=True) for n in (1, 2)}
    saved = work / "measurements.json"
    meas = {
        "date": args.date or datetime.date.today().isoformat(),
        "machine": args.machine or _machine(),
        "commit": args.commit or "unknown",
        "bytes_per_param": BYTES_PER_PARAM,
        "allreduce": {link: [] for link in LINKS},  # one entry per repeat, in order
        "train": [],
    }
    if args.resume and saved.is_file():  # keep what an interrupted run measured; measure only the rest
        meas = _load_measurements(saved)
    t0 = time.monotonic()
    try:
        for rep in range(args.repeats):
            tag = f"r{rep}"
            if len(meas["allreduce"]["intra"]) <= rep:
                meas["allreduce"]["intra"].append(allreduce_intra(work, args.allreduce_kib, args.iters, tag))
                meas["allreduce"]["inter"].append(
                    allreduce_inter(clusters[2], work, args.allreduce_kib, args.iters, tag)
                )
                saved.write_text(json.dumps(meas, indent=1))
            for d in args.d_models:
                for layout in LAYOUTS:
                    if any((r["d_model"], r["layout"], r["repeat"]) == (d, layout, tag) for r in meas["train"]):
                        continue
                    rows = train_point(clusters, work, shards, d, layout, args.steps, tag)
                    meas["train"] += rows
                    saved.write_text(json.dumps(meas, indent=1))
                    took = ", ".join(f"{r['step_s'] * 1e3:.2f}" for r in rows)
                    load = os.getloadavg()[0]
                    print(
                        f"calibrate: {tag} d_model {d} {layout}: {took} ms/step (load {load:.1f}, "
                        f"{time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
    finally:
        for c in clusters.values():
            c.close()
    return _write_report(meas, work)


def _write_report(meas: dict, work: Path) -> int:
    text, net = report(meas)
    measured = {k: meas[k] for k in ("date", "machine", "commit")} | {"repeats": len(meas["allreduce"]["intra"])}
    (work / "calibration.json").write_text(json.dumps(scaling.calibration_dict(net, measured), indent=1) + "\n")
    (work / "report.md").write_text(text + "\n")
    print(text)
    print(f"calibrate: {work / 'calibration.json'}, {work / 'measurements.json'}, {work / 'report.md'}")
    return 0


def _load_measurements(path: Path) -> dict:
    try:
        meas = json.loads(path.read_text())
        # JSON object keys are text: all-reduce sizes back to bytes
        meas["allreduce"] = {
            link: [{int(b): float(t) for b, t in rep.items()} for rep in meas["allreduce"][link]] for link in LINKS
        }
        meas["train"] = list(meas["train"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a measurements file of this tool ({type(exc).__name__}: {exc})") from None
    return meas


def cmd_report(args) -> int:
    path = Path(args.measurements)
    return _write_report(_load_measurements(path), Path(args.out) if args.out else path.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="calibrate_scaling.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure, fit, check; writes DIR/{measurements,calibration}.json, report.md")
    r.add_argument("--out", required=True, help="working folder (shards, runs, results)")
    r.add_argument("--shards", help="shards of rows of 32 tokens (default: demo shards made under --out)")
    r.add_argument("--d-models", type=_ints, default=[32, 96, 320], help="model widths (default 32,96,320)")
    r.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument(
        "--allreduce-kib", type=_floats, default=[4, 64, 512, 2048, 8192, 32768], help="all-reduce sizes, KiB"
    )
    r.add_argument("--iters", type=int, default=20, help="timed all-reduces per size")
    r.add_argument("--date", help="date to record (default: today)")
    r.add_argument("--machine", help="machine to record (default: CPU count, arch, gloo)")
    r.add_argument("--commit", help="memtrain commit to record")
    r.add_argument("--resume", action="store_true", help="keep the points DIR/measurements.json already holds")
    r.set_defaults(func=cmd_run)
    rp = sub.add_parser("report", help="refit and print from a measurements.json")
    rp.add_argument("measurements")
    rp.add_argument("--out", help="folder for calibration.json and report.md (default: next to the file)")
    rp.set_defaults(func=cmd_report)
    ft = sub.add_parser("fit", help="a calibration file from two allreduce-worker results (e.g. NCCL on a cluster)")
    ft.add_argument("--intra", required=True, help="result of ranks on one node")
    ft.add_argument("--inter", required=True, help="result of one rank on each of several nodes")
    ft.add_argument("--out", required=True, help="calibration file to write")
    ft.add_argument("--name", default="calibrated")
    ft.set_defaults(func=cmd_fit)
    sw = sub.add_parser("sweep", help="a collected sweep's step times against predict(); fits the overlap")
    sw.add_argument("sweep_dir", help="a sweep directory holding results.csv (memtrain sweep collect)")
    sw.add_argument("--calibration", help="calibration file (default: the --net preset)")
    sw.add_argument("--net", default="h100-nvlink-ib8x400", choices=list(scaling.NETWORKS))
    sw.add_argument("--bytes-per-param", type=float, default=2.0, help="gradient bytes on the wire (default 2)")
    sw.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    sw.set_defaults(func=cmd_sweep)
    w = sub.add_parser("allreduce-worker", help="one rank of the all-reduce benchmark (started by run)")
    w.add_argument("--out", required=True)
    w.add_argument("--sizes-kib", type=_floats, required=True)
    w.add_argument("--iters", type=int, default=20)
    w.add_argument("--warmup", type=int, default=3)
    w.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    w.set_defaults(func=allreduce_worker)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"calibrate_scaling.py: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a run or a benchmark that failed: what it said
        print(f"calibrate_scaling.py: failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
