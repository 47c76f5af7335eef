"""Gathering a sweep's runs into one table and scaling plots (``memtrain sweep collect DIR``).

Per run: ranks (nodes x ranks per node), parameters, tokens/s (median over the run's logged windows after
the first, which holds start-up), tokens/s per rank, model FLOP/s from ``6 x params`` per token (plus the
mixing term is small and left out), MFU when the per-rank peak is given, final training loss, and the held-out
metrics of ``summary.json``. Writes ``results.csv``, ``results.md``, ``scaling.png`` (throughput against
ranks with ideal linear scaling from each model's smallest run) and ``loss_vs_compute.png``.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from memtrain.errors import UserError


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
    slurm = cfg.get("slurm", {})
    ranks_per_node = slurm.get("gpus_per_node") or slurm.get("tasks_per_node", 1)
    ranks = int(slurm.get("nodes", 1)) * int(ranks_per_node)
    logs = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    tps = [r["tokens_per_s"] for r in logs[1:] if "tokens_per_s" in r] or \
          [r["tokens_per_s"] for r in logs if "tokens_per_s" in r]
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    n_params = None
    ck = sorted((run_dir / "checkpoints").glob("step_*/meta.json"))
    if ck:
        n_params = json.loads(ck[-1].read_text()).get("n_params")
    model = cfg.get("model", {})
    row_len = int(model.get("chunk_len", 0)) * int(model.get("n_chunks", 0))
    steps = int(summary.get("step") or (logs[-1]["step"] if logs else 0))
    data, optim = cfg.get("data", {}), cfg.get("optim", {})
    tokens = steps * int(data.get("batch_size", 0)) * int(optim.get("grad_accum", 1)) * ranks * row_len
    rec = {"run": cfg.get("run", {}).get("name", run_dir.name), "run_dir": str(run_dir), "ranks": ranks,
           "params": n_params, "steps": steps, "tokens": tokens,
           "tokens_per_s": statistics.median(tps) if tps else None,
           "final_loss": logs[-1].get("loss/total") if logs else None,
           "complete": bool(summary.get("complete"))}
    rec["tokens_per_s_per_rank"] = rec["tokens_per_s"] / ranks if rec["tokens_per_s"] else None
    if n_params and rec["tokens_per_s"]:
        rec["model_tflops"] = 6 * n_params * rec["tokens_per_s"] / 1e12
        rec["compute_pflop"] = 6 * n_params * tokens / 1e15
        if peak_tflops:
            rec["mfu"] = rec["model_tflops"] / (peak_tflops * ranks)
    for name, metrics in (summary.get("eval") or {}).items():
        for k in ("ce", "accuracy"):
            if k in metrics:
                rec[f"{name}_{k}"] = metrics[k]
    for k, v in (sweep_values or {}).items():
        rec[k] = v
    return rec


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
    (root / "results.md").write_text(markdown_table(rows, cols))
    plot_scaling(rows, root / "scaling.png", grid_keys)
    plot_loss_vs_compute(rows, root / "loss_vs_compute.png")
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    shown = [c for c in cols if c != "run_dir"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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
        line, = ax.plot(x, y, "o-", label=label)
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
    pts = [(r["compute_pflop"], r["final_loss"], r["run"]) for r in rows
           if r.get("compute_pflop") and r.get("final_loss") is not None]
    for x, y, name in pts:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (PFLOP, 6 x params x tokens)")
    ax.set_ylabel("final training loss")
    ax.set_title("loss against compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
