"""Held-out evaluation of any memtrain model on any of its objectives.

For every objective the task inputs and targets are built exactly as in training; metrics are pooled over
all supervised tokens of all batches (and all ranks): cross-entropy, token accuracy, I_e (both
conventions), bits per token, and the exact-match rate of whole supervised spans. Exact match is greedy
regeneration: one pass is exact for reconstruction and blank copy (the decoder never reads its own
outputs); for causal and copy objectives it is teacher-forced unless ``greedy=True``, which regenerates the
supervised span token by token from the model's own predictions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from memtrain.config import OBJECTIVES, Config
from memtrain.data.loader import make_loader
from memtrain.kinds import KINDS
from memtrain.metrics import MetricAccumulator, greedy_regenerate
from memtrain.objectives import SpecialTokens, make_task, supervised_loss, task_chunks

if TYPE_CHECKING:
    from memtrain.engine.distributed import DistInfo

#: objectives where one forward pass already is free-running greedy regeneration
ONE_PASS_EXACT = ("reconstruction", "blank_copy")


def eval_objectives(cfg: Config) -> list[str]:
    """Objectives evaluated during training: every objective any stage trains, plus the model's own."""
    names = {n for s in cfg.stages() for n in s.weights.active()}
    names.add(KINDS[cfg.model.kind].own_objective)
    return [n for n in OBJECTIVES if n in names]


def take_batches(
    shards: str,
    split: str,
    batch_size: int,
    n_batches: int,
    cache_dir: str | None = None,
) -> list[torch.Tensor]:
    """The first ``n_batches`` batches ``torch.long [batch_size, row_len]`` of a split, unshuffled (the same
    every time). The loader is closed before returning (its shared memory and file descriptors are freed)."""
    with make_loader(
        shards,
        split,
        batch_size=batch_size,
        shuffle=False,
        seed=0,
        num_workers=0,
        cache_dir=cache_dir,
        max_batches=n_batches,
    ) as loader:
        return list(loader)


#: what the decoder is given as memories: the encoder's, all zero, or another row's (rolled by one row)
MEMORY_MODES = ("normal", "zero", "shuffle")


def altered_memories(memories: torch.Tensor, mode: str) -> torch.Tensor:
    """memories [B, ...] (encoder outputs of B rows) -> the same (``normal``), zeros (``zero``), or every row's
    memories replaced by those of the row before it, the first row taking the last row's (``shuffle``: a
    permutation of the batch that moves every row when B >= 2)."""
    if mode == "normal":
        return memories
    if mode == "zero":
        return torch.zeros_like(memories)
    if mode == "shuffle":
        if memories.shape[0] < 2:
            raise ValueError("shuffling memories across the batch needs at least 2 rows")
        return memories.roll(1, dims=0)
    raise ValueError(f"unknown memory mode {mode!r}; expected one of {', '.join(MEMORY_MODES)}")


def result_key(objective: str, mode: str = "normal") -> str:
    """The results key of an objective evaluated with memories ``mode``: ``copy``, ``copy (memories zero)``."""
    return objective if mode == "normal" else f"{objective} (memories {mode})"


@torch.no_grad()
def evaluate(
    model,
    batches: list[torch.Tensor],
    objectives: list[str],
    special: SpecialTokens,
    device: torch.device,
    info: DistInfo | None = None,
    greedy: bool = False,
    per_chunk: bool = False,
    memories: tuple[str, ...] | list[str] = ("normal",),
) -> dict[str, dict]:
    """Metrics per objective over ``batches`` ([B, T] token rows). Returns {key: {metric: value}} with
    ``key = result_key(objective, mode)`` for each objective and memory mode.

    ``greedy``: also regenerate causal/copy spans free-running and report exact match from that (with the
    encoder's own memories only). ``per_chunk``: add ``per_chunk`` = [{chunk, ce, accuracy, tokens}] for each
    chunk position c (positions c*S .. c*S+S-1 of a row, S = ``model.chunk_span``: L, or L + L_dec for dual rows
    of an HF-decoder memory model; in a memory model chunk c reads c memories).
    ``memories``: modes of :data:`MEMORY_MODES`; ``zero`` and ``shuffle`` run the encoder on the task inputs
    and alter its memories before the decoder reads them (models with an encoder only).
    """
    acc = MetricAccumulator(model.vocab_size)
    n_chunks = task_chunks(model)
    span = model.chunk_span
    for name in objectives:
        for mode in memories:
            key = result_key(name, mode)
            free_running = greedy and name not in ONE_PASS_EXACT and mode == "normal"
            for ids in batches:
                ids = ids.to(device)
                inputs, targets = make_task(name, ids, special, n_chunks)
                labels = model.align_labels(targets)
                if mode == "normal":
                    hidden = model(inputs)
                else:
                    hidden = model(inputs, memories=altered_memories(model.encode(inputs), mode))
                acc.update_from_stats(key, supervised_loss(model, hidden, labels))
                if per_chunk:
                    if labels.shape[1] % span:
                        raise ValueError(f"rows of {labels.shape[1]} positions are not whole chunks of {span}")
                    for c in range(labels.shape[1] // span):
                        part = slice(c * span, (c + 1) * span)
                        acc.update(f"{key}@chunk{c}", model.logits(hidden[:, part]), labels[:, part])
                if free_running:
                    acc.update(f"{key}@greedy", greedy_regenerate(model, inputs, labels, feed_back=True), labels)
    if info is not None and info.distributed:
        acc.all_reduce()
    pooled = acc.compute()
    results = {}
    for name in objectives:
        for mode in memories:
            key = result_key(name, mode)
            r: dict[str, Any] = dict(pooled[key])
            if f"{key}@greedy" in pooled:
                g = pooled[f"{key}@greedy"]
                r["greedy_accuracy"], r["exact_match"] = g["accuracy"], g["exact_match"]
            r["exact_match_mode"] = (
                "greedy" if (f"{key}@greedy" in pooled or name in ONE_PASS_EXACT) else "teacher_forced"
            )
            if mode != "normal":
                r["objective"], r["memories"] = name, mode
            if per_chunk:
                chunks = sorted(int(k.rsplit("@chunk", 1)[1]) for k in pooled if k.startswith(f"{key}@chunk"))
                r["per_chunk"] = [
                    {"chunk": c, **{m: pooled[f"{key}@chunk{c}"][m] for m in ("ce", "accuracy", "tokens")}}
                    for c in chunks
                ]
            results[key] = r
    return results
