"""Atomic training checkpoints.

Layout of one checkpoint (a directory ``<run>/checkpoints/step_0000100``)::

    model.safetensors   model weights (safetensors; tied weights stored once)
    trainer.pt          optimizer, LR schedule, data-loader position, RNG states, step
    config.yaml         the full run config that produced it
    meta.json           step, model kind, vocab, tokenizer sha256, parameter count, time
    manifest.json       size and sha256 of every other file of the checkpoint; written last

A checkpoint is written into ``step_XXXXXXX.tmp-<pid>`` and renamed into place only when complete, so a run
killed mid-save leaves the previous complete checkpoint as the newest one; leftover ``.tmp`` folders are
ignored and removed at the next save. Old checkpoints are renamed to a ``.tmp`` name before they are deleted,
so a run killed while pruning never leaves a half-deleted folder that looks like a checkpoint.

Reading: :func:`latest_checkpoint` checks the newest checkpoint against its manifest (every listed file
present with its size and sha256, nothing else in the folder) and falls back to the previous complete one,
with a one-line warning, when it is damaged. ``trainer.pt`` is read with ``torch.load(weights_only=True)``: it
holds tensors and plain Python data only (RNG states included), so a file that asks the unpickler for
anything else is refused, never executed. Checkpoints written before manifests existed are checked for
truncation instead (safetensors header against the file size, CRCs of ``trainer.pt``'s zip members).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model

from memtrain.config import Config, config_from_dict
from memtrain.errors import UserError
from memtrain.fileio import write_text_atomic

if TYPE_CHECKING:
    from memtrain.models.base import MemtrainModel

_PREFIX = "step_"
#: the file that lists every other file of a checkpoint with its size and sha256; written last
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1


@dataclass
class CheckpointRef:
    path: Path
    step: int


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain Python data (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(py_version), [int(x) for x in py_internal], py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output (also the numpy-tuple form of checkpoints from older versions)."""
    torch.set_rng_state(state["torch"])
    nps = state["numpy"]
    if isinstance(nps, dict):
        nps = (
            nps["bit_generator"],
            nps["keys"].numpy().astype(np.uint32),
            int(nps["pos"]),
            int(nps["has_gauss"]),
            float(nps["cached_gaussian"]),
        )
    np.random.set_state(nps)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """Complete checkpoints of a run, oldest first."""
    ck = Path(run_dir) / "checkpoints"
    out = []
    if ck.is_dir():
        for p in ck.iterdir():
            if (
                p.is_dir()
                and p.name.startswith(_PREFIX)
                and p.name[len(_PREFIX) :].isdigit()
                and (p / "meta.json").is_file()
            ):
                out.append(CheckpointRef(p, int(p.name[len(_PREFIX) :])))
    return sorted(out, key=lambda r: r.step)


_warned: set[str] = set()


def _warn(text: str) -> None:
    """One line on stderr, once per process, from rank 0 only (every rank checks the same folders)."""
    if text in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(text)
    print(f"memtrain: warning: {text}", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | Path) -> CheckpointRef | None:
    """The newest checkpoint of a run that is intact (see :func:`checkpoint_problem`); newer damaged ones are
    skipped with a one-line warning naming them (they are left on disk). None if the run has none; a run whose
    checkpoints are all damaged is a UserError (nothing is started over them)."""
    refs = list_checkpoints(run_dir)
    damaged = []
    for ref in reversed(refs):
        problem = checkpoint_problem(ref.path)
        if problem is None:
            for bad, why in damaged:
                _warn(f"checkpoint {bad} is damaged ({why}); using the previous complete checkpoint {ref.path}")
            return ref
        damaged.append((ref.path, problem))
    if damaged:
        bad, why = damaged[0]
        raise UserError(
            f"{Path(run_dir) / 'checkpoints'}: every checkpoint is damaged (newest {bad.name}: {why}); "
            "restore them, or remove the checkpoints folder to start the run afresh"
        )
    return None


def save_checkpoint(
    run_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict, config_yaml: str, meta: dict, keep: int
) -> Path:
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
    """Add ``config.yaml``, ``meta.json`` and, last, ``manifest.json`` (size and sha256 of every file in
    ``tmp``, DeepSpeed's included) to the staged ``tmp``, sync it to disk, rename it into place and keep only
    the newest ``keep`` checkpoints up to ``step``. Returns the checkpoint's path."""
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"{_PREFIX}{step:07d}"
    (tmp / "config.yaml").write_text(config_yaml)
    meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"), manifest=MANIFEST)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    write_manifest(tmp)
    _fsync_dir(tmp)
    if final.exists():  # same step saved again (e.g. final save right after a periodic one)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(ck, files=False)
    # checkpoints after ``step`` are damaged ones this run resumed before; they are replaced when reached
    for old in [r for r in list_checkpoints(run_dir) if r.step <= step][:-keep]:
        _remove(old.path)
    return final


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a ``.tmp`` name first (atomic), so a process killed while
    deleting leaves a leftover the next save removes, never a half-deleted folder named like a checkpoint."""
    aside = folder.with_name(f"{folder.name}.tmp-del-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


# -- manifests ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_below(folder: Path) -> tuple[list[str], list[str]]:
    """(relative paths of the regular files below ``folder``, of anything else: links, sockets, ...)."""
    files, odd = [], []
    for root, dirs, names in os.walk(folder):
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                odd.append(os.path.relpath(os.path.join(root, d), folder))
                dirs.remove(d)
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            (files if os.path.isfile(full) and not os.path.islink(full) else odd).append(rel)
    return sorted(files), sorted(odd)


def write_manifest(folder: Path) -> Path:
    """Write ``folder/manifest.json``: size and sha256 of every file below ``folder`` (atomically)."""
    files, odd = _files_below(folder)
    if odd:
        raise OSError(f"{folder / odd[0]}: not a regular file; a checkpoint holds regular files only")
    listed = {
        rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)}
        for rel in files
        if rel != MANIFEST and not rel.startswith(f".{MANIFEST}.tmp-")
    }
    return write_text_atomic(
        folder / MANIFEST, json.dumps({"format": _MANIFEST_FORMAT, "files": listed}, indent=1) + "\n"
    )


#: folder -> signature (inode, size, ctime of every file) of the last successful verification in this process
_verified: dict[str, tuple] = {}


def _signature(folder: Path, files: list[str]) -> tuple:
    out = []
    for rel in files:
        st = os.stat(folder / rel)
        out.append((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its manifest.json (missing, extra, changed or odd files), or None."""
    folder = Path(folder)
    try:
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except OSError as exc:
        return f"{MANIFEST} unreadable ({exc.strerror or type(exc).__name__})"
    try:
        manifest = json.loads(text)
        listed = manifest["files"]
        if (
            manifest.get("format") != _MANIFEST_FORMAT
            or not isinstance(listed, dict)
            or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                for v in listed.values()
            )
        ):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a memtrain checkpoint manifest"
    files, odd = _files_below(folder)
    if odd:
        return f"{odd[0]} is not a regular file"
    present = set(files) - {MANIFEST}
    for rel in sorted(listed):
        if rel not in present:
            return f"{rel} is missing"
    extra = sorted(present - set(listed))
    if extra:
        return f"{extra[0]} is not listed in its {MANIFEST}"
    try:
        signature = _signature(folder, files)
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if _verified.get(str(folder)) == signature:
        return None
    sizes = {rel: size for rel, _, size, _, _ in signature}
    for rel in sorted(listed):
        if sizes[rel] != listed[rel]["size"]:
            return f"{rel} differs from its {MANIFEST} ({sizes[rel]} bytes, not {listed[rel]['size']})"
    try:
        for rel in sorted(listed):
            if _sha256(folder / rel) != listed[rel]["sha256"]:
                return f"{rel} differs from its {MANIFEST} (sha256)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    _verified[str(folder)] = signature
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Truncation / damage check of a safetensors file without reading its tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is damaged"
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} is truncated or damaged (size {size} bytes)"
    return None


def _zip_problem(path: Path) -> str | None:
    """CRC check of every member of a torch.save zip archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        return f"{path.name} is truncated or damaged"
    return None if bad is None else f"{path.name} is damaged ({bad} fails its CRC)"


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint folder ``ckpt`` cannot be used (one short phrase), or None when it is intact.

    With a manifest: every listed file present with its size and sha256 and nothing else. Without one (written
    by an older memtrain or another tool): a DeepSpeed checkpoint is refused (DeepSpeed unpickles its files,
    which is only allowed for files its manifest vouches for); otherwise the required files must exist and
    ``model.safetensors`` / ``trainer.pt`` must not be truncated."""
    ckpt = Path(ckpt)
    if (ckpt / MANIFEST).exists():
        return manifest_problem(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        engine = (meta.get("engine") or {}).get("name", "plain") if isinstance(meta, dict) else None
    except (OSError, ValueError, AttributeError):
        return "meta.json is unreadable"
    if isinstance(meta, dict) and meta.get("manifest"):
        return f"{MANIFEST} is missing"
    if engine == "deepspeed":
        return (
            f"no {MANIFEST}: an incomplete DeepSpeed checkpoint or one written by an older memtrain; its "
            "DeepSpeed files are not loaded without one"
        )
    required = ["model.safetensors"] + (["trainer.pt"] if engine == "plain" else [])
    for name in required:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    return _safetensors_problem(ckpt / "model.safetensors") or (
        _zip_problem(ckpt / "trainer.pt") if (ckpt / "trainer.pt").is_file() else None
    )


def verify_checkpoint(ckpt: Path, require_manifest: bool = False) -> None:
    """:func:`checkpoint_problem` as a one-line UserError naming the checkpoint (``require_manifest``: a
    checkpoint without manifest.json is refused whatever wrote it)."""
    problem = (
        f"no {MANIFEST}; the checkpoint is incomplete or was written by an older memtrain"
        if require_manifest and not (Path(ckpt) / MANIFEST).exists()
        else checkpoint_problem(ckpt)
    )
    if problem is not None:
        raise UserError(f"{ckpt}: refused, the checkpoint is damaged or was changed after it was written ({problem})")


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
        return p  # named explicitly; its safetensors weights are checked as they load
    if p.is_dir():
        ref = latest_checkpoint(p)
        if ref is not None:
            return ref.path
        raise UserError(
            f"{p}: no complete checkpoint found (expected {p}/checkpoints/step_*/ or a "
            "checkpoint directory holding model.safetensors and meta.json)"
        )
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
        missing, unexpected = load_safetensors_model(model, str(path), strict=False)
    except SafetensorError as exc:
        raise UserError(f"{path}: unreadable weights, the file is damaged or incomplete ({exc})") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next(
            (ln.strip() for ln in first if "size mismatch" in ln or "shape" in ln), first[-1] if first else ""
        )
        raise UserError(f"{path}: weights do not fit this model config ({detail.rstrip('.')})") from None
    if missing or unexpected:
        what = (f"missing {sorted(missing)[:3]}" if missing else "") + (
            f" unexpected {sorted(unexpected)[:3]}" if unexpected else ""
        )
        raise UserError(f"{path}: checkpoint was made for another model config ({what.strip()})")


def read_run_config(ckpt: Path) -> Config:
    """The run config saved in a checkpoint (``config.yaml``), validated."""
    import yaml

    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{ckpt / 'config.yaml'}: unreadable run config ({exc})") from None
    return config_from_dict(raw or {}, source=str(ckpt / "config.yaml"))


def read_checkpoint(path: str | Path) -> tuple[Path, Config, dict]:
    """(checkpoint directory, its run config, its meta.json) from a checkpoint or run directory."""
    ck = resolve_checkpoint(path)
    return ck, read_run_config(ck), read_meta(ck)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[MemtrainModel, Config, dict]:
    """(model in eval mode on ``device``, run config, meta) of a checkpoint or run directory of one of
    memtrain's own models: the one way every command turns a checkpoint into a model (an HF-decoder run's
    export is read by :func:`memtrain.inference.load_memory_model`)."""
    from memtrain.models import build_model

    ck, cfg, meta = read_checkpoint(path)
    model = build_model(cfg.model, int(meta["vocab_size"]))
    load_model_weights(model, ck)
    return model.to(device).eval(), cfg, meta


def _legacy_numpy_globals() -> list:
    """What numpy's RNG state (``np.random.get_state()``: a uint32 array) pickles as, for ``trainer.pt``
    written before RNG states were stored as tensors: array reconstruction and dtypes only."""
    try:
        from numpy._core.multiarray import _reconstruct  # pyright: ignore[reportAttributeAccessIssue]  (numpy's stubs omit this private function)
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    dtype_classes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtype_classes,
    ]


def unpickling_refusal(path: Path, exc: BaseException) -> UserError | None:
    """The one-line UserError for a ``weights_only`` load that stopped at a global it does not allow (the
    file asks for code or classes memtrain never stores), or None if ``exc`` is something else."""
    found = re.search(r"GLOBAL (\S+)|Unsupported operand (\S+)|Unsupported class (\S+)", str(exc))
    if not isinstance(exc, pickle.UnpicklingError) or not found:
        return None
    what = next(g for g in found.groups() if g)
    return UserError(
        f"{path}: refused, it asks the unpickler for {what}, which memtrain never stores there "
        "(tampered with, or not written by memtrain); nothing was loaded"
    )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint: {"step", "optimizer", "scheduler", "loader", "rng"}; a missing or
    damaged file is a one-line UserError. Read with ``weights_only=True`` (tensors and plain data, plus numpy
    arrays for older checkpoints' RNG state): a file whose pickle asks for anything else is refused unread."""
    path = ckpt / "trainer.pt"
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the checkpoint is incomplete") from None
    except pickle.UnpicklingError as exc:
        refused = unpickling_refusal(path, exc)
        if refused is not None:
            raise refused from None
        raise UserError(f"{path}: unreadable trainer state, the file is damaged ({type(exc).__name__})") from None
    except Exception as exc:  # torch.load raises pickle, zip and EOF errors for a damaged file
        raise UserError(f"{path}: unreadable trainer state, the file is damaged ({type(exc).__name__})") from None
    missing = [
        k for k in ("step", "optimizer", "scheduler", "loader", "rng") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise UserError(f"{path}: not a memtrain trainer state (no {', '.join(missing)})")
    return state
