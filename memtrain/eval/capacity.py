"""Capacity curve: how many tokens one memory vector of a given width holds.

For each chunk length L an autoencoder (encoder and decoder of width d) is trained to regenerate L tokens
from its single memory, on the same corpus re-packed into rows of L tokens; the held-out token accuracy, the
rate of rows regenerated exactly, and the information the memory carries ((baseline CE - CE) / ln 2 x L bits)
are reported against L. Each length is an ordinary run (checkpoints, TensorBoard, resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrain.config import Config, apply_overrides, config_from_dict, read_yaml
from memtrain.eval.data import finished, retained_bits, run_baseline, shards_with_row_len
from memtrain.eval.probe import merge
from memtrain.eval.report import write_report
from memtrain.tables import markdown_table, num

CAPACITY_DEFAULTS: dict[str, Any] = {
    "model": {
        "kind": "autoencoder",
        "n_chunks": 1,
        "encoder": {"arch": "mixer", "d_model": 128, "n_layers": 2, "n_heads": 4},
        "decoder": {"arch": "mixer", "d_model": 128, "n_layers": 2, "n_heads": 4},
    },
    "objective": {"weights": {"reconstruction": 1.0}},
    "data": {"batch_size": 32},
    "optim": {"warmup_steps": 50, "schedule": "cosine", "grad_clip": 1.0},
    "train": {"steps": 1000, "eval_every": 0, "eval_batches": 16, "ckpt_every": 500, "log_every": 10},
}


@dataclass
class CapacitySettings:
    """`memtrain capacity` options; None keeps the overlay's or the default value."""

    out: str = "runs/capacity"
    lengths: tuple[int, ...] | list[int] = (8, 16, 32, 64)
    d_model: int | None = None
    arch: str | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    steps: int | None = None
    shards: str = "data/demo/shards"
    overlay: str | None = None
    overrides: tuple[str, ...] = ()


def capacity_config(s: CapacitySettings, length: int) -> Config:
    """The autoencoder run of chunk length ``length``: defaults <- overlay <- options <- ``--set``."""
    raw = merge(CAPACITY_DEFAULTS, read_yaml(s.overlay) if s.overlay else {})
    stack = {
        k: v
        for k, v in (("arch", s.arch), ("d_model", s.d_model), ("n_layers", s.n_layers), ("n_heads", s.n_heads))
        if v is not None
    }
    model = raw["model"]
    for side in ("encoder", "decoder"):
        model[side] = merge(model.get(side, {}), stack)
        if model[side].get("arch") == "transformer":
            model[side]["kernel"] = 1
    # unroll and the learning rates of the reproduction's autoencoders (yaml/repro): at 1000 steps a mixer with
    # repeat injection and lr 2e-3 regenerated 0.165 of 32 tokens, with unroll and 6e-3 0.434
    model.setdefault("injection", "unroll")
    raw.setdefault("optim", {}).setdefault("lr", 2.0e-3 if model["decoder"].get("arch") == "transformer" else 6.0e-3)
    model["chunk_len"] = length
    raw["run"] = merge(raw.get("run", {}), {"name": f"capacity L{length}", "out_dir": str(Path(s.out) / f"L{length}")})
    raw.setdefault("data", {})["shards"] = raw["data"].get("shards", s.shards)
    if s.steps:
        raw.setdefault("train", {})["steps"] = s.steps
    raw = apply_overrides(raw, list(s.overrides))
    raw["data"]["shards"] = shards_with_row_len(raw["data"]["shards"], length, raw["data"].get("cache_dir"))
    return config_from_dict(raw, source=f"capacity config for {length} tokens")


def run_capacity(s: CapacitySettings) -> dict:
    """Train (or resume) one autoencoder per length, then write report.json, report.md, capacity.png,
    bits.png and curves.png into ``s.out``. Returns the report."""
    from memtrain.engine.trainer import train

    points = []
    for length in sorted(set(s.lengths)):
        cfg = capacity_config(s, length)
        m = finished(train(cfg, resume=True), cfg.run.out_dir)["eval"]["reconstruction"]
        baseline = run_baseline(cfg)
        points.append(
            {
                "length": length,
                "run_dir": cfg.run.out_dir,
                "steps": cfg.train.steps,
                **{k: m[k] for k in ("ce", "accuracy", "exact_match", "I_e", "I_e_paper")},
                "tokens_regenerated": m["accuracy"] * length,
                "baseline_ce": baseline["information_less_ce"],
                **{
                    f"retained_{k}": v
                    for k, v in retained_bits(m["ce"], baseline["information_less_ce"], length).items()
                },
            }
        )
    enc = cfg.model.encoder
    report = {
        "encoder": enc.model_dump(mode="json"),
        "decoder": cfg.model.decoder.model_dump(mode="json"),
        "injection": cfg.model.injection,
        "points": points,
    }
    write_capacity_report(s.out, report)
    return report


def capacity_table(report: dict) -> str:
    """Markdown table: one row per chunk length."""
    rows = [
        (
            p["length"],
            num(p["ce"]),
            num(p["accuracy"]),
            num(p["exact_match"]),
            num(p["tokens_regenerated"], 1),
            num(p["retained_bits_per_memory"], 0),
        )
        for p in report["points"]
    ]
    return markdown_table(("tokens", "CE", "token acc", "exact match", "tokens regenerated", "bits / memory"), rows)


def write_capacity_report(out: str | Path, report: dict) -> Path:
    from memtrain.eval.plots import line_chart, training_curves

    out = Path(out)
    e = report["encoder"]
    what = f"{e['arch']} d{e['d_model']} n{e['n_layers']}"
    xs = [p["length"] for p in report["points"]]
    line_chart(
        out / "capacity.png",
        {
            "token accuracy": (xs, [p["accuracy"] for p in report["points"]]),
            "exact match (rows)": (xs, [p["exact_match"] for p in report["points"]]),
        },
        xlabel="tokens per memory",
        ylabel="fraction",
        title=f"capacity of one {what} memory",
        logx=True,
    )
    line_chart(
        out / "bits.png",
        {"bits per memory": (xs, [p["retained_bits_per_memory"] for p in report["points"]])},
        xlabel="tokens per memory",
        ylabel="bits",
        title="information carried by one memory",
        logx=True,
    )
    training_curves(
        out / "curves.png", {f"L={p['length']}": p["run_dir"] for p in report["points"]}, title="autoencoder training"
    )
    md = [
        f"# Capacity of one memory vector ({what}, {report['injection']} injection)",
        "",
        capacity_table(report),
        "",
        "Held-out rows. tokens regenerated = token accuracy x tokens; bits / memory = (CE of the token "
        "frequencies - CE) / ln 2 x tokens.",
        "",
        "![capacity](capacity.png) ![bits](bits.png) ![curves](curves.png)",
    ]
    return write_report(out, report, "\n".join(md))
