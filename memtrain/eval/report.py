"""Loading trained checkpoints for evaluation, and the metric table printed by ``memtrain eval``."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import yaml

from memtrain.config import Config, config_from_dict
from memtrain.data.loader import check_compatible, read_shard_info
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.distributed import pick_device
from memtrain.errors import UserError
from memtrain.eval.evaluate import MEMORY_MODES, evaluate, take_batches
from memtrain.fileio import write_json
from memtrain.models import build_model
from memtrain.objectives import special_tokens

OBJECTIVES_FOR = {"memory": ["causal", "copy", "blank_copy"], "clm": ["causal", "copy", "blank_copy"],
                  "autoencoder": ["reconstruction"]}


def read_checkpoint(path: str | Path) -> tuple[Path, Config, dict]:
    """(checkpoint directory, its run config, its meta.json) from a checkpoint or run directory."""
    ck = ckpt.resolve_checkpoint(path)
    try:
        raw = yaml.safe_load((ck / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{ck / 'config.yaml'}: unreadable run config ({exc})") from None
    cfg = config_from_dict(raw or {}, source=str(ck / "config.yaml"))
    return ck, cfg, ckpt.read_meta(ck)


def load_checkpoint_model(path: str | Path, device: torch.device):
    """(model in eval mode, run config, checkpoint meta) from a checkpoint or run directory."""
    ck, cfg, meta = read_checkpoint(path)
    model = build_model(cfg.model, int(meta["vocab_size"]))
    ckpt.load_model_weights(model, ck)
    return model.to(device).eval(), cfg, meta


def evaluate_checkpoints(paths: list[str], shards: str | None = None, split: str = "val", batches: int = 16,
                         batch_size: int | None = None, objectives: list[str] | None = None,
                         greedy: bool = False, device: str = "auto", per_chunk: bool = False,
                         memories: list[str] | None = None) -> dict[str, dict]:
    """{label: {result key: metrics}} for each checkpoint, on the same held-out batches (see
    :func:`memtrain.eval.evaluate.evaluate` for ``per_chunk`` and the ``memories`` modes)."""
    memories = list(memories or ["normal"])
    unknown = [m for m in memories if m not in MEMORY_MODES]
    if unknown:
        raise UserError(f"--memories: unknown mode {unknown[0]!r}; choose from {', '.join(MEMORY_MODES)}")
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
        if memories != ["normal"] and (cfg.model.kind == "clm" or cfg.model.no_memory):
            raise UserError(f"--memories {','.join(memories)}: {path} is a "
                            f"{'causal LM' if cfg.model.kind == 'clm' else 'memory model without memories'}; "
                            "only models with an encoder have memories to zero or shuffle")
        rows = take_batches(shard_dir, split, batch_size or cfg.data.batch_size, batches, cfg.data.cache_dir)
        if not rows:
            raise UserError(f"{shard_dir}: split '{split}' holds no complete batch")
        if "shuffle" in memories and rows[0].shape[0] < 2:
            raise UserError("--memories shuffle: batches of one row cannot swap memories; use --batch-size 2 or more")
        label = cfg.run.name if cfg.run.name not in out else f"{cfg.run.name} ({path})"
        out[label] = evaluate(model, rows, names, special_tokens(cfg.objective, info.special_ids), dev,
                              greedy=greedy, per_chunk=per_chunk, memories=memories)
    return out


def results_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per (model, objective)."""
    head = ("| model | objective | CE (nats) | token acc | I_e = 1-CE/lnV | I_e (paper, /9.03-style) | "
            "bits/token | exact match |")
    lines = [head, "|" + "---|" * 8]
    for model, per_obj in results.items():
        for name, r in per_obj.items():
            em = num(r["exact_match"]) + ("" if r.get("exact_match_mode") == "greedy" else " (tf)")
            lines.append(f"| {model} | {name} | {num(r['ce'])} | {num(r['accuracy'])} | {num(r['I_e'])} | "
                         f"{num(r['I_e_paper'])} | {num(r['bits_per_token'], 2)} | {em} |")
    return "\n".join(lines)


def per_chunk_table(results: dict[str, dict]) -> str:
    """A markdown table of token accuracy (CE) per chunk position, one row per (model, objective); empty if no
    result has ``per_chunk``."""
    rows = [(m, k, r["per_chunk"]) for m, per in results.items() for k, r in per.items() if r.get("per_chunk")]
    if not rows:
        return ""
    n = max(len(chunks) for _, _, chunks in rows)
    lines = ["| model | objective | " + " | ".join(f"chunk {c}" for c in range(n)) + " |", "|" + "---|" * (n + 2)]
    for model, key, chunks in rows:
        cells = [f"{num(c['accuracy'])} ({num(c['ce'], 2)})" for c in chunks] + [""] * (n - len(chunks))
        lines.append(f"| {model} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_memory_variant(key: str) -> tuple[str, str]:
    """A result key -> (objective, memories given): "copy (memories zero)" -> ("copy", "zero"), "copy" ->
    ("copy", "normal")."""
    m = re.fullmatch(r"(.+) \(memories (\w+)\)", key)
    return (m.group(1), m.group(2)) if m else (key, "normal")


def accuracy_groups(results: dict[str, dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Token accuracies of ``results`` ({model: {key: metrics}}) for a grouped bar chart: one group per (model,
    objective), one series per memory variant, so "copy", "copy (memories zero)" and "copy (memories shuffle)"
    stand side by side. Returns (group labels, {variant: accuracy per group, NaN where not measured})."""
    cells: dict[tuple[str, str], float] = {}
    groups: list[str] = []
    variants: list[str] = []
    for model, per in results.items():
        for key, r in per.items():
            objective, variant = split_memory_variant(key)
            group = f"{model}: {objective}"
            groups += [group] if group not in groups else []
            variants += [variant] if variant not in variants else []
            cells[group, variant] = r["accuracy"]
    series = {("memories " + v if len(variants) > 1 else "token accuracy"): [cells.get((g, v), math.nan) for g in groups]
              for v in variants}
    return groups, series


def write_eval_report(out_dir: str | Path, results: dict[str, dict]) -> Path:
    """``memtrain eval --out``: report.json, report.md (the tables), accuracy.png (token accuracy of every
    (model, objective)), per_chunk.png (accuracy by chunk position, when measured)."""
    from memtrain.eval.plots import grouped_bar_chart, panel_lines

    out = Path(out_dir)
    groups, series = accuracy_groups(results)
    grouped_bar_chart(out / "accuracy.png", groups, series, ylabel="token accuracy",
                      title="held-out token accuracy" + (" by memories given to the decoder" if len(series) > 1 else ""))
    md = ["# Evaluation", "", results_table(results), ""]
    chunk_md = per_chunk_table(results)
    if chunk_md:
        panels: dict[str, dict[str, dict[str, tuple]]] = {}
        for m, per in results.items():
            for k, r in per.items():
                if r.get("per_chunk"):
                    objective, variant = split_memory_variant(k)
                    panels.setdefault(m, {}).setdefault(objective, {})[f"memories {variant}"] = (
                        [c["chunk"] for c in r["per_chunk"]], [c["accuracy"] for c in r["per_chunk"]])
        panel_lines(out / "per_chunk.png", panels, xlabel="chunk position (= memories read)",
                    ylabel="token accuracy", title="accuracy by chunk position")
        md += ["Token accuracy (CE) by chunk position:", "", chunk_md, "", "![per chunk](per_chunk.png)"]
    md += ["![accuracy](accuracy.png)"]
    return write_report(out, {"results": results}, "\n".join(md))


# ----------------------------------------------------------------------------------------------------
# Report files

def _json_safe(value):
    """NaN and infinities -> None (JSON has no NaN), recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: str | Path, payload: dict, markdown: str) -> Path:
    """Write ``report.json`` (``payload``; NaN as null) and ``report.md`` (``markdown``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", _json_safe(payload))
    (out / "report.md").write_text(markdown.rstrip() + "\n")
    return out


def num(value, digits: int = 3) -> str:
    """A number for a markdown table: fixed digits, '–' for None or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"
