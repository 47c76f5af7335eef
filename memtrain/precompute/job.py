"""``memtrain precompute``: run a frozen encoder over MDS token shards and write MDS memory shards.

Units of work. A unit is one token shard of one split: its memories are written by streaming's
``MDSWriter`` (uncompressed, one memory shard per unit, so memory shards hold the same samples as token
shards) into ``<split>/.unit_NNNNN.tmp-<pid>`` together with ``memtrain_unit.json`` (samples, size and
sha256 of the shard), and renamed to ``<split>/unit_NNNNN`` when complete. A unit folder therefore exists
only complete; a killed job leaves at most temporary folders, which the next run of that unit removes.

Parallel. The units of all requested splits, in order (train's, then val's), are dealt round-robin to
``world`` slices; slice ``rank`` computes its own (``--rank/--world``, a Slurm array's task id and count,
or torchrun's RANK/WORLD_SIZE). Every slice first writes or checks ``memtrain_memories.plan.json`` (the
job's settings, created atomically by whichever slice comes first), so slices of one job cannot disagree
on the encoder, dtype or tasks.

Merge. When a slice has finished its units and finds every unit of the job complete, it merges: per split,
streaming's ``merge_index`` joins the units' ``index.json`` into ``<split>/index.json``, and then the
manifest ``memtrain_memories.json`` is written (atomically, last). Merging is idempotent, so two slices
finishing together do no harm; ``memtrain precompute --merge MEM_DIR`` does it by hand.

Deterministic. Batches never cross a unit, samples are written in shard order, and no file holds a
timestamp: on the same device, thread count and batch size, a resumed job writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memtrain.data import memory_manifest as mf
from memtrain.data import units
from memtrain.data.index_check import read_index
from memtrain.data.streaming_compat import import_streaming
from memtrain.data.tokenizer import file_sha256
from memtrain.devices import autocast_for, pick_device, resolve_precision
from memtrain.errors import UserError

if TYPE_CHECKING:
    from memtrain.config import ModelConfig


# ----------------------------------------------------------------------------------------------------
# Inputs: the encoder and the token shards


@dataclass
class FrozenEncoder:
    """A checkpoint's encoder, frozen, in eval mode: ``encoder(ids [N, L]) -> memories [N, e]``.

    ``info`` is the manifest's ``encoder`` section; ``model_cfg`` the checkpoint's model config.
    """

    encoder: torch.nn.Module
    model_cfg: ModelConfig
    vocab_size: int
    tokenizer_sha256: str | None
    info: dict


def load_frozen_encoder(checkpoint: str | Path) -> FrozenEncoder:
    """Load the encoder of an autoencoder or memory-model checkpoint (or run directory: its newest
    checkpoint). Raises UserError for a missing or damaged checkpoint, or a kind without an encoder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from memtrain.config import load_config
    from memtrain.engine.checkpoint import read_meta, resolve_checkpoint
    from memtrain.kernels.dispatch import set_kernels  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
    from memtrain.models import ChunkEncoder
    from memtrain.models.base import encoder_state_from

    src = resolve_checkpoint(checkpoint)
    meta = read_meta(src)
    kind = meta.get("kind")
    if kind not in ("autoencoder", "memory"):
        raise UserError(
            f"{src}: a checkpoint of kind {kind!r}; precompute needs the encoder of an autoencoder or a memory model"
        )
    cfg = load_config(src / "config.yaml")
    if cfg.model.kind != kind:
        raise UserError(f"{src}: meta.json says kind {kind!r} but config.yaml model.kind is {cfg.model.kind!r}")
    if kind == "memory" and cfg.model.no_memory:
        raise UserError(f"{src}: a memory model trained with model.no_memory: true has no encoder")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int):
        raise UserError(f"{src / 'meta.json'}: no vocab_size; not a memtrain checkpoint")
    weights = src / "model.safetensors"
    try:
        state = encoder_state_from(load_file(str(weights)), kind)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights}: unreadable weights, missing or damaged ({err})") from None
    encoder = set_kernels(ChunkEncoder(cfg.model, vocab), cfg.model.kernels)  # the encoder alone, not the model
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{weights}: the encoder's weights do not fit {src / 'config.yaml'} ({detail})") from None
    encoder = encoder.eval().requires_grad_(False)
    info = {
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "source_kind": kind,
        "safetensors_sha256": file_sha256(src / "model.safetensors"),
        "weights_sha256": mf.encoder_fingerprint(encoder),
        "config": mf.encoder_config(cfg.model),
        "d_memory": cfg.model.encoder.d_model,
    }
    return FrozenEncoder(encoder, cfg.model, vocab, meta.get("tokenizer_sha256"), info)


def _token_index(shards_dir: Path, split: str) -> tuple[dict, str]:
    """A token split's parsed ``index.json`` and the file's sha256."""
    path = shards_dir / split / "index.json"
    if not path.is_file():
        raise UserError(f"{shards_dir}: {split}/index.json is missing; the shard directory is incomplete")
    # the one index check (plain shard file names, only memtrain's encodings and compressions), then ours
    obj = read_index(path)
    for shard in obj["shards"]:
        if shard.get("format") != "mds" or "input_ids" not in shard.get("column_names", []):
            raise UserError(f"{path}: shards are not memtrain token shards (MDS with an input_ids column)")
    return obj, file_sha256(path)


def read_token_shard(shards_dir: Path, split: str, shard: dict, scratch: Path) -> np.ndarray:
    """The rows of one token shard, ``[samples, row_len]`` (the shard's integer dtype), in stored order.

    Read with streaming's MDS reader: from the uncompressed ``.mds`` file when streaming already decompressed
    it next to the ``.zstd`` (and it has the indexed size), else decompressed into ``scratch`` first.
    """
    import_streaming()
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    raw = shard["raw_data"]
    raw_path = shards_dir / split / raw["basename"]
    dirname = shards_dir
    if not (raw_path.is_file() and raw_path.stat().st_size == raw["bytes"]):
        zipped = shard.get("zip_data")
        if not zipped:
            raise UserError(f"{raw_path}: token shard missing or truncated (expected {raw['bytes']} bytes)")
        zip_path = shards_dir / split / zipped["basename"]
        try:
            data = decompress(shard["compression"], zip_path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"{zip_path}: token shard missing") from None
        except Exception as err:  # zstd raises its own error type for damaged data
            raise UserError(f"{zip_path}: token shard damaged, cannot decompress ({err})") from None
        if len(data) != raw["bytes"]:
            raise UserError(
                f"{zip_path}: token shard damaged ({len(data)} bytes decompressed, index says {raw['bytes']})"
            )
        target = scratch / split / raw["basename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        dirname = scratch
    reader = reader_from_json(str(dirname), split, shard)
    return np.stack([reader.get_item(i)["input_ids"] for i in range(shard["samples"])])


# ----------------------------------------------------------------------------------------------------
# Encoding


def encode_rows(
    encoder: torch.nn.Module,
    ids: torch.Tensor,
    n_chunks: int,
    copy_tasks: Sequence[str],
    special,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, torch.Tensor]:
    """Memories of one batch, every chunk of every task in one encoder call.

    Args:
        ids: ``[B, C*L]`` token rows (int64, on the encoder's device).
        copy_tasks: copy objectives whose copied-half memories to add (built by
            :func:`memtrain.objectives.make_task`, never re-derived here).

    Returns:
        column -> fp32 memories: ``mem`` ``[B, C-1, e]`` (chunks 0..C-2 of ``ids``), and per copy task with a
        non-empty column ``[B, C/2-1, e]`` (chunks C/2..C-2 of that task's inputs).
    """
    from memtrain.objectives import make_task

    B, T = ids.shape
    C = n_chunks
    L = T // C
    parts = [ids.view(B, C, L)[:, : C - 1]]
    names = [(mf.PLAIN_COLUMN, C - 1)]
    for task in copy_tasks:
        chunks = mf.task_chunks(task, C)
        inputs, _ = make_task(task, ids, special, C)
        if not torch.equal(inputs[:, : (C // 2) * L], ids[:, : (C // 2) * L]):
            raise RuntimeError(
                f"the {task} task changed the first half of a row; its memories of chunks "
                f"0..{C // 2 - 1} would not be the plain ones"
            )
        if chunks:
            parts.append(inputs.view(B, C, L)[:, chunks[0] : chunks[-1] + 1])
            names.append((task, len(chunks)))
    x = torch.cat(parts, dim=1)  # [B, K, L]
    K = x.shape[1]
    with torch.inference_mode(), autocast():
        m = encoder(x.reshape(B * K, L)).float().view(B, K, -1)  # [B, K, e]
    out, k0 = {}, 0
    for name, k in names:
        out[name] = m[:, k0 : k0 + k]
        k0 += k
    return out


# ----------------------------------------------------------------------------------------------------
# The job


@dataclass
class _Job:
    out: Path
    tokens: Path
    plan: dict
    encoder: FrozenEncoder
    special: object
    copy_tasks: list[str]
    units: list[tuple[str, int, dict, int]] = field(default_factory=list)  # (split, index, shard, first sample)


def _make_plan(
    enc: FrozenEncoder,
    tokens: Path,
    info,
    token_splits: dict,
    dtype: str,
    precision: str,
    tasks: list[str],
    special,
    n_chunks: int,
) -> dict:
    plan = {
        "format_version": mf.FORMAT_VERSION,
        "encoder": enc.info,
        "model": enc.model_cfg.model_dump(mode="json"),
        "tokenizer_sha256": info.tokenizer_sha256,
        "vocab_size": info.vocab_size,
        "chunk_len": enc.model_cfg.chunk_len,
        "n_chunks": n_chunks,
        "row_len": info.row_len,
        "dtype": dtype,
        "compute_precision": precision,
        "tasks": {
            t: {
                "column": (mf.PLAIN_COLUMN if t == "causal" else (t if mf.task_chunks(t, n_chunks) else None)),
                "chunks": mf.task_chunks(t, n_chunks),
            }
            for t in tasks
        },
        "special_tokens": None
        if special is None
        else {
            "pad_id": special.pad_id,
            "delimiter_id": special.delimiter_id,
            "n_delimiters": special.n_delimiters,
            "filler_id": special.filler_id,
        },
        "tokens": {"path": str(tokens), "splits": token_splits},
    }
    mf.validate_plan(plan, "precompute plan")
    return plan


def _settings(plan: dict) -> dict:
    """The settings of a plan that slices and runs of one job must share: not the paths its inputs were given
    by (they may be named differently), nor the checkpoint's full model config (informative; its fields vary
    with the memtrain version, while the encoder's config and weights hash are compared)."""
    p = json.loads(json.dumps(plan))
    p.pop("model", None)
    p["encoder"].pop("checkpoint", None)
    p["tokens"].pop("path", None)
    return p


def prepare_job(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path,
    splits: Sequence[str] | None = None,
    dtype: str = "bf16",
    tasks: Sequence[str] | None = None,
    precision: str = "fp32",
    delimiter_id: int | None = None,
    n_delimiters: int | None = None,
    filler_id: int | None = None,
) -> _Job:
    """Check every input, write or check the plan, and list all units of the job (nothing computed yet)."""
    from memtrain.config import ObjectiveConfig
    from memtrain.data.loader import read_shard_info
    from memtrain.objectives import check_task, special_tokens

    if dtype not in mf.STORAGE:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(mf.STORAGE)}")
    tokens = Path(shards)
    if "://" in str(shards):
        raise UserError(f"--shards {shards}: precompute reads a local (or shared-filesystem) token shard directory")
    info = read_shard_info(tokens)
    enc = load_frozen_encoder(checkpoint)
    L = enc.model_cfg.chunk_len
    if info.row_len % L or info.row_len // L < 2:
        raise UserError(
            f"--shards {tokens}: rows of {info.row_len} tokens are not 2 or more chunks of the encoder's chunk_len {L}"
        )
    C = info.row_len // L
    if enc.tokenizer_sha256 is not None and enc.tokenizer_sha256 != info.tokenizer_sha256:
        raise UserError(
            f"--shards {tokens}: made with tokenizer {info.tokenizer_sha256[:12]}…, but the encoder "
            f"checkpoint was trained with tokenizer {enc.tokenizer_sha256[:12]}…"
        )
    if enc.vocab_size != info.vocab_size:
        raise UserError(f"--shards {tokens}: vocabulary of {info.vocab_size} ids, the encoder's is {enc.vocab_size}")
    tasks = list(tasks) if tasks else (list(mf.TASKS) if C % 2 == 0 else ["causal"])
    unknown = [t for t in tasks if t not in mf.TASKS]
    if unknown:
        raise UserError(f"--tasks {','.join(unknown)}: unknown; choose from {','.join(mf.TASKS)}")
    tasks = [t for t in mf.TASKS if t in tasks or t == "causal"]  # fixed order; plain memories always
    copy_tasks = [t for t in tasks if t != "causal"]
    special = None
    if copy_tasks:
        given: dict[str, Any] = {} if n_delimiters is None else {"n_delimiters": n_delimiters}
        obj = ObjectiveConfig(delimiter_id=delimiter_id, filler_id=filler_id, **given)
        special = special_tokens(obj, info.special_ids)
        for t in copy_tasks:
            check_task(t, info.row_len, special, C)
    splits = list(splits) if splits else [s for s in ("train", "val") if info.rows(s)]
    token_splits, indexes = {}, {}
    for s in splits:
        if not info.rows(s):
            have = ", ".join(k for k in info.splits if info.rows(k)) or "none"
            raise UserError(f"--split {s}: {tokens} has no rows in that split (splits with rows: {have})")
        index, sha = _token_index(tokens, s)
        indexes[s] = index
        token_splits[s] = {
            "index_sha256": sha,
            "samples": sum(x["samples"] for x in index["shards"]),
            "shards": len(index["shards"]),
        }
    plan = _make_plan(enc, tokens, info, token_splits, dtype, precision, tasks, special, C)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    started = [p for p in out.iterdir() if not p.name.startswith(f".{mf.PLAN_FILE}.tmp-")] if out.is_dir() else []
    if started and not (out / mf.PLAN_FILE).exists():
        raise UserError(f"--out {out}: exists, is not empty and is not a memory-shard directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    units.claim_plan(out, mf.PLAN_FILE, plan, _settings, mf.validate_plan, "this memory directory")
    job = _Job(out=out, tokens=tokens, plan=plan, encoder=enc, special=special, copy_tasks=copy_tasks)
    for s in splits:
        first = 0
        for i, shard in enumerate(indexes[s]["shards"]):
            job.units.append((s, i, shard, first))
            first += shard["samples"]
    return job


def _columns(plan: dict) -> dict[str, str]:
    np_dtype = mf.STORAGE[plan["dtype"]][0]
    e = plan["encoder"]["d_memory"]
    cols = {"idx": "int"}
    for task in plan["tasks"].values():
        if task["column"]:
            cols[task["column"]] = f"ndarray:{np_dtype}:{len(task['chunks']) * e}"
    return cols


def _write_unit(
    job: _Job,
    split: str,
    index: int,
    shard: dict,
    first: int,
    batch_size: int,
    device: torch.device,
    autocast,
    on_batch: Callable[[int], object],
) -> None:
    """Compute and write one unit; it appears under its final name only when complete."""
    streaming = import_streaming()
    split_dir = job.out / split
    name = mf.unit_name(index)
    tmp = units.start_unit(split_dir, name)
    scratch = split_dir / f".{name}.scratch-{os.getpid()}"
    plan = job.plan
    C = plan["n_chunks"]
    try:
        rows = read_token_shard(job.tokens, split, shard, scratch)
        if rows.shape[1] != plan["row_len"]:
            raise UserError(
                f"{job.tokens}/{split}/{shard['raw_data']['basename']}: rows of {rows.shape[1]} "
                f"tokens, memtrain_shards.json says {plan['row_len']}"
            )
        writer = streaming.MDSWriter(
            out=str(tmp), columns=_columns(plan), compression=None, size_limit=None, progress_bar=False
        )
        for b0 in range(0, len(rows), batch_size):
            ids = torch.from_numpy(rows[b0 : b0 + batch_size].astype(np.int64)).to(device)
            cols = encode_rows(job.encoder.encoder, ids, C, job.copy_tasks, job.special, autocast)
            stored = {k: mf.to_storage(v, plan["dtype"]) for k, v in cols.items()}
            for j in range(ids.shape[0]):
                writer.write({"idx": first + b0 + j, **{k: v[j] for k, v in stored.items()}})
            on_batch(ids.shape[0])
        writer.finish()
        extra = {"token_shard": shard["raw_data"]["basename"], "first_sample": first}
        units.finish_unit(tmp, split_dir / name, extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def run_precompute(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path,
    splits: Sequence[str] | None = None,
    dtype: str = "bf16",
    batch_size: int = 64,
    tasks: Sequence[str] | None = None,
    rank: int | None = None,
    world: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    delimiter_id: int | None = None,
    n_delimiters: int | None = None,
    filler_id: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    merge: bool = True,
) -> dict:
    """Compute this slice's units of a precompute job, then merge if the whole job is complete.

    Args:
        checkpoint: an autoencoder or memory-model checkpoint (or run directory) whose encoder is used.
        shards: the token shard directory (``memtrain data shards``); ``splits`` default: all with rows.
        out: the memory-shard directory (created; an existing one of the same job is resumed).
        dtype: storage dtype ``bf16`` | ``fp16`` | ``fp32``. ``precision``: encoder compute, ``auto`` = bf16
            autocast on CUDA, fp32 elsewhere.
        tasks: objectives to store memories for (``causal`` always; ``copy``, ``blank_copy``); default all
            that the chunk count allows. ``delimiter_id`` / ``n_delimiters`` / ``filler_id``: as
            ``objective.*`` of the run that will train (defaults: the tokenizer's <sep>, 1, <blank>).
        rank / world: this slice (see :func:`memtrain.data.units.resolve_slice`).

    Returns:
        a summary: ``units`` (this slice's), ``computed``, ``skipped`` (already complete), ``memories``,
        ``seconds``, ``memories_per_s``, ``merged`` (whether the manifest was written), ``out``.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    rank, world = units.resolve_slice(rank, world)
    dev = pick_device(device, what="--device")
    prec = resolve_precision(precision, dev)
    job = prepare_job(checkpoint, shards, out, splits, dtype, tasks, prec, delimiter_id, n_delimiters, filler_id)
    job.encoder.encoder.to(dev)
    autocast = autocast_for(prec, dev)
    mine = job.units[rank::world]
    todo = [u for u in mine if not units.unit_done(job.out / u[0] / mf.unit_name(u[1]))]
    for u in mine:
        units.clear_leftovers(job.out / u[0], mf.unit_name(u[1]))
    per_row = sum(len(t["chunks"]) for t in job.plan["tasks"].values())
    total = sum(u[2]["samples"] for u in todo) * per_row
    t0 = time.perf_counter()
    bar = tqdm(
        total=total,
        desc=f"precompute {rank}/{world}",
        unit=" mem",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    t_report, done = t0, 0
    try:
        for k, (split, index, shard, first) in enumerate(todo):
            _write_unit(
                job, split, index, shard, first, batch_size, dev, autocast, on_batch=lambda n: bar.update(n * per_row)
            )
            bar.set_postfix_str(f"{split}/{mf.unit_name(index)}", refresh=False)
            done += shard["samples"] * per_row
            now = time.perf_counter()
            if not progress and (now - t_report >= 60 or k == len(todo) - 1):  # batch logs: a line a minute
                t_report = now
                print(
                    f"precompute {rank}/{world}: {k + 1}/{len(todo)} units, {done:,} memories, "
                    f"{done / max(now - t0, 1e-9):,.0f} memories/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    merged = merge_memories(job.out, require_complete=False) if merge else False
    return {
        "out": str(job.out),
        "rank": rank,
        "world": world,
        "units": len(mine),
        "computed": len(todo),
        "skipped": len(mine) - len(todo),
        "memories": total,
        "seconds": seconds,
        "memories_per_s": total / seconds if seconds > 0 else 0.0,
        "merged": bool(merged),
        "device": str(dev),
        "precision": prec,
    }


def missing_units(out: Path, plan: dict) -> list[str]:
    """``split/unit_NNNNN`` of every unit of the job that is not complete."""
    return units.missing(out, {split: s["shards"] for split, s in plan["tokens"]["splits"].items()})


def merge_memories(out: str | Path, require_complete: bool = True) -> bool:
    """Join the units of every split into ``<split>/index.json`` (streaming's ``merge_index``) and write the
    manifest. Returns False (or, with ``require_complete``, raises UserError) while units are missing."""
    import_streaming()

    out = Path(out)
    plan = mf.read_json(out / mf.PLAN_FILE) if (out / mf.PLAN_FILE).is_file() else None
    if plan is None:
        raise UserError(f"{out}: no {mf.PLAN_FILE}; not a memory-shard directory being made by `memtrain precompute`")
    mf.validate_plan(plan, str(out / mf.PLAN_FILE))
    missing = missing_units(out, plan)
    if missing:
        if require_complete:
            raise UserError(
                f"{out}: {len(missing)} unit(s) not done yet ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); run the remaining slices first"
            )
        return False
    manifest = dict(plan, splits={})
    for split, s in plan["tokens"]["splits"].items():
        split_dir = out / split
        units.merge_split(split_dir, [split_dir / mf.unit_name(i) for i in range(s["shards"])])
        records = units.read_records(split_dir, s["shards"])
        manifest["splits"][split] = {
            "index_sha256": file_sha256(split_dir / "index.json"),
            "samples": sum(r["samples"] for r in records),
            "units": records,
        }
    manifest["checksum"] = mf.checksum(manifest)
    mf.write_json_atomic(out / mf.MANIFEST_FILE, manifest)
    return True


def verify_memories(out: str | Path) -> dict:
    """Re-hash every memory shard against the manifest; returns ``{split: samples}``. UserError on the first
    shard that is missing, truncated or changed."""
    out = Path(out)
    manifest = mf.read_manifest(out)
    counts = {}
    for split, s in manifest["splits"].items():
        for rec in s["units"]:
            path = out / split / rec["unit"] / rec["shard"]
            if not path.is_file():
                raise UserError(f"{path}: memory shard missing")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise UserError(
                    f"{path}: memory shard truncated or changed ({size} bytes, manifest says {rec['bytes']})"
                )
            if file_sha256(path) != rec["sha256"]:
                raise UserError(f"{path}: memory shard changed (sha256 differs from the manifest's)")
        counts[split] = s["samples"]
    return counts
