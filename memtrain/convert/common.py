"""What the converters share: reading a memtrain checkpoint's config, and writing an output folder safely."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from memtrain.config import Config, dump_config
from memtrain.errors import UserError


def check_out_dir(out: Path, replace_if: Callable[[Path], bool] | None = None) -> bool:
    """``--out`` must be a new or empty folder (nothing is overwritten), or one that ``replace_if`` accepts
    (an earlier export of the same kind). Returns whether ``out`` holds something to replace."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if out.is_dir() and replace_if is not None and replace_if(out):
            return True
        raise UserError(f"--out: {out} exists and is not an empty folder; choose a new one")
    return False


@contextlib.contextmanager
def output_dir(out: Path, replace_if: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` when the block succeeds, removed if
    it fails (so a failed conversion leaves nothing behind). An ``out`` that ``replace_if`` accepts is replaced
    as a whole: moved aside, the new folder renamed into place, the old one removed."""
    replace = check_out_dir(out, replace_if)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def write_memtrain_checkpoint(folder: Path, model: torch.nn.Module, cfg: Config, meta: dict) -> None:
    """``model.safetensors`` (tied weights once), ``config.yaml``, ``meta.json`` and, last, ``manifest.json``
    (their sizes and sha256) into ``folder``."""
    from safetensors.torch import save_model

    from memtrain.engine.checkpoint import write_manifest

    save_model(model, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(dump_config(cfg))
    meta = dict(meta, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"), manifest="manifest.json")
    meta.setdefault("n_params", sum(p.numel() for p in model.parameters()))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    write_manifest(folder)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; a missing, unexpected or mis-shaped tensor is a one-line UserError.
    Tied parameters may be given under either name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise UserError(f"{source}: unexpected parameters {unexpected[:3]} for this model config")
    done = set()
    for name, p in params.items():
        if id(p) in done:
            continue
        if name not in state:
            aliases = [n for n, q in params.items() if q is p and n in state]
            if not aliases:
                raise UserError(f"{source}: parameter {name} {tuple(p.shape)} is missing")
            name = aliases[0]
        value = state[name]
        if tuple(value.shape) != tuple(p.shape):
            raise UserError(
                f"{source}: parameter {name} has shape {tuple(value.shape)}, the model config needs {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
        done.add(id(p))
