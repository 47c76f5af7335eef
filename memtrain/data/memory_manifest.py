"""What a memory-shard directory holds, and how memories are stored.

Layout of a memory-shard directory (``memtrain precompute ... --out MEM_DIR``)::

    MEM_DIR/memtrain_memories.plan.json     the job's settings, written when the first rank starts
    MEM_DIR/memtrain_memories.json          the manifest, written by the merge once every unit is done
    MEM_DIR/<split>/index.json              streaming's index over all units (streaming's merge_index)
    MEM_DIR/<split>/unit_00007/             one unit = the memories of token shard 7 of <split>:
        index.json  shard.00000.mds  memtrain_unit.json

A sample of a memory shard is the row with the same sample index in the token split (column ``idx``).
Its columns, each a flat array of ``k * e`` values (``k`` memories of width ``e``, chunk-major):

``mem``         memories of the row's chunks 0..C-2 as the encoder sees them for the causal objective
``copy``        memories of chunks C/2..C-2 of the copy task's inputs (the copied half opens with
                delimiters), absent when C = 2 (the copy task then needs no memory of its copied half)
``blank_copy``  the same for the blank-copy task (the copied half is filler)

The copy tasks leave the first half of a row unchanged (the precompute job checks it on every batch), so a
copy task's memories for chunks 0..C/2-1 are the ``mem`` column's.

Storage dtypes: ``bf16`` (stored as its uint16 bit pattern: MDS has no bfloat16), ``fp16``, ``fp32``.

The manifest records the encoder (checkpoint path and file hash, a hash of the encoder's weights, its
config), the model config of the checkpoint (``model``), the tokenizer's hash, the chunk geometry, the dtype, the task
memories with the special tokens they were built with, the token shards' index hashes, and per unit the
memory shard's size and sha256. Its ``checksum`` is the sha256 of everything else, so a manifest edited by
hand is refused. No timestamps: an interrupted-and-resumed job writes the same bytes as an uninterrupted
one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memtrain.errors import UserError
from memtrain.fileio import write_text_atomic
from memtrain.objectives import COPY_TASKS

FORMAT_VERSION = 1
MANIFEST_FILE = "memtrain_memories.json"
PLAN_FILE = "memtrain_memories.plan.json"
UNIT_FILE = "memtrain_unit.json"
PLAIN_COLUMN = "mem"
#: storage dtype -> (numpy dtype of the MDS column, torch dtype of the memories)
STORAGE = {"bf16": ("uint16", torch.bfloat16), "fp16": ("float16", torch.float16), "fp32": ("float32", torch.float32)}
#: objectives whose memories a job can store ("causal" = the plain column, always stored)
TASKS = ("causal",) + COPY_TASKS
#: encoder settings that change what a memory is (compared with a run config's model section)
ENCODER_FIELDS = ("chunk_len", "memory_position", "final_norm", "compression")


def unit_name(index: int) -> str:
    """The folder of the unit made from token shard ``index`` of a split."""
    return f"unit_{index:05d}"


def task_chunks(task: str, n_chunks: int) -> list[int]:
    """The chunks whose memories a task's column holds: causal 0..C-2, a copy task C/2..C-2."""
    if task == "causal":
        return list(range(n_chunks - 1))
    return list(range(n_chunks // 2, n_chunks - 1))


def to_storage(memories: torch.Tensor, dtype: str) -> np.ndarray:
    """Memories ``[N, k, e]`` (any float dtype, any device) -> ``[N, k*e]`` numpy array of the storage dtype
    (bf16: the uint16 bit pattern). Raises UserError if a value is not finite after the conversion."""
    m = memories.detach().to(STORAGE[dtype][1])
    if not bool(torch.isfinite(m).all()):
        hint = (
            "; store them as --dtype bf16 or fp32" if dtype == "fp16" and bool(torch.isfinite(memories).all()) else ""
        )
        raise UserError(f"--dtype {dtype}: the encoder produced memories that are not finite in {dtype}{hint}")
    m = m.reshape(m.shape[0], -1).cpu()
    if dtype == "bf16":
        return m.view(torch.int16).numpy().view(np.uint16)
    return m.numpy()


def from_storage(values: np.ndarray, dtype: str, k: int) -> torch.Tensor:
    """Stored values ``[N, k*e]`` -> memories ``[N, k, e]`` as a torch tensor of the storage dtype."""
    arr = np.ascontiguousarray(values)
    t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if dtype == "bf16" else torch.from_numpy(arr)
    return t.reshape(arr.shape[0], k, -1)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the encoder's state dict (names, dtypes, shapes and bytes, sorted by name): equal exactly
    when two encoders hold the same weights, wherever they were loaded from."""
    h = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encoder_config(model_cfg) -> dict:
    """The settings of a :class:`~memtrain.config.ModelConfig` that decide what its encoder computes."""
    out = {"encoder": model_cfg.encoder.model_dump(mode="json")}
    out.update({k: getattr(model_cfg, k) for k in ENCODER_FIELDS})
    return out


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and two-space indentation: the byte form of every memtrain_memories file."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def checksum(manifest: dict) -> str:
    """sha256 of the manifest without its ``checksum`` field (compact, sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as canonical JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, canonical_json(obj))


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted path of the first field where ``a`` and ``b`` differ (None if equal); fields in ``b``'s
    order, then those only ``a`` has."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(b) + [k for k in a if k not in b]:
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return where
            found = first_difference(a[key], b[key], where)
            if found:
                return found
        return None
    return None if a == b else (prefix or "(top level)")


def lookup(obj: dict, dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"`` (None where a key is missing)."""
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# ----------------------------------------------------------------------------------------------------
# Validation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Encoder(_Strict):
    checkpoint: str
    step: int | None = None
    source_kind: Literal["autoencoder", "memory"]
    safetensors_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    weights_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    config: dict
    d_memory: int = Field(..., ge=1)


class _Task(_Strict):
    column: str | None
    chunks: list[int]


class _Special(_Strict):
    pad_id: int
    delimiter_id: int
    n_delimiters: int
    filler_id: int


class _TokenSplit(_Strict):
    index_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(..., ge=1)
    shards: int = Field(..., ge=1)


class _Tokens(_Strict):
    path: str
    splits: dict[str, _TokenSplit]


class _Unit(_Strict):
    unit: str
    token_shard: str
    first_sample: int = Field(..., ge=0)
    samples: int = Field(..., ge=1)
    shard: str
    bytes: int = Field(..., ge=1)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


class _MemorySplit(_Strict):
    index_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    samples: int = Field(..., ge=1)
    units: list[_Unit]


class _Plan(_Strict):
    format_version: int = Field(..., ge=1)
    encoder: _Encoder
    model: dict
    tokenizer_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(..., ge=8)
    chunk_len: int = Field(..., ge=1)
    n_chunks: int = Field(..., ge=2)
    row_len: int = Field(..., ge=2)
    dtype: Literal["bf16", "fp16", "fp32"]
    compute_precision: Literal["fp32", "bf16"]
    tasks: dict[str, _Task]
    special_tokens: _Special | None
    tokens: _Tokens


class _Manifest(_Plan):
    splits: dict[str, _MemorySplit]
    checksum: str = Field(..., pattern=r"^[0-9a-f]{64}$")


def _validate(model: type[BaseModel], raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: malformed: expected a JSON object")
    try:
        model.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise UserError(f"{where}: malformed: field '{loc}': {e['msg']}") from None
    return raw


def read_json(path: Path) -> Any:
    """A JSON file, with one-line errors for a missing or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None


def validate_plan(raw: Any, where: str) -> dict:
    """Check a plan's fields (UserError naming the first bad one); returns ``raw``."""
    return _validate(_Plan, raw, where)


def read_manifest(mem_dir: str | Path) -> dict:
    """Read and check ``MEM_DIR/memtrain_memories.json``: fields, format version and checksum.

    Raises UserError when the directory or manifest is missing (e.g. the job has not merged yet), the
    manifest is malformed, from a newer memtrain, or was edited (its checksum does not match).
    """
    d = Path(mem_dir)
    if not d.is_dir():
        raise UserError(f"{d}: memory-shard directory not found; make one with `memtrain precompute`")
    path = d / MANIFEST_FILE
    if not path.is_file():
        if (d / PLAN_FILE).is_file():
            raise UserError(
                f"{d}: no {MANIFEST_FILE} yet: the precompute job has not finished (run the remaining "
                f"slices, or `memtrain precompute --merge {d}` once they are done)"
            )
        raise UserError(f"{d}: no {MANIFEST_FILE}; not a memory-shard directory (make one with `memtrain precompute`)")
    raw = read_json(path)
    if isinstance(raw, dict) and isinstance(raw.get("format_version"), int) and raw["format_version"] > FORMAT_VERSION:
        raise UserError(
            f"{path}: format version {raw['format_version']}, but this memtrain reads version "
            f"{FORMAT_VERSION} or older; upgrade memtrain"
        )
    _validate(_Manifest, raw, str(path))
    if checksum(raw) != raw["checksum"]:
        raise UserError(
            f"{path}: its checksum does not match its contents (edited by hand?); a manifest is "
            f"written only by `memtrain precompute`: re-run `memtrain precompute --merge {d}`"
        )
    return raw
