"""Small PNG plots for reports (matplotlib, Agg backend): bars by model, curves over a swept quantity, and
training curves read from runs' ``metrics.jsonl``. Each function writes one file of about 20-60 kB."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

SIZE = (6.4, 3.6)
DPI = 90


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: str | Path, title: str, reference: Mapping[str, float | None] | None) -> Path:
    for i, (name, y) in enumerate((reference or {}).items()):
        if y is not None and math.isfinite(y):
            ax.axhline(y, color=f"C{(i + 3) % 10}", linestyle="--", linewidth=1, label=name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _label_bars(ax, bars, values: Sequence[float], digits: int, fontsize: int) -> None:
    """Each bar's value above it (none for NaN)."""
    for bar, v in zip(bars, values):
        if math.isfinite(v):
            ax.annotate(
                f"{v:.{digits}f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=fontsize,
            )


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    title: str,
    reference: Mapping[str, float | None] | None = None,
) -> Path:
    """One bar per label (values: len(labels) numbers; NaN draws no bar), with optional dashed reference
    lines ``{name: y}``. Returns the path written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(SIZE[0], 0.9 * len(labels) + 2), SIZE[1]))
    xs = range(len(labels))
    bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], color=[f"C{i % 10}" for i in xs])
    _label_bars(ax, bars, values, 3, 7)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, reference)


def grouped_bar_chart(
    path: str | Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
    reference: Mapping[str, float | None] | None = None,
) -> Path:
    """Bars grouped on the x axis: for each group, one bar per series ``{name: len(groups) values}`` in the
    series' colour (NaN draws no bar), labelled with its value; a legend names the series."""
    plt = _pyplot()
    n = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(SIZE[0], (0.35 * n + 0.5) * len(groups) + 2), SIZE[1]))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g - 0.4 + width * (i + 0.5) for g in range(len(groups))]
        bars = ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], width, color=f"C{i % 10}", label=name)
        _label_bars(ax, bars, values, 2, 6)
    ax.set_xticks(list(range(len(groups))), groups, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, title, reference)


def line_chart(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    reference: Mapping[str, float | None] | None = None,
) -> Path:
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


def panel_lines(
    path: str | Path,
    panels: Mapping[str, Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Line charts side by side, one panel per key of ``panels`` (``{panel: {colour: {style: (xs, ys)}}}``): the
    colour names one quantity (e.g. the objective), the line style another (e.g. the memories given: solid,
    dashed, dotted, dash-dot in order of first appearance). Integer x ticks; the legend sits below the panels."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colours = list(dict.fromkeys(c for panel in panels.values() for c in panel))
    styles = list(dict.fromkeys(s for panel in panels.values() for lines in panel.values() for s in lines))
    dashes: list[LineStyleType] = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(max(SIZE[0], 4.2 * len(panels)), SIZE[1] + 0.6), sharey=True, squeeze=False
    )
    ticks: set[float] = set()
    for ax, (name, panel) in zip(axes[0], panels.items()):
        for colour, lines in panel.items():
            for style, (xs, ys) in lines.items():
                ax.plot(
                    list(xs),
                    list(ys),
                    marker="o",
                    markersize=3,
                    color=f"C{colours.index(colour) % 10}",
                    linestyle=dashes[styles.index(style) % len(dashes)],
                )
                ticks.update(xs)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_xticks(sorted(ticks))
    axes[0][0].set_ylabel(ylabel)
    handles = [Line2D([], [], color=f"C{i % 10}", label=c) for i, c in enumerate(colours)]
    if len(styles) > 1:
        handles += [
            Line2D([], [], color="0.3", linestyle=dashes[i % len(dashes)], label=s) for i, s in enumerate(styles)
        ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, path)


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
