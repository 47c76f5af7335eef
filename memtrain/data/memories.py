"""Precomputed memories, aligned with token batches: the reading side of :mod:`memtrain.precompute`.

A run config with ``data.memories: MEM_DIR`` trains a memory model whose frozen encoder is skipped: every
training batch carries, for each row, the memories ``memtrain precompute`` stored for it.

Alignment. The token loader stays the one source of order: its ``StreamingDataset`` (shuffle, rank
partition, exact resume) is replaced by :class:`JoinedDataset`, which is the same dataset except that
every sample it yields also carries the memory-shard sample with the same index in the split, read by
random access from the memory shards. Same order and same resume position therefore hold by construction,
and every sample's stored ``idx`` is compared with the token sample's index as it is read.

Checks before anything trains (:func:`open_memories`, :meth:`MemoryShards.check_encoder`), each a one-line
:class:`UserError` naming the field: the manifest (format, checksum), the token shards (tokenizer, index
hash of the split, samples per shard), the chunk geometry, the model (a memory model with a frozen encoder
whose config and weights are the memories' encoder's), every objective the run trains (stored task
memories, the same delimiter / filler settings), the memory shards (index hash, every shard present with
its recorded size).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from memtrain.data import memory_manifest as mf
from memtrain.data.index_check import read_index
from memtrain.data.memory_batch import MemoryBatch, split_memories  # noqa: F401 (re-exported)
from memtrain.data.streaming_compat import import_streaming, release_dataset
from memtrain.data.tokenizer import file_sha256
from memtrain.errors import UserError

streaming = import_streaming()
from streaming.base.format import reader_from_json  # noqa: E402 (after the import shim)


class MemoryShards:
    """One split of a memory-shard directory, read by the token split's sample index.

    ``get(i)`` -> ``{"idx": i, "mem": [k*e], <task column>: [...]}`` (stored arrays). ``collate(samples)``
    turns token samples carrying their memories into a :class:`MemoryBatch`. Picklable (DataLoader workers).
    """

    def __init__(self, mem_dir: str | Path, split: str, manifest: dict) -> None:
        self.dir = Path(mem_dir)
        self.split = split
        self.manifest = manifest
        where = f"data.memories ({self.dir})"
        if split not in manifest["splits"]:
            raise UserError(
                f"{where}: has no '{split}' split (it has {', '.join(manifest['splits']) or 'none'}); "
                f"precompute with --split {split}"
            )
        s = manifest["splits"][split]
        index_path = self.dir / split / "index.json"
        if not index_path.is_file():
            raise UserError(f"{index_path}: missing; the memory directory is incomplete")
        if file_sha256(index_path) != s["index_sha256"]:
            raise UserError(
                f"{index_path}: differs from the index the manifest records (edited or replaced); "
                f"re-run `memtrain precompute --merge {self.dir}`"
            )
        # checked like every index: plain <unit>/<file> names, only the encodings memtrain writes (never pkl)
        shards = read_index(index_path, max_depth=2)["shards"]
        if len(shards) != len(s["units"]):
            raise UserError(f"{index_path}: {len(shards)} shards, the manifest records {len(s['units'])} units")
        self.readers, self.starts, start = [], [], 0
        for shard, rec in zip(shards, s["units"]):
            if (
                shard["raw_data"]["basename"] != f"{rec['unit']}/{rec['shard']}"
                or shard["samples"] != rec["samples"]
                or rec["first_sample"] != start
            ):
                raise UserError(f"{index_path}: shard {rec['unit']} does not match the manifest's unit record")
            path = self.dir / split / shard["raw_data"]["basename"]  # a checked <unit>/<file> name
            if not path.is_file():
                raise UserError(f"{path}: memory shard missing")
            size = path.stat().st_size
            if size != rec["bytes"]:
                raise UserError(
                    f"{path}: memory shard truncated or changed ({size} bytes, the manifest records "
                    f"{rec['bytes']}); run the same `memtrain precompute` again: it recomputes damaged units"
                )
            self.readers.append(reader_from_json(str(self.dir), split, shard))
            self.starts.append(start)
            start += rec["samples"]
        self.samples = start
        C = manifest["n_chunks"]
        self.n_chunks = C
        self.dtype = manifest["dtype"]
        self.columns = {t: (spec["column"], len(spec["chunks"])) for t, spec in manifest["tasks"].items()}

    def __len__(self) -> int:
        return self.samples

    def check_token_index(self, index_path: Path) -> None:
        """The token split's ``index.json`` must be the one the memories were made from (same hash, hence
        the same shards with the same samples)."""
        want = self.manifest["tokens"]["splits"].get(self.split, {}).get("index_sha256")
        have = file_sha256(index_path)
        if have != want:
            raise UserError(
                f"data.memories ({self.dir}): made from other token shards: {self.split}/index.json of "
                f"data.shards has sha256 {have[:12]}…, the memories were made from {str(want)[:12]}… "
                f"({self.manifest['tokens']['path']}); precompute memories for these shards"
            )

    def check_encoder(self, model: torch.nn.Module) -> None:
        """The model's (frozen, loaded) encoder must hold the weights the memories were made with."""
        enc = self.manifest["encoder"]
        if mf.encoder_fingerprint(cast(torch.nn.Module, model.encoder)) != enc["weights_sha256"]:
            raise UserError(
                f"model.frozen_encoder.checkpoint: its encoder weights are not those the memories in "
                f"data.memories ({self.dir}) were made with (checkpoint {enc['checkpoint']}, step "
                f"{enc.get('step')}); point frozen_encoder at that checkpoint or precompute again"
            )

    def get(self, sample_id: int) -> dict[str, Any]:
        """The stored memories of token sample ``sample_id`` of the split."""
        k = bisect.bisect_right(self.starts, sample_id) - 1
        if k < 0 or sample_id >= self.samples:
            raise UserError(
                f"data.memories ({self.dir}): no sample {sample_id} in split '{self.split}' ({self.samples} samples)"
            )
        return self.readers[k].get_item(sample_id - self.starts[k])

    def collate(self, samples: list[dict[str, Any]]) -> MemoryBatch:
        """Token samples with ``memories`` -> :class:`MemoryBatch`: ids ``[B, C*L]`` long and per objective
        ``[B, C-1, e]`` (a copy task's chunks 0..C/2-1 are the plain memories: the task keeps that half)."""
        ids = torch.from_numpy(np.stack([s["input_ids"] for s in samples]).astype(np.int64))
        C = self.n_chunks
        stored = {}
        for column, k in self.columns.values():
            if column:
                stored[column] = mf.from_storage(np.stack([s["memories"][column] for s in samples]), self.dtype, k)
        plain = stored[mf.PLAIN_COLUMN]
        memories = {}
        for task, (column, _) in self.columns.items():
            if task == "causal":
                memories[task] = plain
            else:
                parts = [plain[:, : C // 2]] + ([stored[column]] if column else [])
                memories[task] = torch.cat(parts, dim=1)
        return MemoryBatch(ids, memories)


class JoinedDataset(streaming.StreamingDataset):
    """A token ``StreamingDataset`` whose every sample also carries its precomputed memories (``memories``
    key), read from ``memories`` (a :class:`MemoryShards` of the same split) by sample index."""

    def __init__(self, *, memories: MemoryShards, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memories = memories
        stream = self.streams[0]
        try:
            memories.check_token_index(Path(stream.local) / stream.split / "index.json")
            if self.num_samples != len(memories):
                raise UserError(
                    f"data.memories ({memories.dir}): {len(memories)} samples in split '{memories.split}', "
                    f"data.shards has {self.num_samples}"
                )
        except BaseException:
            release_dataset(self)  # refused: nothing else holds this dataset to free its shared memory
            raise

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        mem = self.memories.get(sample_id)
        if int(mem["idx"]) != sample_id:
            raise UserError(
                f"data.memories ({self.memories.dir}): memory sample {sample_id} of split "
                f"'{self.memories.split}' is stored for token sample {int(mem['idx'])}; the memory "
                "shards are misaligned, re-run `memtrain precompute`"
            )
        return dict(sample, memories=mem)


# ----------------------------------------------------------------------------------------------------
# Checks against a run config


def _stage_objectives(cfg) -> list[tuple[str, list[str]]]:
    """(where, active objectives) for each curriculum stage, or the run's objective weights."""
    if cfg.curriculum:
        return [(f"curriculum stage {s.name!r}", list(s.weights.active())) for s in cfg.curriculum]
    return [("objective.weights", list(cfg.objective.weights.active()))]


def check_run_config(manifest: dict, cfg, shards_info, mem_dir: str | Path) -> None:
    """Raise UserError naming the first field in which the run ``cfg`` (with the token shards
    ``shards_info``) does not fit the memories of ``manifest``."""
    from memtrain.objectives import special_tokens

    where = f"data.memories ({mem_dir})"
    m = cfg.model
    if m.kind != "memory" or m.no_memory:
        what = f"model.kind is {m.kind}" if m.kind != "memory" else "model.no_memory is true"
        raise UserError(f"{where}: only a memory model with memories reads precomputed memories ({what})")
    if m.frozen_encoder is None:
        raise UserError(
            f"{where}: memories are precomputed for a frozen encoder; set model.frozen_encoder.checkpoint "
            f"to the encoder they were made with ({manifest['encoder']['checkpoint']})"
        )
    if cfg.dist.pipeline_stages > 1:
        raise UserError(
            f"{where}: the pipeline engine runs the encoder in its stages; use dist.pipeline_stages: 1 "
            "with precomputed memories"
        )
    if manifest["tokenizer_sha256"] != shards_info.tokenizer_sha256:
        raise UserError(
            f"{where}: made from token shards of tokenizer {manifest['tokenizer_sha256'][:12]}…, but "
            f"data.shards ({shards_info.path}) uses tokenizer {shards_info.tokenizer_sha256[:12]}…"
        )
    if manifest["row_len"] != shards_info.row_len:
        raise UserError(
            f"{where}: made from rows of {manifest['row_len']} tokens, data.shards has rows of {shards_info.row_len}"
        )
    for name in ("chunk_len", "n_chunks"):
        if getattr(m, name) != manifest[name]:
            raise UserError(
                f"model.{name} is {getattr(m, name)}, but the memories in {where} were made with "
                f"{name} {manifest[name]}"
            )
    made = manifest["encoder"]["config"]
    ours = mf.encoder_config(m)
    diff = mf.first_difference(made, ours)
    if diff:
        raise UserError(
            f"model.{diff} is {json.dumps(mf.lookup(ours, diff))}, but the encoder of the memories in "
            f"{where} has {json.dumps(mf.lookup(made, diff))}"
        )
    tasks = manifest["tasks"]
    copies = set()
    for stage, objectives in _stage_objectives(cfg):
        for obj in objectives:
            if obj not in tasks:
                raise UserError(
                    f"{stage}: objective {obj} has no precomputed memories in {where} (it holds "
                    f"{', '.join(tasks)}); precompute with --tasks {','.join(sorted(set(tasks) | {obj}))}"
                )
            if obj != "causal":
                copies.add(obj)
    if copies:
        special = special_tokens(cfg.objective, shards_info.special_ids)
        made_special = manifest["special_tokens"] or {}
        flag = {"delimiter_id": "--delimiter-id", "n_delimiters": "--n-delimiters", "filler_id": "--filler-id"}
        for key, opt in flag.items():
            if key == "filler_id" and copies == {"copy"}:
                continue  # the copy task has no filler
            if getattr(special, key) != made_special.get(key):
                raise UserError(
                    f"objective.{key} is {getattr(special, key)}, but the {'/'.join(sorted(copies))} "
                    f"memories in {where} were made with {made_special.get(key)}; precompute with "
                    f"{opt} {getattr(special, key)}"
                )


def open_memories(cfg, shards_info, split: str = "train") -> MemoryShards:
    """Read ``cfg.data.memories``, check it against the run config and token shards (everything except the
    encoder's weights: :meth:`MemoryShards.check_encoder` once the model is built) and open ``split``."""
    mem_dir = cfg.data.memories
    if "://" in str(mem_dir):
        raise UserError(
            f"data.memories {mem_dir}: memory shards are read from a local (or shared-filesystem) directory"
        )
    manifest = mf.read_manifest(mem_dir)
    check_run_config(manifest, cfg, shards_info, mem_dir)
    return MemoryShards(mem_dir, split, manifest)
