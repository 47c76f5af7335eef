"""The paper's experiment E4 in miniature (docs/reference.md §8): a memory model, its no-memory control and a
full-context causal LM over the same rows of C chunks, compared per chunk position and per token of compute.

Every model is scored on the same held-out rows and the same targets: token j of chunk c for every (c, j)
except the row's first token (which has no context). A causal LM's hidden state t predicts token t + 1, a
memory model's predicts token t, so the chunk a prediction belongs to is the chunk of its *target*
(``model.label_shift`` tells which). Shapes: B rows, T = C·L tokens per row, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memtrain.data.loader import read_shard_info
from memtrain.devices import pick_device
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.timing import run_variant
from memtrain.errors import UserError
from memtrain.evaluation import take_batches
from memtrain.flops import flops_per_token
from memtrain.metrics import MetricAccumulator
from memtrain.objectives import make_task, special_tokens, task_chunks


def causal_by_chunk(
    run: str | Path, chunk_len: int, batches: int, shards: str | None = None, device: str = "auto"
) -> dict:
    """Held-out next-token CE and accuracy of the model in ``run`` over whole rows and per chunk of
    ``chunk_len`` target tokens: ``{ce, accuracy, tokens, per_chunk: [{chunk, ce, accuracy, tokens}]}``.

    The first ``batches`` validation batches of ``shards`` (default: the run's) are scored; the row length must
    be a whole number of chunks."""
    dev = pick_device(device)
    model, cfg, _ = ckpt.load_model(run, dev)
    shard_dir = shards or cfg.data.shards
    info = read_shard_info(shard_dir, cfg.data.cache_dir)
    rows = take_batches(shard_dir, "val", cfg.data.batch_size, batches, cfg.data.cache_dir)
    if not rows:
        raise UserError(f"{shard_dir}: the validation split holds no complete batch")
    T = rows[0].shape[1]
    if T % chunk_len:
        raise UserError(f"{shard_dir}: rows of {T} tokens are not whole chunks of {chunk_len}")
    special = special_tokens(cfg.objective, info.special_ids)
    shift = model.label_shift
    acc = MetricAccumulator(model.vocab_size)
    with torch.no_grad():
        for ids in rows:
            inputs, targets = make_task("causal", ids.to(dev), special, task_chunks(model))
            labels = model.align_labels(targets)  # labels[:, t] is target t + shift
            hidden = model(inputs)
            acc.update("row", model.logits(hidden), labels)
            for c in range(T // chunk_len):
                part = slice(max(c * chunk_len - shift, 0), (c + 1) * chunk_len - shift)
                acc.update(f"chunk{c}", model.logits(hidden[:, part]), labels[:, part])
    pooled = acc.compute()
    keys = ("ce", "accuracy", "tokens")
    return {
        **{k: pooled["row"][k] for k in keys},
        "per_chunk": [{"chunk": c, **{k: pooled[f"chunk{c}"][k] for k in keys}} for c in range(T // chunk_len)],
    }


def throughput(runs: dict[str, str | Path], rounds: int = 3, steps: int = 8, warmup: int = 2) -> dict[str, dict]:
    """Training speed of each run's model config on one of its own training batches: ``{label: {tokens_per_s:
    [one per round], flops_per_token}}``.

    Each round times ``steps`` optimizer steps (after ``warmup`` untimed ones) of every model in turn, so the
    models share whatever else the machine is doing; the spread over rounds is the measurement's noise.
    FLOPs per token are the analytic count of :func:`memtrain.flops.flops_per_token` (the training log's)."""
    dev = pick_device("auto")
    setups = {}
    for label, run in runs.items():
        _, cfg, meta = ckpt.read_checkpoint(run)
        vocab = int(meta["vocab_size"])
        ids = take_batches(cfg.data.shards, "train", cfg.data.batch_size, 1, cfg.data.cache_dir)[0].to(dev)
        setups[label] = (cfg, vocab, ids)
    out = {
        label: {"tokens_per_s": [], "flops_per_token": flops_per_token(cfg, vocab)}
        for label, (cfg, vocab, _) in setups.items()
    }
    for _ in range(rounds):
        for label, (cfg, vocab, ids) in setups.items():
            row = run_variant(cfg, "torch", ids, vocab, steps, warmup, cfg.train.precision, dev)
            out[label]["tokens_per_s"].append(row["tokens_per_s"])
    return out
