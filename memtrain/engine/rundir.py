"""Guarding a run directory: one run per directory, never overwritten by a different one.

A run directory holds ``config.yaml`` (the run's identity), ``checkpoints/``, ``tb/``, ``metrics.jsonl`` and
``summary.json``. Starting a run in a directory that holds a *different* run, or the same run with
checkpoints but without ``--resume``, stops with a message before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from memtrain.config import Config, dump_config
from memtrain.engine.checkpoint import latest_checkpoint
from memtrain.errors import UserError

#: Sections and fields that define what a run computes; cadence, device and progress fields may change on resume.
IDENTITY = ("model", "objective", "curriculum", "data.shards", "optim", "run.seed", "train.steps")


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def identity_of(cfg_dict: dict) -> dict:
    flat = _flatten(cfg_dict)
    return {k: v for k, v in flat.items() if any(k == i or k.startswith(i + ".") for i in IDENTITY)}


def first_difference(a: dict, b: dict) -> str | None:
    """The first identity field that differs between two config dicts, as 'field (old -> new)'."""
    ia, ib = identity_of(a), identity_of(b)
    for k in sorted(set(ia) | set(ib)):
        if ia.get(k) != ib.get(k):
            return f"{k}: {ia.get(k)!r} in the directory, {ib.get(k)!r} now"
    return None


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Create or validate ``run_dir`` for ``cfg``; write its ``config.yaml``."""
    new = cfg.model_dump(mode="json")
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.out_dir: {run_dir} exists and is not a directory")
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{saved}: unreadable run config; choose another run.out_dir") from None
        diff = first_difference(old, new)
        if diff is not None:
            raise UserError(f"run.out_dir: {run_dir} holds a different run ({diff}); choose another "
                            "run.out_dir or remove that directory")
        latest = latest_checkpoint(run_dir)
        if latest is not None and not resume:
            raise UserError(f"run.out_dir: {run_dir} already holds this run up to step {latest.step}; "
                            "pass --resume to continue it, or choose another run.out_dir")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"run.out_dir: {run_dir} exists, is not empty and is not a memtrain run directory; "
                        "choose another run.out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(dump_config(cfg))
