"""Held-out evaluation of any memtrain model on any of its objectives.

For every objective the task inputs and targets are built exactly as in training; metrics are pooled over
all supervised tokens of all batches (and all ranks): cross-entropy, token accuracy, I_e (both
conventions), bits per token, and the exact-match rate of whole supervised spans. Exact match is greedy
regeneration: one pass is exact for reconstruction and blank copy (the decoder never reads its own
outputs); for causal and copy objectives it is teacher-forced unless ``greedy=True``, which regenerates the
supervised span token by token from the model's own predictions.
"""
from __future__ import annotations

import torch

from memtrain.config import Config
from memtrain.data.loader import make_loader
from memtrain.engine.distributed import DistInfo
from memtrain.metrics import MetricAccumulator, greedy_regenerate
from memtrain.objectives import SpecialTokens, make_task, supervised_loss, task_chunks

#: objectives where one forward pass already is free-running greedy regeneration
ONE_PASS_EXACT = ("reconstruction", "blank_copy")


def eval_objectives(cfg: Config) -> list[str]:
    """Objectives evaluated during training: every objective any stage trains, plus the model's own."""
    names = {n for s in cfg.stages() for n in s.weights.active()}
    names.add("reconstruction" if cfg.model.kind == "autoencoder" else "causal")
    order = ("causal", "copy", "blank_copy", "reconstruction")
    return [n for n in order if n in names]


def take_batches(shards: str, split: str, batch_size: int, n_batches: int, cache_dir: str | None = None,
                 ) -> list[torch.Tensor]:
    """The first ``n_batches`` batches ``torch.long [batch_size, row_len]`` of a split, unshuffled (the same
    every time)."""
    return list(make_loader(shards, split, batch_size=batch_size, shuffle=False, seed=0, num_workers=0,
                            cache_dir=cache_dir, max_batches=n_batches))


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], objectives: list[str], special: SpecialTokens,
             device: torch.device, info: DistInfo | None = None, greedy: bool = False) -> dict[str, dict]:
    """Metrics per objective over ``batches`` ([B, T] token rows). Returns {objective: {metric: value}}.

    ``greedy``: also regenerate causal/copy spans free-running and report exact match from that.
    """
    acc = MetricAccumulator(model.vocab_size)
    n_chunks = task_chunks(model)
    for name in objectives:
        free_running = greedy and name not in ONE_PASS_EXACT
        for ids in batches:
            ids = ids.to(device)
            inputs, targets = make_task(name, ids, special, n_chunks)
            labels = model.align_labels(targets)
            acc.update_from_stats(name, supervised_loss(model, model(inputs), labels))
            if free_running:
                acc.update(f"{name}@greedy", greedy_regenerate(model, inputs, labels, feed_back=True), labels)
    if info is not None and info.distributed:
        acc.all_reduce()
    pooled = acc.compute()
    results = {}
    for name in objectives:
        r = dict(pooled[name])
        if greedy and name not in ONE_PASS_EXACT:
            g = pooled[f"{name}@greedy"]
            r["greedy_accuracy"], r["exact_match"] = g["accuracy"], g["exact_match"]
        r["exact_match_mode"] = "greedy" if (greedy or name in ONE_PASS_EXACT) else "teacher_forced"
        results[name] = r
    return results
