"""Atomic training checkpoints.

Layout of one checkpoint (a directory ``<run>/checkpoints/step_0000100``)::

    model.safetensors   model weights (safetensors; tied weights stored once)
    trainer.pt          optimizer, LR schedule, data-loader position, RNG states, step
    config.yaml         the full run config that produced it
    meta.json           step, model kind, vocab, tokenizer sha256, parameter count, time

A checkpoint is written into ``step_XXXXXXX.tmp-<pid>`` and renamed into place only when complete, so a run
killed mid-save leaves the previous complete checkpoint as the newest one; leftover ``.tmp`` folders are
ignored and removed at the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from memtrain.errors import UserError

_PREFIX = "step_"


@dataclass
class CheckpointRef:
    path: Path
    step: int


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete checkpoints of a run, oldest first."""
    ck = Path(run_dir) / "checkpoints"
    out = []
    if ck.is_dir():
        for p in ck.iterdir():
            if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit() \
                    and (p / "meta.json").is_file():
                out.append(CheckpointRef(p, int(p.name[len(_PREFIX):])))
    return sorted(out, key=lambda r: r.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointRef | None:
    refs = list_checkpoints(run_dir)
    return refs[-1] if refs else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict,
                    config_yaml: str, meta: dict, keep: int) -> Path:
    """Write a complete checkpoint atomically and keep only the newest ``keep``. Returns its path."""
    tmp = staging_dir(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    return commit_checkpoint(run_dir, tmp, step, config_yaml, meta, keep)


def staging_dir(run_dir: str | Path, step: int, suffix: str | None = None) -> Path:
    """A fresh ``checkpoints/step_XXXXXXX.tmp-<suffix>`` folder to write checkpoint ``step`` into (leftovers
    of interrupted saves are removed first). ``suffix`` defaults to this process id."""
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    for stale in ck.glob(f"{_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ck / f"{_PREFIX}{step:07d}.tmp-{suffix or os.getpid()}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: str | Path, tmp: Path, step: int, config_yaml: str, meta: dict, keep: int) -> Path:
    """Add ``config.yaml`` and ``meta.json`` to the staged ``tmp``, sync it to disk, rename it into place and
    keep only the newest ``keep`` checkpoints. Returns the checkpoint's path."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"{_PREFIX}{step:07d}"
    (tmp / "config.yaml").write_text(config_yaml)
    meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ck, files=False)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def _fsync_dir(path: Path, files: bool = True) -> None:
    """fsync every file below ``path`` (when ``files``) and the folders themselves."""
    folders = [path]
    if files:
        for root, dirs, names in os.walk(path):
            folders += [Path(root) / d for d in dirs]
            for name in names:
                with open(Path(root) / name, "rb") as fh:
                    os.fsync(fh.fileno())
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either itself or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "meta.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if p.is_dir():
        ref = latest_checkpoint(p)
        if ref is not None:
            return ref.path
        raise UserError(f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_*/ or a "
                        "checkpoint directory holding model.safetensors and meta.json)")
    raise UserError(f"{p}: checkpoint not found")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{ckpt / 'meta.json'}: unreadable checkpoint metadata ({exc})") from None


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load ``model.safetensors`` strictly; a layout or shape mismatch is a one-line UserError."""
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: missing; the checkpoint is incomplete")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as exc:
        raise UserError(f"{path}: unreadable weights, the file is damaged or incomplete ({exc})") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln or "shape" in ln), first[-1] if first else "")
        raise UserError(f"{path}: weights do not fit this model config ({detail.rstrip('.')})") from None
    if missing or unexpected:
        what = (f"missing {sorted(missing)[:3]}" if missing else "") + \
               (f" unexpected {sorted(unexpected)[:3]}" if unexpected else "")
        raise UserError(f"{path}: checkpoint was made for another model config ({what.strip()})")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: {"step", "optimizer", "scheduler", "loader", "rng"}; a missing or
    damaged file is a one-line UserError."""
    path = ckpt / "trainer.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as exc:  # torch.load raises pickle, zip and EOF errors for a damaged file
        raise UserError(f"{path}: unreadable trainer state, the file is damaged ({type(exc).__name__})") from None
    missing = [k for k in ("step", "optimizer", "scheduler", "loader", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path}: not a memtrain trainer state (no {', '.join(missing)})")
    return state
