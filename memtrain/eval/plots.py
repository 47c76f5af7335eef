"""Small PNG plots for reports (matplotlib, Agg backend): bars by model, curves over a swept quantity, and
training curves read from runs' ``metrics.jsonl``. Each function writes one file of about 20-60 kB."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

SIZE = (6.4, 3.6)
DPI = 90


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, reference: Mapping[str, float] | None) -> Path:
    for i, (name, y) in enumerate((reference or {}).items()):
        if y is not None and math.isfinite(y):
            ax.axhline(y, color=f"C{(i + 3) % 10}", linestyle="--", linewidth=1, label=name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str,
              reference: Mapping[str, float] | None = None) -> Path:
    """One bar per label (values: len(labels) numbers; NaN draws no bar), with optional dashed reference
    lines ``{name: y}``. Returns the path written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(SIZE[0], 0.9 * len(labels) + 2), SIZE[1]))
    xs = range(len(labels))
    bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], color=[f"C{i % 10}" for i in xs])
    for bar, v in zip(bars, values):
        if math.isfinite(v):
            ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, reference)


def line_chart(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
               ylabel: str, title: str, logx: bool = False, reference: Mapping[str, float] | None = None) -> Path:
    """One line with markers per series ``{name: (xs, ys)}``; ``logx`` puts x on a log2 axis with the xs as ticks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ticks: set[float] = set()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=4, label=name)
        ticks.update(xs)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, reference)


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict]:
    """The records of one ``kind`` ("train" or "eval") in a run's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == kind:
            records.append(rec)
    return records


def training_curves(path: str | Path, runs: Mapping[str, str | Path], title: str = "training loss") -> Path | None:
    """Training loss of every objective of every run ``{label: run_dir}`` against the step, one line each.
    Returns None when no run has logged anything."""
    series = {}
    for label, run_dir in runs.items():
        records = read_metrics(run_dir)
        keys = sorted({k for r in records for k in r if k.startswith("loss/") and k != "loss/total"})
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            name = label if len(keys) == 1 else f"{label}: {key[5:]}"
            series[name] = ([p[0] for p in pts], [p[1] for p in pts])
    if not series:
        return None
    return line_chart(path, series, xlabel="step", ylabel="CE (nats)", title=title)
