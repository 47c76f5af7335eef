"""The information-retention probe (docs/reference.md §5.3): freeze a model's encoder, train a fresh decoder
to regenerate the encoder's input from its single memory vector, and report how much came through.

A probe is an ordinary autoencoder run whose encoder is frozen (``model.frozen_encoder``): the trainer loads
the source checkpoint's encoder into the probe's :class:`~memtrain.models.ChunkEncoder` and freezes it, so a
probe gets checkpoints, TensorBoard, ``--resume`` and the held-out evaluation of any run. The encoder is

- an autoencoder's or memory model's encoder (memory read where the source reads it, ``memory_position``);
- a causal LM's embedding, stack and final norm (memory at position -2 by default: the last position of a
  causal LM is never trained to predict anything);
- an untrained encoder of the same config (``frozen_encoder.checkpoint: null``): the control.

Reported for the held-out rows: CE, token accuracy, I_e = 1 - CE/ln V and the paper's 1 - CE/H_u, bits per
token, the exact-match rate of whole rows (one decoder pass is greedy regeneration for an autoencoder), and
the information-less baselines: ln V, the uniform-logit CE H_u (the paper's 9.03 at V = 8000), and the CE of
the data's token frequencies (what a decoder that learns nothing from the memory reaches), from which the
information a memory carries is estimated in bits.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrain.config import Config, StackConfig, apply_overrides, config_from_dict, load_config, read_yaml
from memtrain.data.loader import check_compatible, read_shard_info
from memtrain.engine.checkpoint import read_checkpoint
from memtrain.errors import UserError
from memtrain.eval.data import RandomTokens, finished, n_special, retained_bits, run_baseline, shards_with_row_len
from memtrain.eval.report import write_report
from memtrain.tables import markdown_table, num

#: settings of a probe run that the source does not decide (override with --config / --set)
PROBE_DEFAULTS: dict[str, Any] = {
    "model": {"decoder": {"arch": "mixer", "n_layers": 2, "n_heads": 4}},
    "data": {"batch_size": 32},
    "optim": {"lr": 2.0e-3, "warmup_steps": 50, "schedule": "cosine", "grad_clip": 1.0},
    "train": {"steps": 1000, "eval_every": 0, "eval_batches": 16, "ckpt_every": 500, "log_every": 10},
}


@dataclass(frozen=True)
class Source:
    """What is probed. ``checkpoint`` None: the untrained encoder of ``cfg``."""

    where: str  # as the user named it (checkpoint, run directory or config file)
    label: str
    cfg: Config  # the source's run config
    checkpoint: Path | None
    vocab_size: int | None
    tokenizer_sha256: str | None

    @property
    def kind(self) -> str:
        return self.cfg.model.kind

    def untrained(self) -> Source:
        """The control: the same config, freshly initialised."""
        return Source(self.where, f"{self.cfg.run.name} untrained", self.cfg, None, self.vocab_size, None)


def open_source(path: str | Path, untrained: bool = False) -> Source:
    """A run or checkpoint directory (its newest checkpoint), or a YAML run config (an untrained model)."""
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        cfg = load_config(p)
        src = Source(str(p), cfg.run.name, cfg, None, cfg.model.vocab_size, None)
        return src.untrained()
    if not p.exists():
        raise UserError(f"{path}: no such checkpoint, run directory or YAML config")
    ck, cfg, meta = read_checkpoint(p)
    src = Source(str(p), cfg.run.name, cfg, ck, int(meta["vocab_size"]), meta.get("tokenizer_sha256"))
    return src.untrained() if untrained else src


def encoder_spec(src: Source) -> tuple[StackConfig, int, int]:
    """(encoder stack, context length in tokens, default memory position) of what ``src`` can be probed with."""
    m = src.cfg.model
    if m.kind == "clm":
        return m.decoder, m.seq_len, -2
    if m.kind == "memory" and m.no_memory:
        raise UserError(
            f"{src.where}: this memory model was trained with model.no_memory: true and has no encoder to probe"
        )
    return m.encoder, m.chunk_len, m.memory_position


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: ``extra`` wins; neither is modified."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def slug(text: str) -> str:
    """A directory name for a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "probe"


@dataclass
class ProbeSettings:
    """What the `memtrain probe` options choose; None keeps the default (see PROBE_DEFAULTS and the source)."""

    out: str = "runs/probe"
    decoder: str | None = None  # mixer | transformer
    injection: str | None = None  # repeat | unroll (default: repeat for mixers, unroll for transformers)
    length: int | None = None
    memory_position: int | None = None
    steps: int | None = None
    random_tokens: bool = False
    shards: str | None = None
    overlay: str | None = None  # a partial run config (YAML) laid over PROBE_DEFAULTS
    overrides: tuple[str, ...] = ()  # --set a.b=c, applied last
    resume: bool = True


def probe_config(src: Source, s: ProbeSettings, out_dir: str | Path) -> Config:
    """The run config of the probe of ``src``: an autoencoder with ``src``'s encoder, frozen, and a fresh decoder.

    Raises UserError for a source without an encoder, a length beyond its context, a mixer autoencoder or
    memory encoder asked for another length (its memory position is tied to its context), shards made with
    another tokenizer, or any invalid setting.
    """
    stack, context, default_position = encoder_spec(src)
    length = s.length or context
    if length > context:
        raise UserError(
            f"--length {length}: longer than the context of {src.where} ({context} tokens); "
            f"probe at most {context} tokens"
        )
    if length != context and stack.arch == "mixer" and src.kind != "clm":
        raise UserError(
            f"--length {length}: the mixer encoder of the {src.kind} {src.where} reads exactly "
            f"{context} tokens (its memory is the last of them); leave --length out"
        )
    raw = merge(PROBE_DEFAULTS, read_yaml(s.overlay) if s.overlay else {})
    model = raw.setdefault("model", {})
    dec = model.setdefault("decoder", {})
    if s.decoder:
        dec["arch"] = s.decoder
    if dec.get("arch") == "transformer":
        dec["kernel"] = 1
        dec["n_heads"] = dec.get("n_heads") or 4
    dec.setdefault("d_model", stack.d_model)
    if s.injection:
        model["injection"] = s.injection
    model.setdefault("injection", "unroll" if dec.get("arch") == "transformer" else "repeat")
    m = src.cfg.model
    model.update(
        kind="autoencoder",
        chunk_len=length,
        n_chunks=1,
        encoder=stack.model_dump(mode="json"),
        compression=1 if m.kind == "clm" else m.compression,
        final_norm=m.final_norm,
        init=m.init,
        memory_position=s.memory_position if s.memory_position is not None else default_position,
        vocab_size=src.vocab_size,
        tie_embeddings=False,
        kernels=m.kernels,
        frozen_encoder={"checkpoint": None if src.checkpoint is None else str(src.checkpoint)},
    )
    raw["objective"] = {"weights": {"reconstruction": 1.0}}
    raw["curriculum"] = []
    raw["run"] = merge({"seed": 0}, raw.get("run", {}))
    raw["run"].update(name=f"probe {src.label}", out_dir=str(out_dir))
    raw.setdefault("data", {})
    raw["data"].setdefault("shards", s.shards or src.cfg.data.shards)
    raw["data"].setdefault("cache_dir", src.cfg.data.cache_dir)
    if s.shards:
        raw["data"]["shards"] = s.shards
    if s.steps:
        raw.setdefault("train", {})["steps"] = s.steps
    raw = apply_overrides(raw, list(s.overrides))
    shards = str(raw["data"]["shards"])
    info = read_shard_info(shards, raw["data"].get("cache_dir"))
    check_compatible(info, tokenizer_sha256=src.tokenizer_sha256, tokenizer_source=f"the tokenizer of {src.where}")
    if not info.rows("val"):
        raise UserError(
            f"data.shards ({shards}): a probe is measured on held-out rows, and these shards have no validation split"
        )
    raw["data"]["shards"] = shards_with_row_len(shards, length)
    return config_from_dict(raw, source=f"probe config for {src.where}")


def run_probe(src: Source, s: ProbeSettings, out_dir: str | Path) -> dict:
    """Train (or resume, or just read back a finished) probe of ``src`` in ``out_dir``; returns its results."""
    from memtrain.engine.trainer import train

    cfg = probe_config(src, s, out_dir)
    info = read_shard_info(cfg.data.shards, cfg.data.cache_dir)
    transform = RandomTokens(info.vocab_size, n_special(info), seed=cfg.run.seed) if s.random_tokens else None
    metrics = finished(train(cfg, resume=s.resume, batch_transform=transform), out_dir)["eval"]["reconstruction"]

    baseline = run_baseline(cfg, transform)
    m = cfg.model
    return {
        "label": src.label + (" random-tokens" if s.random_tokens else ""),
        "source": src.where,
        "source_kind": src.kind,
        "trained": src.checkpoint is not None,
        "random_tokens": s.random_tokens,
        "length": m.chunk_len,
        "memory_position": m.memory_position,
        "encoder": m.encoder.model_dump(mode="json"),
        "decoder": m.decoder.model_dump(mode="json"),
        "injection": m.injection,
        "steps": cfg.train.steps,
        "run_dir": str(out_dir),
        "vocab_size": info.vocab_size,
        "eval_rows": metrics["rows"],
        "eval_tokens": metrics["tokens"],
        **{k: metrics[k] for k in ("ce", "accuracy", "I_e", "I_e_paper", "bits_per_token", "exact_match")},
        "baseline": baseline,
        **{
            f"retained_{k}": v
            for k, v in retained_bits(metrics["ce"], baseline["information_less_ce"], m.chunk_len).items()
        },
    }


def probe_table(results: list[dict]) -> str:
    """Markdown table, one row per probe."""
    rows = []
    for r in results:
        e = r["encoder"]
        enc = f"{e['arch']} d{e['d_model']} n{e['n_layers']}" + (" (trained)" if r["trained"] else " (untrained)")
        rows.append(
            (
                r["label"],
                enc,
                r["length"],
                num(r["ce"]),
                num(r["accuracy"]),
                num(r["I_e"]),
                num(r["I_e_paper"]),
                num(r["exact_match"]),
                num(r["baseline"]["information_less_ce"]),
                num(r["retained_bits_per_memory"], 0),
            )
        )
    return markdown_table(
        (
            "probe",
            "encoder",
            "tokens",
            "CE",
            "token acc",
            "I_e (ln V)",
            "I_e (paper)",
            "exact match",
            "info-less CE",
            "bits / memory",
        ),
        rows,
    )


def write_probe_report(out: str | Path, results: list[dict], title: str = "Retention probes") -> Path:
    """report.json, report.md, retention.png (token accuracy by probe), ce.png, curves.png in ``out``."""
    from memtrain.eval.plots import bar_chart, training_curves

    out = Path(out)
    labels = [r["label"] for r in results]
    base = results[0]["baseline"] if results else {}
    bar_chart(
        out / "retention.png",
        labels,
        [r["accuracy"] for r in results],
        ylabel="token accuracy",
        title="tokens regenerated from one memory vector",
        reference={"token frequencies": base.get("unigram_accuracy")},
    )
    bar_chart(
        out / "ce.png",
        labels,
        [r["ce"] for r in results],
        ylabel="CE (nats)",
        title="probe CE",
        reference={"ln V": base.get("ln_V"), "token frequencies": base.get("unigram_ce")},
    )
    training_curves(out / "curves.png", {r["label"]: r["run_dir"] for r in results}, title="probe training")
    md = [
        f"# {title}",
        "",
        probe_table(results),
        "",
        "CE in nats on held-out rows; I_e = 1 - CE/ln V, and 1 - CE/H_u with H_u the uniform-logit CE "
        "(the paper's 9.03 at V = 8000); exact match: whole rows regenerated correctly (one greedy pass); "
        "info-less CE: CE of the token frequencies (ln of the value count for random tokens); bits / memory: "
        "(info-less CE - CE) / ln 2 x tokens.",
        "",
        "![retention](retention.png) ![ce](ce.png) ![curves](curves.png)",
    ]
    return write_report(out, {"probes": results}, "\n".join(md))


def probe_all(paths: list[str], s: ProbeSettings, untrained: bool = False, controls: bool = False) -> list[dict]:
    """Probe every source (and, with ``controls``, the untrained encoder of each checkpoint) into
    ``s.out/<label>``, then write the report into ``s.out``. Returns the results."""
    sources = []
    for p in paths:
        src = open_source(p, untrained=untrained)
        sources.append(src)
        if controls and src.checkpoint is not None:
            sources.append(src.untrained())
    suffix = " random-tokens" if s.random_tokens else ""
    results = [run_probe(src, s, Path(s.out) / slug(src.label + suffix)) for src in sources]
    write_probe_report(s.out, results)
    return results
