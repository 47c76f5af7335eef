"""`memtrain repro`: the paper's measurements in miniature, from ``yaml/repro/*.yaml`` to ``docs/reproduction.md``.

1. trains every model of the plan (``repro.yaml``) once per seed: a mixer and a transformer autoencoder, a
   mixer and a transformer causal LM over rows of 4 chunks (same widths and depths; the full-context
   baselines of E4), and three memory models: causal only, causal + copy, and the causal-only decoder with no
   memories (E4's control);
2. probes the encoder of each autoencoder and causal LM, and the untrained encoder of each architecture
   (``probe.yaml``: one probe decoder for all), once per seed of the model probed;
3. evaluates the memory models on causal (per chunk position), copy and blank copy, with their own memories,
   zeroed memories and memories shuffled across the batch;
4. E4: the causal-only memory model, its no-memory control and the full-context causal LM on the same
   held-out targets per chunk position, with their training throughput and FLOPs per token;
5. writes ``OUT/report.json``, the reports and plots of every stage, and the reproduction document: measured
   numbers (mean ± sd over seeds) next to the paper's (docs/reference.md §8), and for each of the paper's
   claims whether the miniature agrees (by more than 2 sd).

``corpus``: any parquet / jsonl / txt source instead of the bundled demo corpus; its tokenizer and shards are
made under ``OUT/data`` first. Every run resumes, so an interrupted reproduction continues where it stopped.
``--quick`` runs every stage for a few steps (the test suite's end-to-end check); its document says so.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import time
from pathlib import Path

from memtrain.config import load_config
from memtrain.engine.checkpoint import read_checkpoint
from memtrain.errors import UserError
from memtrain.eval.claims import aggregate, condition_text, copy_claim, e4_claims, pm, probe_claims
from memtrain.eval.data import finished
from memtrain.eval.probe import ProbeSettings, Source, run_probe, slug, write_probe_report
from memtrain.eval.report import evaluate_checkpoints, per_chunk_table, results_table, write_eval_report, write_report
from memtrain.fileio import write_json
from memtrain.shipped import resolve_config_dir
from memtrain.tables import num

#: the roles of the run configs that ``<configs>/repro.yaml`` must name
ROLES = (
    "mixer_ae",
    "transformer_ae",
    "mixer_clm",
    "transformer_clm",
    "memory_causal",
    "memory_combined",
    "memory_none",
)
#: roles the plan may add: the transformer version of E4
OPTIONAL_ROLES = ("transformer_memory_causal", "transformer_memory_none")
#: E4 (docs/reference.md §8.2, §8.7) per architecture: (arch, memory model, its no-memory control, full-context
#: causal LM)
E4 = [
    ("mixer", "memory_causal", "memory_none", "mixer_clm"),
    ("transformer", "transformer_memory_causal", "transformer_memory_none", "transformer_clm"),
]
MANIFEST = "repro.yaml"
#: (row label, model whose encoder is probed, trained?)
PROBES = [
    ("mixer autoencoder", "mixer_ae", True),
    ("mixer causal LM", "mixer_clm", True),
    ("mixer untrained", "mixer_ae", False),
    ("transformer autoencoder", "transformer_ae", True),
    ("transformer causal LM", "transformer_clm", True),
    ("transformer untrained", "transformer_ae", False),
]
#: docs/reference.md §8.3 (mixers) and §8.4 (transformers), blog numbers: (CE, I_e = 1 - CE/9.03, token acc)
PAPER = {
    "mixer autoencoder": (1.528, 0.831, 0.5534),
    "mixer causal LM": (5.815, 0.356, 0.0479),
    "mixer untrained": (5.937, 0.343, 0.0408),
    "transformer autoencoder": (2.935, 0.675, 0.391),
    "transformer causal LM": (6.214, 0.311, 0.0462),
    "transformer untrained": (6.643, 0.264, 0.0409),
}
QUICK = ["train.steps=6", "train.eval_every=0", "train.ckpt_every=0", "train.eval_batches=2", "data.batch_size=8"]
#: the bundled corpus, as the document names it
DEMO_CORPUS = "the bundled demo corpus (Python and PostgreSQL documentation)"
MANIFEST_KEYS = {"models", "probe", "probe_length", "eval_batches", "seeds", "notes", "investigation"}


def read_manifest(cfg_dir: Path) -> dict:
    """``<cfg_dir>/repro.yaml``: ``models`` (a run config per role of :data:`ROLES`, optionally of
    :data:`OPTIONAL_ROLES`), ``probe`` (the probe overlay), optional ``probe_length``, ``eval_batches``,
    ``seeds`` (a number, or ``{default: n, <role>: n}``), ``notes`` and ``investigation`` (text lines for the
    document); every file named must exist."""
    from memtrain.config import read_yaml

    plan = read_yaml(cfg_dir / MANIFEST)
    where = cfg_dir / MANIFEST
    models = plan.get("models")
    if not isinstance(models, dict) or not set(ROLES) <= set(models) or set(models) - set(ROLES + OPTIONAL_ROLES):
        raise UserError(
            f"{where}: 'models' must name a run config for each of {', '.join(ROLES)} "
            f"(and may for {', '.join(OPTIONAL_ROLES)})"
        )
    if not isinstance(plan.get("probe"), str):
        raise UserError(f"{where}: 'probe' must name the probe overlay config")
    for key in ("notes", "investigation"):
        if not all(isinstance(n, str) for n in plan.setdefault(key, []) or []):
            raise UserError(f"{where}: '{key}' must be a list of text lines for the document")
    unknown = set(plan) - MANIFEST_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    missing = [f for f in list(models.values()) + [plan["probe"]] if not (cfg_dir / f).is_file()]
    if missing:
        raise UserError(f"{where}: names config(s) missing from {cfg_dir}: {', '.join(missing)}")
    plan["models"] = {role: models[role] for role in ROLES + OPTIONAL_ROLES if role in models}
    plan["seeds"] = seed_plan(plan.get("seeds", 1), plan["models"], where)
    return plan


def seed_plan(seeds, roles, where) -> dict[str, int]:
    """Seeds per role from the manifest's ``seeds``: a number for every role, or ``{default: n, <role>: n}``."""
    spec = seeds if isinstance(seeds, dict) else {"default": seeds}
    bad = [k for k in spec if k != "default" and k not in roles]
    values = list(spec.values())
    if bad or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise UserError(
            f"{where}: 'seeds' must be a whole number >= 1, or a mapping of 'default' and roles of the plan "
            f"to such numbers" + (f" (unknown role '{bad[0]}')" if bad else "")
        )
    return {role: int(spec.get(role, spec.get("default", 1))) for role in roles}


def device_description() -> str:
    """CPU model, core count, torch version and threads: the device line of the document."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


class Stopwatch:
    """Wall-clock and CPU seconds spent per stage, kept in ``OUT/timings.json`` and added to by every invocation,
    so the time of a reproduction that was interrupted and continued is the sum of its parts (work lost when a
    run is killed between two checkpoints is not counted). CPU seconds are this process's, all threads (every
    run trains in it); on a busy machine they stay what the work costs while wall time grows."""

    def __init__(self, path: Path):
        self.path = path
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        self.stages: dict[str, float] = saved.get("wall", {}) if isinstance(saved.get("wall"), dict) else {}
        self.cpu: dict[str, float] = saved.get("cpu", {}) if isinstance(saved.get("cpu"), dict) else {}
        self._last, self._last_cpu = time.time(), time.process_time()

    def lap(self, name: str) -> None:
        """Add the time since the previous lap to stage ``name`` and save."""
        now, cpu = time.time(), time.process_time()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._last
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._last_cpu
        self._last, self._last_cpu = now, cpu
        write_json(self.path, {"wall": self.stages, "cpu": self.cpu})

    @property
    def total(self) -> float:
        return sum(self.stages.values())


def _say(text: str) -> None:
    print(f"repro: {text}", flush=True)


def ensure_demo_shards(shards: str) -> None:
    """Prepare the bundled demo shards (rows of 32 tokens, vocabulary 4096) when ``shards`` is the default
    location and does not exist yet; any other missing directory is the user's to make."""
    if Path(shards).exists():
        return
    if Path(shards) != Path("data/demo/shards"):
        raise UserError(f"{shards}: shard directory not found; make one with `memtrain data shards`")
    import argparse

    from memtrain.data.cli import cmd_prepare_demo

    _say("preparing the demo shards (memtrain data prepare-demo --out data/demo --vocab-size 4096 --row-len 32)")
    cmd_prepare_demo(
        argparse.Namespace(
            out="data/demo",
            vocab_size=4096,
            row_len=32,
            chunk_len=None,
            chunks=None,
            val_fraction=0.02,
            workers=2,
            no_progress=True,
        )
    )


def prepare_corpus(corpus: str, out_dir: Path, row_len: int, vocab_size: int, val_fraction: float = 0.02) -> str:
    """Tokenizer and shards of ``corpus`` (parquet / jsonl / txt files, a directory or a glob) under
    ``out_dir``: ``tokenizer.model`` (SentencePiece BPE of ``vocab_size``) and ``shards/`` (rows of ``row_len``
    tokens, ``val_fraction`` of the documents held out); made once, and again only when any of these changes.
    Returns the shard directory. Raises UserError for a corpus that is missing or holds no text."""
    from memtrain.data.documents import expand_sources
    from memtrain.data.ingest import INFO_FILE, build_shards
    from memtrain.data.tokenizer import TOKENIZER_FILE, train_tokenizer

    files = expand_sources([corpus])  # UserError for a missing path or no readable file
    stamp = {
        "corpus": [str(f.path.resolve()) for f in files],
        "sizes": [f.path.stat().st_size for f in files],
        "vocab_size": vocab_size,
        "row_len": row_len,
        "val_fraction": val_fraction,
    }
    shards, tok, stamp_path = out_dir / "shards", out_dir / TOKENIZER_FILE, out_dir / "corpus.json"
    try:
        if json.loads(stamp_path.read_text()) == stamp and (shards / INFO_FILE).is_file() and tok.is_file():
            return str(shards)
    except (OSError, ValueError):
        pass
    _say(f"making a {vocab_size}-token tokenizer and shards of {row_len}-token rows from {corpus} in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    train_tokenizer([str(f.path) for f in files], out_dir, vocab_size=vocab_size, threads=2)
    build_shards(
        [str(f.path) for f in files],
        tok,
        shards,
        row_len=row_len,
        val_fraction=val_fraction,
        workers=1,
        overwrite=(shards / INFO_FILE).is_file(),
        progress=False,
    )
    write_json(stamp_path, stamp)
    return str(shards)


def run_dir(out_dir: Path, role: str, seed: int) -> Path:
    """Where seed ``seed`` (0, 1, ...) of role ``role`` trains."""
    return out_dir / "models" / role / f"seed{seed}"


def run_repro(
    out: str = "runs/repro",
    quick: bool = False,
    doc: str | None = None,
    shards: str | None = None,
    configs: str = "yaml/repro",
    overrides: tuple[str, ...] = (),
    command: str = "memtrain repro",
    rewrite_doc: bool = False,
    seeds: int | None = None,
    corpus: str | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.02,
) -> dict:
    """The whole pipeline (see the module docstring). Returns the report also written to ``OUT/report.json``.

    ``seeds``: train (and probe) every model this many times (default: the plan's ``seeds``). ``corpus``: make
    the tokenizer (``vocab_size``) and shards (``val_fraction`` held out) from it, for every run.
    ``rewrite_doc``: run nothing; write the document again from ``OUT/report.json`` (e.g. after a change to
    its layout)."""
    from memtrain.engine.trainer import train

    cfg_dir = resolve_config_dir(configs)  # yaml/repro from a checkout, or the installed copy
    plan = read_manifest(cfg_dir)
    out_dir = Path(out)
    if rewrite_doc:
        return rewrite_document(out_dir, plan, doc)
    if corpus and shards:
        raise UserError("--corpus and --shards: give one (the corpus is made into shards under OUT/data)")
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds: expected a whole number >= 1, got {seeds}")
        plan["seeds"] = {role: seeds for role in plan["models"]}
    sets = (QUICK if quick else []) + list(overrides)
    if corpus:
        row_len = load_config(cfg_dir / plan["models"]["memory_causal"], sets).model.seq_len
        shards = prepare_corpus(corpus, out_dir / "data", row_len, vocab_size, val_fraction)
    if shards:
        sets.append(f"data.shards={shards}")
    watch = Stopwatch(out_dir / "timings.json")

    runs: dict[str, list[Path]] = {}
    for role, name in plan["models"].items():
        runs[role] = []
        for k in range(plan["seeds"][role]):
            run = run_dir(out_dir, role, k)
            cfg = load_config(cfg_dir / name, sets + [f"run.out_dir={run}"])
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + k})})
            ensure_demo_shards(cfg.data.shards)
            _say(f"training {cfg.run.name}, seed {cfg.run.seed} ({cfg_dir / name}, {cfg.train.steps} steps)")
            finished(train(cfg, resume=True), run)
            runs[role].append(run)
            watch.lap("train")

    settings = ProbeSettings(
        out=str(out_dir / "probes"),
        overlay=str(cfg_dir / plan["probe"]),
        shards=shards,
        length=plan.get("probe_length"),
        overrides=tuple((QUICK if quick else []) + list(overrides)),
    )
    probes = []
    for label, role, trained in PROBES:
        per_seed = []
        for k, run in enumerate(runs[role]):
            ck, cfg, meta = read_checkpoint(run)
            src = Source(
                str(run),
                label,
                cfg,
                ck if trained else None,
                int(meta["vocab_size"]),
                meta.get("tokenizer_sha256") if trained else None,
            )
            _say(f"probing {label}, seed {k}")
            seeded = dataclasses.replace(settings, overrides=settings.overrides + (f"run.seed={k}",))
            per_seed.append(run_probe(src, seeded, out_dir / "probes" / slug(label) / f"seed{k}"))
            watch.lap("probe")
        probes.append({**aggregate(per_seed), "seeds": per_seed})
    write_probe_report(out_dir / "probes", probes, title="Retention probes (memtrain repro)")

    batches = 2 if quick else int(plan.get("eval_batches", 16))
    _say("evaluating the memory models (causal per chunk; copy and blank copy with normal, zero, shuffled memories)")
    memory_seeds: dict[str, list[dict]] = {}
    for role in ("memory_causal", "memory_combined"):
        for run in runs[role]:
            for name, result in evaluate_checkpoints(
                [str(run)],
                shards=shards,
                batches=batches,
                objectives=["causal", "copy", "blank_copy"],
                per_chunk=True,
                memories=["normal", "zero", "shuffle"],
            ).items():
                memory_seeds.setdefault(name, []).append(result)
    memory = {name: aggregate(results) for name, results in memory_seeds.items()}
    write_eval_report(out_dir / "memory", memory)
    watch.lap("memory eval")

    e4 = run_e4(out_dir, runs, shards, batches, quick)
    watch.lap("E4")

    report = {
        "quick": quick,
        "command": command,
        "corpus": corpus or (DEMO_CORPUS if not shards else f"the shards in `{shards}`"),
        "models": model_summaries(out_dir, plan),
        "notes": plan["notes"],
        "investigation": plan["investigation"],
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": device_description(),
        "seconds": {**watch.stages, "total": watch.total},
        "cpu_seconds": {**watch.cpu, "total": sum(watch.cpu.values())},
        "configs": str(cfg_dir),
        "steps": {k: load_config(cfg_dir / v, sets).train.steps for k, v in plan["models"].items()},
        "seeds": plan["seeds"],
        "probe_steps": probes[0]["steps"] if probes else None,
        "probes": probes,
        "memory": memory,
        "memory_seeds": memory_seeds,
        "e4": e4,
    }
    report["checks"] = claim_checks(report)
    doc_path = publish(out_dir, report, doc)
    _say(f"done in {watch.total / 60:.1f} min; {doc_path}")
    return report


def run_e4(out_dir: Path, runs: dict[str, list[Path]], shards: str | None, batches: int, quick: bool) -> list[dict]:
    """E4 for each architecture the plan has all three models of: held-out causal CE and accuracy per chunk
    of every seed, training throughput (seed 0's configs, interleaved rounds) and FLOPs per token; writes
    ``OUT/e4/report.json`` and its plots. Returns one entry per architecture."""
    from memtrain.eval.context import causal_by_chunk, throughput
    from memtrain.eval.plots import line_chart, training_curves

    groups = []
    for arch, memory, none, full in E4:
        roles = {"memory": memory, "none": none, "full": full}
        if not all(r in runs for r in roles.values()):
            continue
        _, mem_cfg, _ = read_checkpoint(runs[memory][0])
        L = mem_cfg.model.chunk_len
        _say(f"E4 ({arch}): memory model, no-memory control and full-context causal LM per chunk of {L} tokens")
        models = {}
        for key, role in roles.items():
            _, cfg, meta = read_checkpoint(runs[role][0])
            results = [causal_by_chunk(run, L, batches, shards) for run in runs[role]]
            models[key] = {
                "role": role,
                "label": cfg.run.name,
                "n_params": meta.get("n_params"),
                "steps": cfg.train.steps,
                "seeds": results,
                "mean": aggregate(results),
            }
        speed = throughput(
            {k: runs[role][0] for k, role in roles.items()},
            rounds=1 if quick else 3,
            steps=2 if quick else 8,
            warmup=1 if quick else 2,
        )
        for key in models:
            models[key]["throughput"] = speed[key]
        groups.append({"arch": arch, "chunk_len": L, "models": models, "throughput": speed})
        where = out_dir / "e4"
        line_chart(
            where / f"{arch}-per-chunk.png",
            {
                m["label"]: ([c["chunk"] for c in m["mean"]["per_chunk"]], [c["ce"] for c in m["mean"]["per_chunk"]])
                for m in models.values()
            },
            xlabel="chunk position (= memories read by the memory model)",
            ylabel="held-out causal CE (nats)",
            title=f"E4 ({arch}): next-token CE by chunk position",
        )
        training_curves(
            where / f"{arch}-curves.png",
            {m["label"]: runs[m["role"]][0] for m in models.values()},
            title=f"E4 ({arch}): training loss per step (same targets)",
        )
    if groups:
        write_json(out_dir / "e4" / "report.json", {"e4": groups})
    return groups


def claim_checks(report: dict) -> list[dict]:
    """Each claim of the paper with the measured numbers it rests on and whether the miniature agrees."""
    probes = {p["label"]: [s["accuracy"] for s in p["seeds"]] for p in report["probes"]}
    checks = probe_claims(probes)
    names = list(report["memory_seeds"])
    if len(names) == 2:
        checks.append(copy_claim(*(report["memory_seeds"][n] for n in names)))
    for group in report.get("e4", []):
        checks += e4_claims(group)
    return checks


def publish(out_dir: Path, report: dict, doc: str | None) -> Path:
    """``OUT/report.json`` + ``OUT/report.md`` and the document (``doc``; default docs/reproduction.md, or
    ``OUT/reproduction.md`` for a quick run) with its plots; returns the document's path."""
    write_report(out_dir, report, reproduction_markdown(report, {name: src for src, name in images(report)}))
    path = Path(doc) if doc else (out_dir / "reproduction.md" if report["quick"] else Path("docs/reproduction.md"))
    write_document(path, report, out_dir)
    return path


def model_summaries(out_dir: Path, plan: dict) -> dict[str, dict]:
    """What each trained model reached at its own task, over its seeds: ``{role: {name, kind, n_params, steps,
    seeds, eval}}`` from the runs' ``summary.json`` and newest checkpoint (``eval``: mean and ``_sd``)."""
    out = {}
    for role in plan["models"]:
        evals, first = [], None
        for k in range(plan["seeds"][role]):
            run = run_dir(out_dir, role, k)
            try:
                summary = json.loads((run / "summary.json").read_text())
                _, cfg, meta = read_checkpoint(run)
            except (OSError, ValueError, UserError):
                continue
            evals.append(summary.get("eval", {}))
            first = first or {
                "name": cfg.run.name,
                "kind": cfg.model.kind,
                "n_params": meta.get("n_params"),
                "steps": summary.get("step"),
            }
        if first:
            out[role] = {**first, "seeds": len(evals), "eval": aggregate(evals)}
    return out


def rewrite_document(out_dir: Path, plan: dict, doc: str | None) -> dict:
    """``memtrain repro --rewrite-doc``: the document and ``OUT/report.md`` again from ``OUT/report.json``."""
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{out_dir}/report.json: no finished reproduction there to write the document from") from None
    if "memory_seeds" not in report or "seeds" not in (report.get("probes") or [{}])[0]:
        raise UserError(f"{out_dir}/report.json: written by an older `memtrain repro`; run `memtrain repro` again")
    report["notes"], report["investigation"] = plan["notes"], plan["investigation"]
    report["checks"] = claim_checks(report)
    path = publish(out_dir, report, doc)
    _say(f"{path} written from {out_dir}/report.json")
    return report


# ----------------------------------------------------------------------------------------------------
# The document

IMAGES = [
    ("probes/retention.png", "retention.png"),
    ("probes/curves.png", "probe-curves.png"),
    ("memory/accuracy.png", "memory-accuracy.png"),
    ("memory/per_chunk.png", "memory-per-chunk.png"),
]


def images(report: dict) -> list[tuple[str, str]]:
    """(path under OUT, file name in the document's folder) of every plot the document shows."""
    e4 = [
        (f"e4/{g['arch']}-{kind}.png", f"e4-{g['arch']}-{kind}.png")
        for g in report.get("e4", [])
        for kind in ("per-chunk", "curves")
    ]
    return IMAGES + e4


def _pm(r: dict, key: str, digits: int = 3) -> str:
    """``r[key]`` with ``r[key_sd]`` when there is one: "0.581 ± 0.004"."""
    sd = r.get(f"{key}_sd")
    return num(r.get(key), digits) + (f" ± {num(sd, digits)}" if sd is not None else "")


def _probe_rows(probes: list[dict]) -> str:
    lines = [
        "| encoder probed | params trained | seeds | CE | token acc | I_e (paper: 1-CE/H_u) | exact match | "
        "bits / memory | paper CE | paper I_e | paper token acc |",
        "|" + "---|" * 11,
    ]
    for p in probes:
        ce, ie, acc = PAPER.get(p["label"], (None, None, None))
        lines.append(
            f"| {p['label']} | {'yes' if p['trained'] else 'no'} | {len(p.get('seeds', [p]))} | {_pm(p, 'ce')} | "
            f"{_pm(p, 'accuracy')} | {_pm(p, 'I_e_paper')} | {num(p['exact_match'])} | "
            f"{_pm(p, 'retained_bits_per_memory', 0)} | {num(ce)} | {num(ie)} | {num(acc, 4)} |"
        )
    return "\n".join(lines)


def _own_task_rows(models: dict[str, dict]) -> str:
    lines = ["| model | parameters | steps | seeds | held-out task: CE / token accuracy |", "|---|---|---|---|---|"]
    for m in models.values():
        tasks = "; ".join(f"{name} {_pm(r, 'ce')} / {_pm(r, 'accuracy')}" for name, r in m["eval"].items())
        params = f"{m['n_params'] / 1e6:.2f}M" if m.get("n_params") else "–"
        lines.append(f"| {m['name']} | {params} | {m.get('steps', '–')} | {m.get('seeds', 1)} | {tasks} |")
    return "\n".join(lines)


def _e4_tables(group: dict) -> list[str]:
    """The E4 tables of one architecture: cost and CE per chunk, then accuracy per chunk (mean ± sd)."""
    models = list(group["models"].values())
    n = len(models[0]["mean"]["per_chunk"])
    head = "| model | parameters | seeds | FLOPs / token | training tokens/s | causal CE (row) | " + " | ".join(
        f"CE chunk {c}" for c in range(n)
    )
    lines = [head + " |", "|" + "---|" * (6 + n)]
    for m in models:
        speed = m.get("throughput", {})
        tps = speed.get("tokens_per_s") or []
        lines.append(
            f"| {m['label']} | {m['n_params'] / 1e6:.2f}M | {len(m['seeds'])} | "
            f"{speed.get('flops_per_token', float('nan')) / 1e6:.2f}M | {pm(tps, 0) if tps else '–'} | "
            f"{_pm(m['mean'], 'ce')} | " + " | ".join(_pm(c, "ce") for c in m["mean"]["per_chunk"]) + " |"
        )
    lines += ["", "| model | token accuracy (row) | " + " | ".join(f"chunk {c}" for c in range(n)) + " |"]
    lines.append("|" + "---|" * (2 + n))
    for m in models:
        lines.append(
            f"| {m['label']} | {_pm(m['mean'], 'accuracy')} | "
            + " | ".join(_pm(c, "accuracy") for c in m["mean"]["per_chunk"])
            + " |"
        )
    return lines


def _minutes(seconds: dict[str, float]) -> str:
    """ "33.1 min (train 28.2, probe 4.7, ...)" from {stage: seconds, "total": seconds}."""
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items() if k != "total")
    return f"{seconds['total'] / 60:.1f} min ({parts})"


def _check_lines(checks: list[dict]) -> list[str]:
    lines = []
    for c in checks:
        over = c.get("over", "seed")
        seeds = f"{c['seeds']} {over}{'s' if c['seeds'] != 1 else ''}" if c.get("seeds") else ""
        verdict = "**agrees**" if c["holds"] else "**does not agree**"
        lines.append(f"- {verdict} ({seeds}): {c['claim']}: {c['evidence']}.")
        for cond in c.get("conditions", []):
            lines.append(f"  - margin of {condition_text(cond)}")
    return lines


def _investigation_outcome(report: dict) -> list[str]:
    """What the transformer autoencoder reached in this reproduction, with its settings as they are now: the
    measured end of the investigation."""
    probes = {p["label"]: p for p in report.get("probes", [])}
    own = report.get("models", {}).get("transformer_ae", {})
    ae, clm = probes.get("transformer autoencoder"), probes.get("transformer causal LM")
    if not ae or not clm:
        return []
    reached = (own.get("eval") or {}).get("reconstruction")
    return [
        f"- In this reproduction, with the change: at {own.get('steps', '?')} steps the transformer autoencoder "
        + (
            f"reconstructs its chunks at token accuracy {_pm(reached, 'accuracy')} (CE {_pm(reached, 'ce')}), and "
            if reached
            else ""
        )
        + f"its memory is probed at token accuracy {_pm(ae, 'accuracy')} against the causal LM's "
        f"{_pm(clm, 'accuracy')} (the checks above)."
    ]


def reproduction_markdown(report: dict, images: dict[str, str]) -> str:
    """The reproduction document for ``report``; ``images`` maps the plot names of :func:`images` to paths."""
    probes, memory = report["probes"], report["memory"]
    p0 = probes[0] if probes else {}
    enc, dec = p0.get("encoder", {}), p0.get("decoder", {})
    secs, cpu = report["seconds"], report.get("cpu_seconds")
    seeds = report.get("seeds", {})
    seed_counts = sorted(set(seeds.values())) if seeds else [1]
    corpus = report.get("corpus", DEMO_CORPUS)
    vocab = p0.get("vocab_size", "?")
    lines = [
        "# Reproduction in miniature",
        "",
        (
            "**Quick run: a few training steps per stage, a check that the pipeline works. The numbers below mean "
            "nothing.**\n"
            if report["quick"]
            else None
        ),
        f"Produced by `{report['command']}` on {report['date']} (configs: `{report['configs']}`), in "
        f"{_minutes(secs)} wall-clock" + (f" and {_minutes(cpu)} of CPU time (all threads)" if cpu else "") + ".",
        f"Device: {report['device']}.",
        "",
        "The paper's numbers (docs/reference.md §8, from the author's blog; FineWeb-edu, 8k tokenizer, "
        "512-token contexts, d_model 1024 mixers / 512 transformers, 200k steps) are next to ours "
        f"({corpus}, {vocab}-token tokenizer, {p0.get('length', '?')}-token contexts, "
        f"d_model {enc.get('d_model', '?')}, {report['steps'].get('mixer_ae', '?')} training steps for the "
        f"autoencoders, {report['steps'].get('memory_causal', '?')} for the causal LMs and memory models, "
        f"{report.get('probe_steps', '?')} probe steps). Compare orderings and ratios, not values.",
        "",
        "Seeds: "
        + ", ".join(f"{role} {n}" for role, n in seeds.items())
        + " (seed k trains with `run.seed` + k; its probe also uses seed k). Numbers are mean ± sample standard "
        "deviation over the seeds; a number without ± comes from one seed.",
        "",
        "## Checks of the paper's claims",
        "",
        "A claim agrees when each of its conditions holds with a margin larger than two standard deviations of "
        "that margin over the seeds (margins are computed seed by seed; a model trained once is paired with "
        "every seed of the others). With one seed the sign of the margin alone decides. A throughput's margin "
        "is computed per timing round instead (the models timed in turn in each round), and its spread is over "
        "the rounds.",
        "",
        *_check_lines(report["checks"]),
    ]
    for g in report.get("e4", []):
        m, arch = g["models"], g["arch"]
        lines += [
            "",
            f"## E4 ({g['arch']}): memory model vs no memory vs full context",
            "",
            "The paper's E4 (docs/reference.md §8.2, §8.7) in miniature: rows of "
            f"{len(m['memory']['mean']['per_chunk'])} chunks of {g['chunk_len']} tokens. *{m['memory']['label']}*: "
            f"the memory model trained on next-token prediction only; *{m['none']['label']}*: the same decoder "
            f"with every memory slot zero (no encoder); *{m['full']['label']}*: a causal LM over the whole row. "
            f"All three at {m['memory']['steps']} steps and scored on the same held-out targets (every token of "
            "the row but the first), grouped by the chunk of the target token. Training tokens/s: the same "
            "training batch, timed in interleaved rounds on this machine (mean ± sd over rounds); FLOPs per "
            "token: the analytic count of the training log (forward + backward).",
            "",
            *_e4_tables(g),
            "",
            f"![E4 per chunk]({images[f'e4-{arch}-per-chunk.png']}) ![E4 training]({images[f'e4-{arch}-curves.png']})",
        ]
    lines += [
        "",
        "## What each model learned at its own task",
        "",
        _own_task_rows(report.get("models", {})),
        "",
        "## Information retention: probes of single memory vectors",
        "",
        f"Every encoder is frozen and read at its memory position (last token; second to last for causal LMs); "
        f"one fresh probe decoder ({dec.get('arch', '?')} d{dec.get('d_model', '?')} n{dec.get('n_layers', '?')}, "
        f"{p0.get('injection', '?')} injection) is trained to regenerate all {p0.get('length', '?')} input tokens "
        f"from it. Information-less baseline (CE of the token frequencies): "
        f"{num(p0.get('baseline', {}).get('unigram_ce'))} nats, token accuracy "
        f"{num(p0.get('baseline', {}).get('unigram_accuracy'))}; ln V = {num(p0.get('baseline', {}).get('ln_V'))}.",
        "",
        _probe_rows(probes),
        "",
        f"![retention]({images['retention.png']}) ![probe training]({images['probe-curves.png']})",
        "",
        "## Memory models: copy, blank copy and what the memories carry",
        "",
        "Held-out rows of 4 chunks. *copy*: the second half repeats the first; *blank copy*: its tokens are also "
        "hidden from the decoder, so only memories can carry them. *memories zero / shuffle*: the decoder is given "
        "all-zero memories, or the memories of another row of the batch.",
        "",
        results_table(memory),
        "",
        "Token accuracy (CE) by chunk position (chunk c reads c memories). Chunk 0 scores L - 1 tokens (the row's "
        "first token has no context); every later chunk also scores its first token, which only its memories "
        "can predict, so chunks 1-3 sit below chunk 0 unless the memories carry that token:",
        "",
        per_chunk_table({m: {k: r for k, r in per.items() if k.startswith("causal")} for m, per in memory.items()}),
        "",
        f"![memory accuracy]({images['memory-accuracy.png']}) ![per chunk]({images['memory-per-chunk.png']})",
    ]
    if report.get("investigation"):
        lines += ["", "## The transformer autoencoder's plateau", ""] + [f"- {n}" for n in report["investigation"]]
        lines += _investigation_outcome(report)
    lines += [
        "",
        "## Where the miniature differs from the paper",
        "",
        "- Scale: models of about a million parameters trained for minutes on a CPU, against 13-26B tokens on "
        "GPUs. Absolute accuracies are not comparable. The paper's mixer memories had 2 dimensions per "
        f"regenerated token (1024 / 512); ours have {enc.get('d_model', 0) / max(p0.get('length', 1), 1):g} "
        f"({enc.get('d_model', '?')} / {p0.get('length', '?')}), an easier compression but far less training.",
        f"- Data: {corpus}, with a {vocab}-token tokenizer, not FineWeb-edu with 8000 tokens. The "
        "paper-convention I_e divides by H_u = ln V + 0.041 for our V.",
        "- One probe decoder for every encoder (the paper used Llama-style decoders for its LLM probes).",
        "- The paper's copy and E4 results are from 4 x 256-token chunks and 100k+ steps; ours are 4 x 8 tokens, "
        "so a memory slot is one position in 12 of the memory decoder's context (1 in 260 in the paper).",
        f"- Seeds: {' to '.join(str(n) for n in seed_counts)} per model (`--seeds N` trains every model N times).",
    ]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(line for line in lines if line is not None)


def write_document(path: Path, report: dict, out_dir: Path) -> None:
    """Write the document to ``path`` and copy its plots into ``<path stem>/`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = path.parent / path.stem
    image_dir.mkdir(parents=True, exist_ok=True)
    for src, name in images(report):
        if (out_dir / src).is_file():
            shutil.copyfile(out_dir / src, image_dir / name)
    path.write_text(reproduction_markdown(report, {name: f"{path.stem}/{name}" for _, name in images(report)}) + "\n")
