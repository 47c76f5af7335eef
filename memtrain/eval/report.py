"""Loading trained checkpoints for evaluation, and the metric table printed by ``memtrain eval``."""

from __future__ import annotations

import math
import re
from pathlib import Path

from memtrain.data.loader import check_compatible, read_shard_info
from memtrain.devices import pick_device
from memtrain.engine import checkpoint as ckpt
from memtrain.errors import UserError
from memtrain.evaluation import MEMORY_MODES, evaluate, take_batches
from memtrain.fileio import write_json
from memtrain.kinds import KINDS
from memtrain.objectives import special_tokens
from memtrain.tables import markdown_table, num


def evaluate_checkpoints(
    paths: list[str],
    shards: str | None = None,
    split: str = "val",
    batches: int = 16,
    batch_size: int | None = None,
    objectives: list[str] | None = None,
    greedy: bool = False,
    device: str = "auto",
    per_chunk: bool = False,
    memories: list[str] | None = None,
) -> dict[str, dict]:
    """{label: {result key: metrics}} for each checkpoint, on the same held-out batches (see
    :func:`memtrain.evaluation.evaluate` for ``per_chunk`` and the ``memories`` modes)."""
    memories = list(memories or ["normal"])
    unknown = [m for m in memories if m not in MEMORY_MODES]
    if unknown:
        raise UserError(f"--memories: unknown mode {unknown[0]!r}; choose from {', '.join(MEMORY_MODES)}")
    dev = pick_device(device)
    out: dict[str, dict] = {}
    for path in paths:
        model, cfg, meta = ckpt.load_model(path, dev)
        shard_dir = shards or cfg.data.shards
        info = read_shard_info(shard_dir, cfg.data.cache_dir)
        check_compatible(
            info,
            row_len=cfg.model.seq_len,
            tokenizer_sha256=meta.get("tokenizer_sha256"),
            row_len_source=f"the checkpoint's model.chunk_len x model.n_chunks = "
            f"{cfg.model.chunk_len} x {cfg.model.n_chunks}",
        )
        spec = KINDS[cfg.model.kind]
        names = objectives or list(spec.objectives)
        bad = [n for n in names if n not in spec.objectives]
        if bad:
            raise UserError(
                f"--objectives: {', '.join(bad)} does not apply to a {cfg.model.kind} model "
                f"(choose from {', '.join(spec.objectives)})"
            )
        if memories != ["normal"] and (not spec.has_encoder or cfg.model.no_memory):
            raise UserError(
                f"--memories {','.join(memories)}: {path} is a "
                f"{'causal LM' if cfg.model.kind == 'clm' else 'memory model without memories'}; "
                "only models with an encoder have memories to zero or shuffle"
            )
        rows = take_batches(shard_dir, split, batch_size or cfg.data.batch_size, batches, cfg.data.cache_dir)
        if not rows:
            raise UserError(f"{shard_dir}: split '{split}' holds no complete batch")
        if "shuffle" in memories and rows[0].shape[0] < 2:
            raise UserError("--memories shuffle: batches of one row cannot swap memories; use --batch-size 2 or more")
        label = cfg.run.name if cfg.run.name not in out else f"{cfg.run.name} ({path})"
        out[label] = evaluate(
            model,
            rows,
            names,
            special_tokens(cfg.objective, info.special_ids),
            dev,
            greedy=greedy,
            per_chunk=per_chunk,
            memories=memories,
        )
    return out


def results_table(results: dict[str, dict]) -> str:
    """A markdown table: one row per (model, objective)."""
    rows = [
        (
            model,
            name,
            num(r["ce"]),
            num(r["accuracy"]),
            num(r["I_e"]),
            num(r["I_e_paper"]),
            num(r["bits_per_token"], 2),
            num(r["exact_match"]) + ("" if r.get("exact_match_mode") == "greedy" else " (tf)"),
        )
        for model, per_obj in results.items()
        for name, r in per_obj.items()
    ]
    return markdown_table(
        (
            "model",
            "objective",
            "CE (nats)",
            "token acc",
            "I_e = 1-CE/lnV",
            "I_e (paper, /9.03-style)",
            "bits/token",
            "exact match",
        ),
        rows,
    )


def per_chunk_table(results: dict[str, dict]) -> str:
    """A markdown table of token accuracy (CE) per chunk position, one row per (model, objective); empty if no
    result has ``per_chunk``."""
    found = [(m, k, r["per_chunk"]) for m, per in results.items() for k, r in per.items() if r.get("per_chunk")]
    if not found:
        return ""
    n = max(len(chunks) for _, _, chunks in found)
    rows = [
        (model, key, *[f"{num(c['accuracy'])} ({num(c['ce'], 2)})" for c in chunks], *[""] * (n - len(chunks)))
        for model, key, chunks in found
    ]
    return markdown_table(("model", "objective", *[f"chunk {c}" for c in range(n)]), rows)


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
    series = {
        ("memories " + v if len(variants) > 1 else "token accuracy"): [cells.get((g, v), math.nan) for g in groups]
        for v in variants
    }
    return groups, series


def write_eval_report(out_dir: str | Path, results: dict[str, dict]) -> Path:
    """``memtrain eval --out``: report.json, report.md (the tables), accuracy.png (token accuracy of every
    (model, objective)), per_chunk.png (accuracy by chunk position, when measured)."""
    from memtrain.eval.plots import grouped_bar_chart, panel_lines

    out = Path(out_dir)
    groups, series = accuracy_groups(results)
    grouped_bar_chart(
        out / "accuracy.png",
        groups,
        series,
        ylabel="token accuracy",
        title="held-out token accuracy" + (" by memories given to the decoder" if len(series) > 1 else ""),
    )
    md = ["# Evaluation", "", results_table(results), ""]
    chunk_md = per_chunk_table(results)
    if chunk_md:
        panels: dict[str, dict[str, dict[str, tuple]]] = {}
        for m, per in results.items():
            for k, r in per.items():
                if r.get("per_chunk"):
                    objective, variant = split_memory_variant(k)
                    panels.setdefault(m, {}).setdefault(objective, {})[f"memories {variant}"] = (
                        [c["chunk"] for c in r["per_chunk"]],
                        [c["accuracy"] for c in r["per_chunk"]],
                    )
        panel_lines(
            out / "per_chunk.png",
            panels,
            xlabel="chunk position (= memories read)",
            ylabel="token accuracy",
            title="accuracy by chunk position",
        )
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
