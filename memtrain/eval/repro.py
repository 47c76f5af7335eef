"""`memtrain repro`: the paper's measurements in miniature, from ``yaml/repro/*.yaml`` to ``docs/reproduction.md``.

1. trains a mixer and a transformer autoencoder, a mixer and a transformer causal LM (same widths and
   depths), and two memory models: causal only, and causal + copy;
2. probes the encoder of each autoencoder and causal LM, and the untrained encoder of each architecture
   (``probe.yaml``: one probe decoder for all);
3. evaluates the memory models on causal (per chunk position), copy and blank copy, with their own memories,
   zeroed memories and memories shuffled across the batch;
4. writes ``OUT/report.json``, the reports and plots of every stage, and the reproduction document: measured
   numbers next to the paper's (docs/reference.md §8), and for each of the paper's claims whether the
   miniature agrees.

Every run resumes, so an interrupted reproduction continues where it stopped. ``--quick`` runs every stage
for a few steps (the test suite's end-to-end check); its document says so.
"""

from __future__ import annotations

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
from memtrain.eval.data import finished
from memtrain.eval.probe import ProbeSettings, Source, run_probe, write_probe_report
from memtrain.eval.report import evaluate_checkpoints, per_chunk_table, results_table, write_eval_report, write_report
from memtrain.fileio import write_json
from memtrain.shipped import resolve_config_dir
from memtrain.tables import num

#: the roles of the run configs that ``<configs>/repro.yaml`` names
ROLES = ("mixer_ae", "transformer_ae", "mixer_clm", "transformer_clm", "memory_causal", "memory_combined")
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


def read_manifest(cfg_dir: Path) -> dict:
    """``<cfg_dir>/repro.yaml``: ``models`` (a run config per role of :data:`ROLES`), ``probe`` (the probe
    overlay), optional ``probe_length`` and ``eval_batches``; every file named must exist."""
    from memtrain.config import read_yaml

    plan = read_yaml(cfg_dir / MANIFEST)
    models = plan.get("models")
    if not isinstance(models, dict) or sorted(models) != sorted(ROLES):
        raise UserError(f"{cfg_dir / MANIFEST}: 'models' must name a run config for each of {', '.join(ROLES)}")
    if not isinstance(plan.get("probe"), str):
        raise UserError(f"{cfg_dir / MANIFEST}: 'probe' must name the probe overlay config")
    if not all(isinstance(n, str) for n in plan.setdefault("notes", []) or []):
        raise UserError(f"{cfg_dir / MANIFEST}: 'notes' must be a list of text lines for the document")
    unknown = set(plan) - {"models", "probe", "probe_length", "eval_batches", "notes"}
    if unknown:
        raise UserError(f"{cfg_dir / MANIFEST}: unknown key '{sorted(unknown)[0]}'")
    missing = [f for f in list(models.values()) + [plan["probe"]] if not (cfg_dir / f).is_file()]
    if missing:
        raise UserError(f"{cfg_dir / MANIFEST}: names config(s) missing from {cfg_dir}: {', '.join(missing)}")
    plan["models"] = {role: models[role] for role in ROLES}
    return plan


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
    """Seconds spent per stage, kept in ``OUT/timings.json`` and added to by every invocation, so the time of a
    reproduction that was interrupted and continued is the sum of its parts (work lost when a run is killed
    between two checkpoints is not counted)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.stages: dict[str, float] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.stages = {}
        self._last = time.time()

    def lap(self, name: str) -> None:
        """Add the time since the previous lap to stage ``name`` and save."""
        now = time.time()
        self.stages[name] = self.stages.get(name, 0.0) + now - self._last
        self._last = now
        write_json(self.path, self.stages)

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


def run_repro(
    out: str = "runs/repro",
    quick: bool = False,
    doc: str | None = None,
    shards: str | None = None,
    configs: str = "yaml/repro",
    overrides: tuple[str, ...] = (),
    command: str = "memtrain repro",
    rewrite_doc: bool = False,
) -> dict:
    """The whole pipeline (see the module docstring). Returns the report also written to ``OUT/report.json``.

    ``rewrite_doc``: run nothing; write the document again from ``OUT/report.json`` (e.g. after a change to
    its layout)."""
    from memtrain.engine.trainer import train

    cfg_dir = resolve_config_dir(configs)  # yaml/repro from a checkout, or the installed copy
    plan = read_manifest(cfg_dir)
    out_dir = Path(out)
    if rewrite_doc:
        return rewrite_document(out_dir, plan, doc)
    sets = (QUICK if quick else []) + list(overrides)
    if shards:
        sets.append(f"data.shards={shards}")
    watch = Stopwatch(out_dir / "timings.json")

    runs: dict[str, Path] = {}
    for key, name in plan["models"].items():
        run = out_dir / "models" / key
        cfg = load_config(cfg_dir / name, sets + [f"run.out_dir={run}"])
        ensure_demo_shards(cfg.data.shards)
        _say(f"training {cfg.run.name} ({cfg_dir / name}, {cfg.train.steps} steps)")
        finished(train(cfg, resume=True), run)
        runs[key] = run
        watch.lap("train")

    probe_sets = tuple((QUICK if quick else []) + list(overrides))
    settings = ProbeSettings(
        out=str(out_dir / "probes"),
        overlay=str(cfg_dir / plan["probe"]),
        shards=shards,
        length=plan.get("probe_length"),
        overrides=probe_sets,
    )
    probes = []
    for label, key, trained in PROBES:
        ck, cfg, meta = read_checkpoint(runs[key])
        src = Source(
            str(runs[key]),
            label,
            cfg,
            ck if trained else None,
            int(meta["vocab_size"]),
            meta.get("tokenizer_sha256") if trained else None,
        )
        _say(f"probing {label}")
        probes.append(run_probe(src, settings, out_dir / "probes" / label.replace(" ", "-")))
        watch.lap("probe")
    write_probe_report(out_dir / "probes", probes, title="Retention probes (memtrain repro)")

    _say("evaluating the memory models (causal per chunk; copy and blank copy with normal, zero, shuffled memories)")
    memory = evaluate_checkpoints(
        [str(runs["memory_causal"]), str(runs["memory_combined"])],
        shards=shards,
        batches=2 if quick else int(plan.get("eval_batches", 16)),
        objectives=["causal", "copy", "blank_copy"],
        per_chunk=True,
        memories=["normal", "zero", "shuffle"],
    )
    write_eval_report(out_dir / "memory", memory)
    watch.lap("memory eval")

    report = {
        "quick": quick,
        "command": command,
        "models": model_summaries(out_dir, plan),
        "notes": plan["notes"],
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": device_description(),
        "seconds": {**watch.stages, "total": watch.total},
        "configs": str(cfg_dir),
        "steps": {k: load_config(cfg_dir / v, sets).train.steps for k, v in plan["models"].items()},
        "probe_steps": probes[0]["steps"] if probes else None,
        "probes": probes,
        "memory": memory,
        "checks": claim_checks(probes, memory),
    }
    doc_path = publish(out_dir, report, doc)
    _say(f"done in {watch.total / 60:.1f} min; {doc_path}")
    return report


def publish(out_dir: Path, report: dict, doc: str | None) -> Path:
    """``OUT/report.json`` + ``OUT/report.md`` and the document (``doc``; default docs/reproduction.md, or
    ``OUT/reproduction.md`` for a quick run) with its plots; returns the document's path."""
    write_report(out_dir, report, reproduction_markdown(report, {name: src for src, name in IMAGES}))
    path = Path(doc) if doc else (out_dir / "reproduction.md" if report["quick"] else Path("docs/reproduction.md"))
    write_document(path, report, out_dir)
    return path


def model_summaries(out_dir: Path, plan: dict) -> dict[str, dict]:
    """What each trained model reached at its own task: ``{role: {name, kind, n_params, eval}}`` from the runs'
    ``summary.json`` and newest checkpoint."""
    out = {}
    for role in plan["models"]:
        run = out_dir / "models" / role
        try:
            summary = json.loads((run / "summary.json").read_text())
            _, cfg, meta = read_checkpoint(run)
        except (OSError, ValueError, UserError):
            continue
        out[role] = {
            "name": cfg.run.name,
            "kind": cfg.model.kind,
            "n_params": meta.get("n_params"),
            "steps": summary.get("step"),
            "eval": summary.get("eval", {}),
        }
    return out


def rewrite_document(out_dir: Path, plan: dict, doc: str | None) -> dict:
    """``memtrain repro --rewrite-doc``: the document and ``OUT/report.md`` again from ``OUT/report.json``."""
    try:
        report = json.loads((out_dir / "report.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{out_dir}/report.json: no finished reproduction there to write the document from") from None
    report.setdefault("models", model_summaries(out_dir, plan))
    report["notes"] = plan["notes"]
    path = publish(out_dir, report, doc)
    _say(f"{path} written from {out_dir}/report.json")
    return report


# ----------------------------------------------------------------------------------------------------
# The paper's claims, checked on the measured numbers


def _acc(rows: list[dict], label: str) -> float:
    return next(r["accuracy"] for r in rows if r["label"] == label)


def claim_checks(probes: list[dict], memory: dict[str, dict]) -> list[dict]:
    """Each claim of the paper with the measured numbers it rests on and whether the miniature agrees."""
    checks = []
    for arch in ("mixer", "transformer"):
        ae, clm, raw = (_acc(probes, f"{arch} {w}") for w in ("autoencoder", "causal LM", "untrained"))
        top = max(clm, raw)
        checks.append(
            {
                "claim": f"{arch}: autoencoder memories >> causal-LM memories ~ untrained",
                "holds": ae >= 2 * top and ae - top >= 0.1 and abs(clm - raw) <= max(0.05, 0.5 * top),
                "evidence": f"token accuracy {ae:.3f} (autoencoder) vs {clm:.3f} (causal LM) and {raw:.3f} (untrained)",
            }
        )
    mix, tr = _acc(probes, "mixer autoencoder"), _acc(probes, "transformer autoencoder")
    checks.append(
        {
            "claim": "mixer autoencoders >= transformer autoencoders at equal width and depth",
            "holds": mix >= tr - 0.01,
            "evidence": f"token accuracy {mix:.3f} (mixer) vs {tr:.3f} (transformer)",
        }
    )
    names = list(memory)
    if len(names) == 2:
        causal, combined = (memory[n] for n in names)

        def uses(r: dict, task: str) -> float:
            return r[task]["accuracy"] - r[f"{task} (memories shuffle)"]["accuracy"]

        checks.append(
            {
                "claim": "causal-only memory models fail copy; causal + copy models pass it (their memories carry the "
                "copied text)",
                "holds": combined["copy"]["accuracy"] >= causal["copy"]["accuracy"] + 0.1
                and uses(combined, "copy") >= 0.1
                and uses(causal, "copy") < 0.05,
                "evidence": f"copy accuracy {causal['copy']['accuracy']:.3f} (causal only) vs "
                f"{combined['copy']['accuracy']:.3f} (causal + copy); shuffling memories across the batch "
                f"costs {uses(causal, 'copy'):.3f} and {uses(combined, 'copy'):.3f}; blank copy "
                f"{causal['blank_copy']['accuracy']:.3f} vs {combined['blank_copy']['accuracy']:.3f}",
            }
        )
    return checks


# ----------------------------------------------------------------------------------------------------
# The document

IMAGES = [
    ("probes/retention.png", "retention.png"),
    ("probes/curves.png", "probe-curves.png"),
    ("memory/accuracy.png", "memory-accuracy.png"),
    ("memory/per_chunk.png", "memory-per-chunk.png"),
]


def _probe_rows(probes: list[dict]) -> str:
    lines = [
        "| encoder probed | params trained | CE | token acc | I_e (paper: 1-CE/H_u) | exact match | "
        "bits / memory | paper CE | paper I_e | paper token acc |",
        "|" + "---|" * 10,
    ]
    for p in probes:
        ce, ie, acc = PAPER.get(p["label"], (None, None, None))
        lines.append(
            f"| {p['label']} | {'yes' if p['trained'] else 'no'} | {num(p['ce'])} | {num(p['accuracy'])} | "
            f"{num(p['I_e_paper'])} | {num(p['exact_match'])} | {num(p['retained_bits_per_memory'], 0)} | "
            f"{num(ce)} | {num(ie)} | {num(acc, 4)} |"
        )
    return "\n".join(lines)


def _own_task_rows(models: dict[str, dict]) -> str:
    lines = ["| model | parameters | steps | held-out task: CE / token accuracy |", "|---|---|---|---|"]
    for m in models.values():
        tasks = "; ".join(f"{name} {num(r.get('ce'))} / {num(r.get('accuracy'))}" for name, r in m["eval"].items())
        params = f"{m['n_params'] / 1e6:.2f}M" if m.get("n_params") else "–"
        lines.append(f"| {m['name']} | {params} | {m.get('steps', '–')} | {tasks} |")
    return "\n".join(lines)


def reproduction_markdown(report: dict, images: dict[str, str]) -> str:
    """The reproduction document for ``report``; ``images`` maps the names in :data:`IMAGES` to their paths."""
    probes, memory = report["probes"], report["memory"]
    p0 = probes[0] if probes else {}
    enc, dec = p0.get("encoder", {}), p0.get("decoder", {})
    secs = report["seconds"]
    lines = [
        "# Reproduction in miniature",
        "",
        (
            "**Quick run: a few training steps per stage, a check that the pipeline works. The numbers below mean "
            "nothing.**\n"
            if report["quick"]
            else ""
        ),
        f"Produced by `{report['command']}` on {report['date']} (configs: `{report['configs']}`), in "
        f"{secs['total'] / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in secs.items() if k != 'total')}).",
        f"Device: {report['device']}.",
        "",
        "The paper's numbers (docs/reference.md §8, from the author's blog; FineWeb-edu, 8k tokenizer, "
        "512-token contexts, d_model 1024 mixers / 512 transformers, 200k steps) are next to ours "
        f"(the bundled demo corpus, 4096-token tokenizer, {p0.get('length', '?')}-token contexts, "
        f"d_model {enc.get('d_model', '?')}, {report['steps'].get('mixer_ae', '?')} training steps "
        f"({report['steps'].get('memory_combined', '?')} for the memory models), "
        f"{report.get('probe_steps', '?')} probe steps). Compare orderings and ratios, not values.",
        "",
        "## Checks of the paper's claims",
        "",
    ]
    for c in report["checks"]:
        lines.append(f"- {'**agrees**' if c['holds'] else '**does not agree**'}: {c['claim']}: {c['evidence']}.")
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
        "",
        "## Where the miniature differs from the paper",
        "",
        "- Scale: models of about a million parameters trained for minutes on a CPU, against 13-26B tokens on "
        "GPUs. Absolute accuracies are not comparable. The paper's mixer memories had 2 dimensions per "
        f"regenerated token (1024 / 512); ours have {enc.get('d_model', 0) / max(p0.get('length', 1), 1):g} "
        f"({enc.get('d_model', '?')} / {p0.get('length', '?')}), an easier compression but far less training.",
        "- Data: Python and PostgreSQL documentation (the bundled corpus), with a 4096-token tokenizer, not "
        "FineWeb-edu with 8000 tokens. The paper-convention I_e divides by H_u = ln V + 0.041 for our V.",
        "- One probe decoder for every encoder (the paper used Llama-style decoders for its LLM probes).",
        "- The paper's copy results are from 4 x 256-token chunks and 100k+ steps; ours are 4 x 8 tokens.",
        "- Single seeds: differences of a few points are within run-to-run noise.",
    ]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(line for line in lines if line is not None)


def write_document(path: Path, report: dict, out_dir: Path) -> None:
    """Write the document to ``path`` and copy its plots into ``<path stem>/`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = path.parent / path.stem
    image_dir.mkdir(parents=True, exist_ok=True)
    for src, name in IMAGES:
        if (out_dir / src).is_file():
            shutil.copyfile(out_dir / src, image_dir / name)
    path.write_text(reproduction_markdown(report, {name: f"{path.stem}/{name}" for _, name in IMAGES}) + "\n")
