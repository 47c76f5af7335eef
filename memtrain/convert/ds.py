"""DeepSpeed checkpoints -> one consolidated ``model.safetensors`` plus the run config.

A memtrain DeepSpeed checkpoint holds DeepSpeed's own files under ``ds/state`` (and, written at save time,
an already consolidated ``model.safetensors``). This converter rebuilds the weights from DeepSpeed's files
alone, so it also serves a checkpoint whose consolidated file is missing:

* ZeRO 1-3: DeepSpeed's own consolidator, ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master
  weights gathered from the optimizer partitions).
* ZeRO 0: ``mp_rank_00_model_states.pt`` holds the whole module (fp32 runs; a bf16 run's fp32 master weights
  sit in its bf16 optimizer partitions, which the ZeRO consolidator reads).
* Pipeline (``zero_to_fp32`` fails there: the module is not in ``mp_rank_*``, each layer has its own
  ``layer_XX-model_states.pt``): the layer files, mapped back to model names through the same pipeline
  layers the run built (:func:`memtrain.engine.pipeline.pipeline_layers`). A bf16 pipeline run's layer files
  hold bf16 weights; they are widened to fp32 (the ``model.safetensors`` written at save time has the exact
  fp32 master weights).

What is unpickled: the checkpoint must first match its ``manifest.json`` (every file memtrain and DeepSpeed
wrote, with its sha256; nothing missing, nothing extra) or nothing is read. ``mp_rank_00_model_states.pt``
and the pipeline layer files are then read with ``torch.load(weights_only=True)``; the objects DeepSpeed
pickles beside the weights (its LR-schedule functions, ...) are read as inert placeholders, never called.
Only ZeRO 1-3 and bf16 ZeRO-0 go through DeepSpeed's consolidator, which unpickles the optimizer
partitions fully (``weights_only=False``): the manifest check is what guards that path.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import cast

import torch

from memtrain.convert.common import load_strict, output_dir, write_memtrain_checkpoint
from memtrain.engine import checkpoint as ckpt
from memtrain.errors import UserError


def find_deepspeed_checkpoint(src: Path) -> Path:
    """The checkpoint folder of ``src``: itself, or the newest checkpoint of a run folder."""
    src = Path(src)
    if (src / "meta.json").is_file():
        return src
    if src.is_dir():
        ref = ckpt.latest_checkpoint(src)
        if ref is not None:
            return ref.path
        raise UserError(
            f"{src}: no checkpoint found (expected {src}/checkpoints/step_*/ or a checkpoint folder "
            "holding meta.json and ds/)"
        )
    raise UserError(f"{src}: checkpoint not found")


def consolidated_state_dict(ck: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model name -> fp32 tensor, the checkpoint's meta) from the DeepSpeed files of checkpoint ``ck``."""
    meta = ckpt.read_meta(ck)
    engine = meta.get("engine") or {}
    if engine.get("name") != "deepspeed":
        raise UserError(
            f"{ck}: not a DeepSpeed checkpoint (written by the {engine.get('name', 'plain')} engine; "
            "its model.safetensors already holds the whole model)"
        )
    ds_dir = ck / engine.get("ds_dir", "ds")
    tag = engine.get("ds_tag", "state")
    if not all(
        isinstance(x, str) and x not in ("", ".", "..") and "/" not in x and os.sep not in x
        for x in (engine.get("ds_dir", "ds"), tag)
    ):
        raise UserError(f"{ck / 'meta.json'}: engine.ds_dir / engine.ds_tag must name folders inside the checkpoint")
    if not (ds_dir / tag).is_dir():
        raise UserError(f"{ds_dir / tag}: missing; the checkpoint has no DeepSpeed state")
    ckpt.verify_checkpoint(ck, require_manifest=True)  # before anything in it is unpickled
    try:
        if int(engine.get("pipeline_stages", 1)) > 1:
            state = _pipeline_state(ck, ds_dir / tag, int(meta["vocab_size"]))
        else:
            state = _zero_state(ds_dir, tag, int(engine.get("zero_stage", 0)), bool(engine.get("bf16")))
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        raise UserError(
            f"{ds_dir / tag}: cannot read the DeepSpeed state, it is damaged or incomplete "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return {k: v.float() for k, v in state.items()}, meta


def _zero_state(ds_dir: Path, tag: str, zero_stage: int, bf16: bool) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if zero_stage == 0 and not bf16:
        states = load_inert(ds_dir / tag / "mp_rank_00_model_states.pt")
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise UserError(f"{ds_dir / tag / 'mp_rank_00_model_states.pt'}: holds no module state")
        return dict(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's consolidator unpickles the ZeRO partitions with weights_only=False; the caller verified
    # every file against the checkpoint's manifest first (consolidated_state_dict)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # unannotated: returns a dict of tensors here (its inferred None is the fall-through of an unknown stage)
        return dict(cast(dict[str, torch.Tensor], get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)))


class _Inert:
    """Stands in for every object a DeepSpeed file pickles that is not a tensor or plain data: built from any
    arguments, ignores its state, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_inert(path: Path):
    """``torch.load(path, weights_only=True)`` with every global the file names beyond torch's safe set
    mapped to :class:`_Inert` (the file's own classes and functions are never looked up, let alone run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(_Inert, name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the DeepSpeed checkpoint is incomplete") from None
    except Exception as exc:  # zip, pickle and EOF errors of a damaged file
        refused = ckpt.unpickling_refusal(path, exc)  # a global torch blocks outright (os, sys, ...)
        if refused is not None:
            raise refused from None
        raise UserError(f"{path}: unreadable, the file is damaged ({type(exc).__name__})") from None


def _pipeline_state(ck: Path, folder: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    from memtrain.engine.pipeline import layer_param_names, pipeline_layers
    from memtrain.models import build_model

    cfg = ckpt.read_run_config(ck)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size)
    layers = pipeline_layers(model)
    state = {}
    for idx, names in enumerate(layer_param_names(model, layers)):
        if not names:
            continue
        files = sorted(folder.glob(f"layer_{idx:02d}-*model_states.pt"))
        if not files:
            raise UserError(
                f"{folder}: layer_{idx:02d}-model_states.pt is missing; the pipeline checkpoint is incomplete"
            )
        layer_state = load_inert(files[0])
        for local, name in names.items():
            if local not in layer_state:
                raise UserError(f"{files[0]}: has no {local} (model parameter {name})")
            state[name] = layer_state[local]
    return state


def convert_deepspeed(src: str | Path, out: str | Path) -> Path:
    """Write ``out``/{model.safetensors, config.yaml, meta.json} from the DeepSpeed files of ``src`` (a run
    or checkpoint folder). Returns ``out``."""
    from memtrain.models import build_model

    out = Path(out)
    ck = find_deepspeed_checkpoint(Path(src))
    state, meta = consolidated_state_dict(ck)
    cfg = ckpt.read_run_config(ck)
    model = build_model(cfg.model, int(meta["vocab_size"]))
    load_strict(model, state, str(ck / "ds"))
    converted = {k: v for k, v in meta.items() if k not in ("saved_at", "engine")}
    converted["engine"] = {"name": "consolidated", "from": str(ck), "was": meta.get("engine")}
    with output_dir(out) as tmp:
        write_memtrain_checkpoint(tmp, model, cfg, converted)
    return out
