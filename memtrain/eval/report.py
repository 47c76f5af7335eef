"""Loading trained checkpoints for evaluation, and the metric table printed by ``memtrain eval``."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from memtrain.config import config_from_dict
from memtrain.data.loader import check_compatible, read_shard_info
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.distributed import pick_device
from memtrain.errors import UserError
from memtrain.eval.evaluate import evaluate, take_batches
from memtrain.models import build_model
from memtrain.objectives import special_tokens

OBJECTIVES_FOR = {"memory": ["causal", "copy", "blank_copy"], "clm": ["causal", "copy", "blank_copy"],
                  "autoencoder": ["reconstruction"]}


def load_checkpoint_model(path: str | Path, device: torch.device):
    """(model in eval mode, run config, checkpoint meta) from a checkpoint or run directory."""
    ck = ckpt.resolve_checkpoint(path)
    try:
        raw = yaml.safe_load((ck / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{ck / 'config.yaml'}: unreadable run config ({exc})") from None
    cfg = config_from_dict(raw or {}, source=str(ck / "config.yaml"))
    meta = ckpt.read_meta(ck)
    model = build_model(cfg.model, int(meta["vocab_size"]))
    ckpt.load_model_weights(model, ck)
    return model.to(device).eval(), cfg, meta


def evaluate_checkpoints(paths: list[str], shards: str | None = None, split: str = "val", batches: int = 16,
                         batch_size: int | None = None, objectives: list[str] | None = None,
                         greedy: bool = False, device: str = "auto") -> dict[str, dict]:
    """{label: {objective: metrics}} for each checkpoint, on the same held-out batches."""
    dev = pick_device(device)
    out: dict[str, dict] = {}
    for path in paths:
        model, cfg, meta = load_checkpoint_model(path, dev)
        shard_dir = shards or cfg.data.shards
        info = read_shard_info(shard_dir, cfg.data.cache_dir)
        check_compatible(info, row_len=cfg.model.seq_len, tokenizer_sha256=meta.get("tokenizer_sha256"),
                         row_len_source=f"the checkpoint's model.chunk_len x model.n_chunks = "
                                        f"{cfg.model.chunk_len} x {cfg.model.n_chunks}")
        names = objectives or OBJECTIVES_FOR[cfg.model.kind]
        bad = [n for n in names if n not in OBJECTIVES_FOR[cfg.model.kind]]
        if bad:
            raise UserError(f"--objectives: {', '.join(bad)} does not apply to a {cfg.model.kind} model "
                            f"(choose from {', '.join(OBJECTIVES_FOR[cfg.model.kind])})")
        rows = take_batches(shard_dir, split, batch_size or cfg.data.batch_size, batches, cfg.data.cache_dir)
        if not rows:
            raise UserError(f"{shard_dir}: split '{split}' holds no complete batch")
        label = cfg.run.name if cfg.run.name not in out else f"{cfg.run.name} ({path})"
        out[label] = evaluate(model, rows, names, special_tokens(cfg.objective, info.special_ids), dev,
                              greedy=greedy)
    return out


def results_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per (model, objective)."""
    head = ("| model | objective | CE (nats) | token acc | I_e = 1-CE/lnV | I_e (paper, /9.03-style) | "
            "bits/token | exact match |")
    lines = [head, "|" + "---|" * 8]
    for model, per_obj in results.items():
        for name, r in per_obj.items():
            em = f"{r['exact_match']:.3f}" + ("" if r.get("exact_match_mode") == "greedy" else " (tf)")
            lines.append(f"| {model} | {name} | {r['ce']:.3f} | {r['accuracy']:.3f} | {r['I_e']:.3f} | "
                         f"{r['I_e_paper']:.3f} | {r['bits_per_token']:.2f} | {em} |")
    return "\n".join(lines)
