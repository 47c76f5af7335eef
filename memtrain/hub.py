"""memtrain models as Hugging Face Hub folders: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

    memtrain export runs/memory --out exports/memory [--push user/memory-model]
    reader = MemoryReader.from_pretrained("exports/memory")          # or "user/memory-model" from the Hub
    model = MemtrainModel.from_pretrained("exports/memory")          # the bare model (memory, autoencoder, clm)

A folder holds (nothing else is read, and nothing in it runs: no pickle, no code)::

    config.json          model_type "memtrain", the memtrain version that wrote it, kind, vocab_size, the
                         tokenizer's sha256 and special ids, and the run config ("config"; its "model" section
                         builds the model)
    model.safetensors    the weights (for an HF-decoder memory model: the encoder and projector only)
    tokenizer.model      memtrain's SentencePiece tokenizer, plus tokenizer.json / tokenizer_config.json /
                         special_tokens_map.json: the same tokenizer for ``AutoTokenizer``
    decoder/             HF-decoder memory models only: the LLM (LoRA merged) with its own tokenizer, a plain
                         Hugging Face folder that ``AutoModelForCausalLM`` loads
    README.md            the model card: YAML metadata, measured results, training config, commit, usage

Every folder is written into a temporary sibling and renamed into place, so a reader never sees half of one;
an earlier export in the same place is replaced only as a whole. A folder that is not such an export, or is
damaged, is refused with one line naming the file and what was expected. Hub repositories are fetched with
``huggingface_hub.snapshot_download`` (only the files above) and pushed with ``HfApi.upload_folder``; both need a
network connection and, to push, a token (``huggingface-cli login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
DECODER_DIR = "decoder"
MODEL_TYPE = "memtrain"
#: the layout version of config.json this memtrain writes and reads
FORMAT_VERSION = 1
#: what from_pretrained downloads from a Hub repository (never pickles or code)
HUB_FILES = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    CARD_FILE,
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    f"{DECODER_DIR}/*.json",
    f"{DECODER_DIR}/*.safetensors",
    f"{DECODER_DIR}/*.model",
    f"{DECODER_DIR}/*.txt",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns: the model (eval mode), its run config, config.json, the folder,
    memtrain's tokenizer and, for an HF-decoder memory model, the LLM's tokenizer."""

    model: Any
    config: Any
    info: dict
    folder: Path
    tokenizer: Any
    decoder_tokenizer: Any = None


# ----------------------------------------------------------------------------------------------------
# Writing


def minimal_run_config(model_cfg):
    """A run config around a bare model config (its kind's first objective), for models saved without a run."""
    from memtrain.config import config_from_dict
    from memtrain.kinds import KINDS

    first = KINDS[model_cfg.kind].objectives[0]
    return config_from_dict(
        {"model": model_cfg.model_dump(mode="json"), "objective": {"weights": {first: 1.0}}}, source="model config"
    )


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds the config.json of a memtrain export."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(
    model,
    out: str | Path,
    *,
    config=None,
    tokenizer=None,
    meta: dict | None = None,
    results: dict | None = None,
    name: str = "",
) -> Path:
    """Write ``model`` (a :class:`~memtrain.models.base.MemtrainModel`) as a Hub folder ``out``.

    ``config``: the run config (default: a minimal one around ``model.cfg``); ``tokenizer``: memtrain's
    :class:`~memtrain.data.tokenizer.Tokenizer` (required: a folder without one cannot encode text); ``meta``:
    the checkpoint's meta.json (provenance, step) for config.json and the card; ``results`` and ``name``: for the
    card (:func:`model_card`). ``out`` must be new, empty or an earlier memtrain export (replaced as a whole)."""
    from safetensors.torch import save_file, save_model

    from memtrain.convert.common import output_dir
    from memtrain.convert.tokenizer import save_hf_tokenizer
    from memtrain.models.hf_memory import HFMemoryModel

    if tokenizer is None:
        raise UserError("save_pretrained: a memtrain tokenizer is needed (tokenizer=Tokenizer.load(...))")
    cfg = config if config is not None else minimal_run_config(model.cfg)
    vocab = int(getattr(model, "encoder_vocab_size", model.vocab_size))
    if tokenizer.vocab_size != vocab:
        raise UserError(
            f"{tokenizer.path}: a tokenizer of {tokenizer.vocab_size} pieces, but the model's vocabulary is {vocab}; "
            "give the tokenizer it was trained with"
        )
    info = {
        "model_type": MODEL_TYPE,
        "format_version": FORMAT_VERSION,
        **card_info(meta or {}),
        "kind": cfg.model.kind,
        "vocab_size": vocab,
        "tokenizer_sha256": tokenizer.sha256,
        "special_ids": tokenizer.special_ids,
        "config": cfg.model_dump(mode="json"),
    }
    hf = isinstance(model, HFMemoryModel)
    with output_dir(Path(out), replace_if=is_export) as tmp:
        if hf:
            from memtrain.data.dual import load_decoder_tokenizer

            part = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
            save_file(part, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            llm = merged_llm_copy(model)
            llm.save_pretrained(str(tmp / DECODER_DIR), safe_serialization=True)
            assert cfg.model.hf_decoder is not None  # an HFMemoryModel's config has one
            load_decoder_tokenizer(cfg.model.hf_decoder.path).save_pretrained(str(tmp / DECODER_DIR))
            info["decoder_dir"] = DECODER_DIR
            info["llm_class"] = type(llm).__name__
        else:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_hf_tokenizer(tokenizer, tmp, _context_len(cfg.model))
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / CARD_FILE).write_text(model_card(cfg, info, n_params=n_params, results=results, name=name))
    return Path(out)


def merged_llm_copy(model):
    """An HF-decoder memory model's LLM as a plain transformers model, LoRA adapters merged, in a copy (the
    model itself keeps its adapters)."""
    llm: Any = model.llm
    if hasattr(llm, "merge_and_unload"):
        return copy.deepcopy(llm).merge_and_unload()
    return llm


def _context_len(model_cfg) -> int:
    """The tokens one input of the model holds: L for the encoder of a memory model or autoencoder, C*L for a
    causal LM."""
    return model_cfg.seq_len if model_cfg.kind == "clm" else model_cfg.chunk_len


# ----------------------------------------------------------------------------------------------------
# Reading


def resolve_folder(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is, else a Hub repository id downloaded (only :data:`HUB_FILES`) to the cache."""
    p = Path(path_or_repo)
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{p}: not a folder (expected a memtrain export folder or a Hub repository id)")
    name = str(path_or_repo)
    if not _REPO_ID.match(name):
        raise UserError(f"{p}: no such folder (expected a memtrain export folder or a Hub repository id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repository, no access: the library's own message says which
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{name}: no such local folder, and the Hub download failed ({type(exc).__name__}: {detail[:200]})"
        ) from None


def read_info(folder: Path) -> dict:
    """config.json of an export, checked to be one; UserError naming the file otherwise."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; expected a memtrain export (make one with `memtrain export RUN --out DIR`)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("model_type") != MODEL_TYPE:
        found = info.get("model_type") if isinstance(info, dict) else type(info).__name__
        raise UserError(
            f"{path}: model_type {found!r}, expected {MODEL_TYPE!r}: not a memtrain export "
            "(a Hugging Face model folder loads with transformers' AutoModelForCausalLM)"
        )
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version!r}, this memtrain reads {FORMAT_VERSION}; "
            f"it was written by memtrain {info.get('memtrain_version', '?')}"
        )
    for key, kind in (("config", dict), ("vocab_size", int), ("kind", str)):
        if not isinstance(info.get(key), kind):
            raise UserError(f"{path}: no {key!r} ({kind.__name__}) in it; the export is damaged")
    return info


def load_pretrained(path_or_repo: str | Path, device: str | torch.device = "cpu", revision: str | None = None):
    """The :class:`Pretrained` of an export folder or Hub repository id (see the module docstring)."""
    from memtrain.config import config_from_dict
    from memtrain.data.tokenizer import Tokenizer
    from memtrain.engine.checkpoint import load_model_weights
    from memtrain.models import build_model

    folder = resolve_folder(path_or_repo, revision)
    info = read_info(folder)
    cfg = config_from_dict(info["config"], source=str(folder / CONFIG_FILE))
    if cfg.model.kind != info["kind"]:
        raise UserError(f"{folder / CONFIG_FILE}: kind {info['kind']!r} but its config builds a {cfg.model.kind}")
    tokenizer = Tokenizer.load(folder / "tokenizer.model")
    if info.get("tokenizer_sha256") and tokenizer.sha256 != info["tokenizer_sha256"]:
        raise UserError(
            f"{tokenizer.path}: sha256 {tokenizer.sha256[:12]}…, but {CONFIG_FILE} names "
            f"{str(info['tokenizer_sha256'])[:12]}…: the folder mixes files of two exports"
        )
    dev = torch.device(device)
    if cfg.model.hf_decoder is None:
        model = build_model(cfg.model, int(info["vocab_size"]))
        load_model_weights(model, folder)
        return Pretrained(model.to(dev).eval(), cfg, info, folder, tokenizer)
    return _load_hf_memory(folder, cfg, info, tokenizer, dev)


def _load_hf_memory(folder: Path, cfg, info: dict, tokenizer, device: torch.device) -> Pretrained:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from memtrain.data.dual import load_decoder_tokenizer
    from memtrain.models.hf_memory import HFMemoryModel

    dec = folder / str(info.get("decoder_dir", DECODER_DIR))
    if not (dec / "model.safetensors").is_file() and not (dec / "model.safetensors.index.json").is_file():
        raise UserError(f"{dec}: no model.safetensors; expected the exported LLM (safetensors weights) there")
    assert cfg.model.hf_decoder is not None  # the caller's branch
    cfg.model.hf_decoder.path = str(dec.resolve())
    cfg.model.hf_decoder.mode = "full"  # adapters are merged into the exported LLM
    cfg.model.hf_decoder.gradient_checkpointing = False
    model = HFMemoryModel(cfg.model, int(info["vocab_size"]), pretrained=True)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; expected the encoder and projector weights")
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise UserError(f"{path}: unreadable weights, the file is damaged or incomplete ({exc})") from None
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in own.items()):
        bad = sorted(set(own) ^ set(state)) or [k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
        raise UserError(
            f"{path}: not the encoder and projector of the config in {CONFIG_FILE} (first mismatch {bad[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return Pretrained(model.to(device).eval(), cfg, info, folder, tokenizer, load_decoder_tokenizer(dec))


# ----------------------------------------------------------------------------------------------------
# The Hub


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload an export folder to the Hub repository ``repo_id`` (created if missing); returns the commit URL.
    Needs a network connection and a token with write access."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="memtrain export")
    except Exception as exc:  # offline, no token, no write access: the library's message says which
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--push {repo_id}: the upload failed ({type(exc).__name__}: {detail[:200]})") from None
    return str(getattr(commit, "commit_url", commit))


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None, **save) -> str:
    """:func:`save_pretrained` into a temporary folder, then :func:`push_folder` it; ``save``: its keywords."""
    with tempfile.TemporaryDirectory(prefix="memtrain-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "export", **save)
        return push_folder(folder, repo_id, private=private, token=token)


# ----------------------------------------------------------------------------------------------------
# The model card

#: the corpora memtrain knows the Hub name and license of, by a piece of their source path
_KNOWN_DATA = (
    ("demo-corpus", {"license": "other", "license_name": "psf-2.0-and-postgresql", "datasets": []}),
    ("fineweb-edu", {"license": "odc-by", "datasets": ["HuggingFaceFW/fineweb-edu"]}),
    ("fineweb", {"license": "odc-by", "datasets": ["HuggingFaceFW/fineweb"]}),
)


def training_data(shards: str | Path) -> dict:
    """{"sources": [...], "datasets": [...], "license": ...} of a run's shards, from their memtrain_shards.json
    (sources) and the corpora memtrain knows; empty entries when the shards are not on this machine."""
    out: dict = {"sources": [], "datasets": []}
    try:
        sources = json.loads((Path(shards) / "memtrain_shards.json").read_text()).get("sources") or []
    except (OSError, ValueError, AttributeError):
        return out
    out["sources"] = [str(s) for s in sources]
    for source in out["sources"]:
        for needle, known in _KNOWN_DATA:
            if needle in source.lower():
                out["datasets"] += [d for d in known["datasets"] if d not in out["datasets"]]
                for key in ("license", "license_name"):
                    if key in known:
                        out.setdefault(key, known[key])
                break
    return out


def _results_sections(results: dict) -> list[str]:
    """Markdown of measured results: {"eval": summary eval dict, "reports": [report.json payloads]}."""
    from memtrain.eval.probe import probe_table
    from memtrain.eval.report import results_table

    md = []
    if results.get("eval"):
        md += ["### Evaluation at the end of training", "", results_table(results["eval"]), ""]
    for label, payload in results.get("reports", []):
        if payload.get("probes"):
            md += [f"### Retention probes ({label})", "", probe_table(payload["probes"]), ""]
        elif payload.get("results"):
            md += [f"### Evaluation ({label})", "", results_table(payload["results"]), ""]
    return md or ["No measured results were found with the run (`memtrain eval --out`, `memtrain probe`).", ""]


def card_info(meta: dict) -> dict:
    """What config.json and the card record of a checkpoint's meta.json: this memtrain's version, the step, and
    the memtrain version and commit that trained it."""
    from memtrain import __version__

    provenance = meta.get("provenance")
    provenance = provenance if isinstance(provenance, dict) else {}
    return {
        "memtrain_version": __version__,
        "step": meta.get("step"),
        "trained_with": {"memtrain": provenance.get("memtrain"), "commit": provenance.get("commit")},
    }


def model_card(
    cfg,
    info: dict,
    *,
    n_params: int,
    results: dict | None = None,
    name: str = "",
    transformers_class: str | None = None,
) -> str:
    """README.md of an export: YAML metadata (library, tags, datasets and license of the training data where
    known), what the model is, how to load it, the measured ``results``, the training config and the commit.
    ``transformers_class``: the folder is a plain transformers model of that class (``memtrain convert hf``,
    the decoder of ``memtrain export-decoder``), loaded with transformers instead of memtrain."""
    from huggingface_hub import ModelCard, ModelCardData

    from memtrain.config import dump_config
    from memtrain.kinds import KINDS

    m = cfg.model
    data = training_data(cfg.data.shards)
    tags = ["memtrain", {"memory": "memory-model", "autoencoder": "autoencoder", "clm": "causal-lm"}[m.kind]]
    archs = ({m.encoder.arch} if m.kind != "clm" else set()) | (set() if m.hf_decoder else {m.decoder.arch})
    tags += sorted(archs) + (["llm-decoder"] if m.hf_decoder else [])
    card_data = ModelCardData(
        library_name="transformers" if transformers_class else "memtrain",
        pipeline_tag="text-generation" if transformers_class else None,
        tags=tags,
        datasets=data["datasets"] or None,
        license=data.get("license"),
        license_name=data.get("license_name"),
    )
    decoder = f"the LLM {info.get('llm_class', '')}".strip() if m.hf_decoder else f"a {m.decoder.arch} decoder"
    what = f"A memtrain {KINDS[m.kind].title} ({n_params / 1e6:.2f}M parameters"
    if m.kind != "clm":
        what += f", a {m.encoder.arch} encoder of width {m.encoder.d_model}, {decoder}; chunks of {m.chunk_len} tokens"
    what += ")" + (f", trained {info['step']} steps" if info.get("step") is not None else "")
    what += f" on {', '.join(data['sources'])}." if data["sources"] else "."
    where = name or "DIR_OR_REPO_ID"
    if transformers_class:
        what += f" This folder holds its {'LLM decoder' if m.hf_decoder else 'weights'} as a `{transformers_class}`."
        how = ["transformers loads it; memtrain is not needed."]
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            'ids = tok("The", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))",
        ]
    else:
        how = [
            "Install memtrain (`pip install memtrain`); no run directory is needed, and nothing in this folder runs "
            "as code (safetensors weights, JSON configs). `AutoTokenizer.from_pretrained` loads the tokenizer on "
            "its own, with the ids of memtrain's `tokenizer.model`."
            + (f" `{DECODER_DIR}/` is the LLM decoder as a plain Hugging Face model." if m.hf_decoder else "")
        ]
        load = _load_snippet(m.kind, where)
    trained = info.get("trained_with") or {}
    body = [f"# {name or cfg.run.name}", "", what, "", "## How to load it", "", *how, "", "```python", *load, "```", ""]
    body += ["## Results", "", *_results_sections(results or {}), "## Training", ""]
    body += [
        f"Trained with memtrain {trained.get('memtrain') or '?'} at commit {trained.get('commit') or 'unrecorded'}; "
        f"exported by memtrain {info['memtrain_version']}.",
        "",
    ]
    if data["sources"]:
        license_note = (
            f" License of the data: {data.get('license_name') or data['license']}." if data.get("license") else ""
        )
        body += [f"Training data: {', '.join(data['sources'])}.{license_note}", ""]
    body += ["```yaml", dump_config(cfg).rstrip(), "```", ""]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _load_snippet(kind: str, where: str) -> list[str]:
    if kind == "memory":
        return [
            "from memtrain.inference import MemoryReader",
            "",
            f'reader = MemoryReader.from_pretrained("{where}")',
            'doc = reader.encode(["A long document ..."])[0]        # one memory per chunk',
            'print(reader.generate(doc, "The", max_new_tokens=20).text)',
        ]
    return ["from memtrain.models import MemtrainModel", "", f'model = MemtrainModel.from_pretrained("{where}")']


# ----------------------------------------------------------------------------------------------------
# memtrain export


def run_results(ck: Path, step: int | None, extra: Sequence[str | Path] = (), label: str | None = None) -> dict:
    """The measured results of the run a checkpoint ``ck`` belongs to: summary.json's evaluation (when the
    checkpoint is the run's last; its row is named ``label``, default the run directory's name) and every
    ``report.json`` of ``memtrain eval --out`` / ``memtrain probe`` in the run directory's sub-folders or given
    in ``extra``."""
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck
    out: dict = {"reports": []}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and summary.get("eval") and summary.get("step") == step:
        out["eval"] = {label or run_dir.name: summary["eval"]}
    paths = sorted(run_dir.glob("*/report.json")) + [Path(p) for p in extra]
    for path in paths:
        if path.is_dir():
            path = path / "report.json"
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable report.json ({exc})") from None
        if isinstance(payload, dict):
            out["reports"].append((path.parent.name, payload))
    return out


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    results: Sequence[str | Path] = (),
    name: str | None = None,
) -> dict:
    """``memtrain export``: the newest checkpoint of ``run`` (or a checkpoint) as a Hub folder ``out``."""
    from memtrain.inference import find_encoder_tokenizer, load_memory_model, read_run_checkpoint

    ck, cfg, meta = read_run_checkpoint(run)
    tok = find_encoder_tokenizer(ck, cfg, meta, tokenizer)
    model = load_memory_model(ck, cfg, meta, torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    measured = run_results(ck, meta.get("step"), list(results), cfg.run.name)
    folder = save_pretrained(model, out, config=cfg, tokenizer=tok, meta=meta, results=measured, name=name or "")
    return {"out": str(folder), "kind": cfg.model.kind, "n_params": n_params, "checkpoint": str(ck)}


def _cmd_export(args) -> int:
    done = export_run(args.run, args.out, tokenizer=args.tokenizer, results=args.results or [], name=args.name)
    print(
        f"{done['out']}: {done['kind']} model ({done['n_params'] / 1e6:.2f}M params) from {done['checkpoint']} "
        "(config.json, model.safetensors, tokenizer, README.md)"
    )
    if args.push:
        url = push_folder(done["out"], args.push, private=args.private)
        print(f"pushed to {args.push}: {url}")
    return 0


def register(subparsers) -> None:
    """Add ``memtrain export``."""
    x = subparsers.add_parser(
        "export", help="write a run's model as a Hugging Face Hub folder (weights, tokenizer, model card); --push it"
    )
    x.add_argument("run", help="run or checkpoint directory (memory model, autoencoder or causal LM)")
    x.add_argument("--out", required=True, metavar="DIR", help="new folder (or an earlier export, replaced)")
    x.add_argument("--push", metavar="REPO", help="also upload the folder to this Hub repository (needs a network)")
    x.add_argument("--private", action="store_true", help="create the Hub repository as private")
    x.add_argument("--tokenizer", metavar="PATH", help="the run's tokenizer.model (default: found with the run)")
    x.add_argument(
        "--results",
        nargs="*",
        metavar="REPORT",
        help="more report.json files (memtrain eval --out, probe) for the card",
    )
    x.add_argument("--name", help="the model's name in the card (default: the run name)")
    x.set_defaults(func=_cmd_export)
