"""Gathering a sweep's runs into one table and scaling plots (``memtrain sweep collect DIR``).

Per run: ranks (the world size recorded in the run's provenance, ``meta.json`` / ``summary.json``; the config's
slurm section only for runs that predate it), parameters, tokens/s (median over the run's logged windows after
the first, which holds start-up), tokens/s per rank, model TFLOP/s per rank from the model FLOPs per token the
run recorded in meta.json (:func:`memtrain.flops.flops_per_token`, the same analytic count as ``memtrain bench``
and the training log: every objective a forward + backward pass, the decoder on its real positions, causal
mixing and attention on the lower triangle; per curriculum stage; recomputed for runs that predate it), MFU
(against ``--peak-tflops``, else the MFU the run logged against its device's datasheet peak), final training
loss, the held-out metrics of ``summary.json`` and the memtrain commit that trained it. Writes
``results.csv``, ``results.md``, ``scaling.png`` (throughput against ranks with ideal linear scaling from each
model's smallest run) and ``loss_vs_compute.png``.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml
from memtrain.errors import UserError
from memtrain.tables import markdown_table


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def run_record(run_dir: Path, sweep_values: dict | None = None, peak_tflops: float | None = None) -> dict | None:
    """One row for a run directory, or None when it holds no run."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    logs = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    tps = [r["tokens_per_s"] for r in logs[1:] if "tokens_per_s" in r] or [
        r["tokens_per_s"] for r in logs if "tokens_per_s" in r
    ]
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    from memtrain.engine.checkpoint import list_checkpoints

    refs = list_checkpoints(run_dir)  # no manifest hashing: only n_params and provenance are read
    meta = json.loads((refs[-1].path / "meta.json").read_text()) if refs else {}
    n_params = meta.get("n_params")
    ranks = world_size(cfg, meta, summary)
    model = cfg.get("model", {})
    row_len = int(model.get("chunk_len", 0)) * int(model.get("n_chunks", 0))
    steps = int(summary.get("step") or (logs[-1]["step"] if logs else 0))
    data, optim = cfg.get("data", {}), cfg.get("optim", {})
    tokens = steps * int(data.get("batch_size", 0)) * int(optim.get("grad_accum", 1)) * ranks * row_len
    rec = {
        "run": cfg.get("run", {}).get("name", run_dir.name),
        "run_dir": str(run_dir),
        "ranks": ranks,
        "params": n_params,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "final_loss": logs[-1].get("loss/total") if logs else None,
        "complete": bool(summary.get("complete")),
    }
    rec["tokens_per_s_per_rank"] = rec["tokens_per_s"] / ranks if rec["tokens_per_s"] else None
    per_token = stage_flops(cfg, meta)
    if per_token and rec["tokens_per_s"]:
        from memtrain.flops import mfu

        rates = [
            per_token[min(r.get("stage", 0), len(per_token) - 1)] * r["tokens_per_s"]
            for r in (logs[1:] or logs)
            if "tokens_per_s" in r
        ]
        rec["flops_per_token"] = per_token[0] if len(per_token) == 1 else None
        rec["model_tflops_per_rank"] = statistics.median(rates) / ranks / 1e12
        tokens_per_step = tokens / steps if steps else 0
        rec["compute_pflop"] = sum(f * n * tokens_per_step for f, n in zip(per_token, _stage_steps(cfg, steps))) / 1e15
        logged_mfu = [r["mfu"] for r in (logs[1:] or logs) if isinstance(r.get("mfu"), (int, float))]
        if peak_tflops:
            rec["mfu"] = mfu(statistics.median(rates), peak_tflops, ranks)
        elif logged_mfu:  # trained with a known peak (datasheet or train.peak_tflops)
            rec["mfu"] = statistics.median(logged_mfu)
    rec["commit"] = commit_of(meta, summary)
    for name, metrics in (summary.get("eval") or {}).items():
        for k in ("ce", "accuracy"):
            if k in metrics:
                rec[f"{name}_{k}"] = metrics[k]
    for k, v in (sweep_values or {}).items():
        rec[k] = v
    return rec


def _provenance(meta: dict, summary: dict, key: str) -> dict | None:
    """The run's provenance record (newest checkpoint's meta.json, else summary.json) that holds ``key``."""
    for source in (meta, summary):
        prov = source.get("provenance")
        if isinstance(prov, dict) and prov.get(key):
            return prov
    return None


def world_size(cfg: dict, meta: dict, summary: dict) -> int:
    """The ranks a run trained on: ``provenance.world_size`` of its newest checkpoint's meta.json or of its
    summary.json; for runs that predate provenance, nodes x ranks per node of the config's slurm section."""
    prov = _provenance(meta, summary, "world_size")
    if prov is not None:
        return int(prov["world_size"])
    slurm = cfg.get("slurm", {}) or {}
    ranks_per_node = slurm.get("gpus_per_node") or slurm.get("tasks_per_node", 1)
    return int(slurm.get("nodes", 1)) * int(ranks_per_node)


def commit_of(meta: dict, summary: dict) -> str | None:
    """``9bf5601`` or ``9bf5601-dirty``: the memtrain commit that trained the run, from its provenance."""
    prov = _provenance(meta, summary, "commit")
    return None if prov is None else str(prov["commit"]) + ("-dirty" if prov.get("dirty") else "")


def stage_flops(cfg: dict, meta: dict) -> list[float] | None:
    """Model FLOPs per token of each curriculum stage: as the run recorded them in meta.json, else (runs that
    predate it) :func:`memtrain.flops.stage_flops_per_token` of its config; None when the vocabulary is unknown
    or the config is not one this memtrain reads (or not counted: ``hf_decoder``)."""
    per_token = meta.get("flops_per_token")
    if isinstance(per_token, list) and per_token and all(isinstance(f, (int, float)) and f > 0 for f in per_token):
        return [float(f) for f in per_token]
    from memtrain.config import config_from_dict
    from memtrain.flops import stage_flops_per_token

    try:
        run = config_from_dict(cfg, source="config.yaml")
    except UserError:
        return None
    vocab = meta.get("vocab_size") or run.model.vocab_size
    return stage_flops_per_token(run, int(vocab)) if vocab else None


def _stage_steps(cfg: dict, steps: int) -> list[int]:
    """How many of the run's ``steps`` fell in each curriculum stage (the last stage takes any beyond the end)."""
    lengths = [int(s.get("steps", 0)) for s in (cfg.get("curriculum") or [])] or [steps]
    out, left = [], steps
    for i, n in enumerate(lengths):
        take = left if i == len(lengths) - 1 else min(n, left)
        out.append(take)
        left -= take
    return out


def collect(sweep_dir: str | Path, peak_tflops: float | None = None) -> list[dict]:
    """Rows for every run below ``sweep_dir``; writes results.csv / results.md / PNG plots there."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserError(f"{root}: sweep directory not found")
    values, grid_keys = {}, []
    if (root / "sweep.json").is_file():
        meta = json.loads((root / "sweep.json").read_text())
        values = {Path(p["run_dir"]).name: p["values"] for p in meta.get("points", [])}
        grid_keys = list(meta.get("grid", {}))
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        rec = run_record(d, values.get(d.name), peak_tflops)
        if rec is not None:
            rows.append(rec)
    if not rows:
        raise UserError(f"{root}: no runs found (expected run directories holding config.yaml)")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (root / "results.md").write_text(results_markdown(rows, cols))
    plot_scaling(rows, root / "scaling.png", grid_keys)
    plot_loss_vs_compute(rows, root / "loss_vs_compute.png")
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def results_markdown(rows: list[dict], cols: list[str]) -> str:
    shown = [c for c in cols if c != "run_dir"]
    return markdown_table(shown, ([_fmt(r.get(c)) for c in shown] for r in rows)) + "\n"


def _model_key(row: dict, grid_keys: list[str]) -> str:
    """Runs that differ only in their resources belong to one scaling curve."""
    parts = [f"{k.split('.')[-1]}={row[k]}" for k in grid_keys if k in row and not k.startswith("slurm.")]
    return ", ".join(parts) or "all runs"


def plot_scaling(rows: list[dict], out: Path, grid_keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("tokens_per_s"):
            curves.setdefault(_model_key(r, grid_keys), []).append(r)
    for label, rs in curves.items():
        rs.sort(key=lambda r: r["ranks"])
        x = [r["ranks"] for r in rs]
        y = [r["tokens_per_s"] for r in rs]
        (line,) = ax.plot(x, y, "o-", label=label)
        ideal = [y[0] * xi / x[0] for xi in x]
        ax.plot(x, ideal, "--", color=line.get_color(), alpha=0.5)
    ax.set_xlabel("ranks (GPUs or CPU processes)")
    ax.set_ylabel("training tokens/s")
    ax.set_title("throughput (dashed: ideal linear scaling)")
    if curves:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_loss_vs_compute(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = [
        (r["compute_pflop"], r["final_loss"], r["run"])
        for r in rows
        if r.get("compute_pflop") and r.get("final_loss") is not None
    ]
    for x, y, name in pts:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (PFLOP, model FLOPs as memtrain bench counts them)")
    ax.set_ylabel("final training loss")
    ax.set_title("loss against compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
