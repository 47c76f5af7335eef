"""``docs/config.md``, generated from the run-config schema so it cannot drift from the code.

Every field's documentation lives in :mod:`memtrain.config` as its ``Field(description=...)``; section prose
comes from the schema classes' docstrings and from :data:`NOTES` here, and the introduction (how a config is
read, an example, how the batch sizes combine) is :data:`INTRO`. :func:`render_markdown` walks the
:class:`~memtrain.config.Config` model (nested sections, lists of sections, Optional / Union / Literal /
list / tuple / dict types, defaults, ``ge``/``gt``/``le``/``lt`` constraints, required fields), so a field
added to the schema appears in the document without touching this module.

    python -m memtrain.config_docs                          # print the document
    python -m memtrain.config_docs --write docs/config.md   # regenerate it
    python -m memtrain.config_docs --check docs/config.md   # exit 1 when the file is out of date
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import yaml
from memtrain.config import Config

#: where the generated document lives in the repository, and the command that regenerates it
DOC_PATH = "docs/config.md"


def regenerate_command(path: str | Path = DOC_PATH) -> str:
    return f"python -m memtrain.config_docs --write {path}"


INTRO = """\
# Run configuration

<!-- Generated from the schema in memtrain/config.py by `python -m memtrain.config_docs --write docs/config.md`.
     Edit the fields' descriptions there (or the notes in memtrain/config_docs.py), not this file. -->

A run is one YAML file of the sections below, validated strictly by the pydantic models in
`memtrain/config.py`. Wherever a command asks for a run config (`memtrain train CONFIG`, `memtrain submit
CONFIG`, `memtrain bench CONFIG`, ...) it takes a path to a YAML file, or the name of a shipped config (`tiny`,
`quickstart`, `paper/memory_mixer_e512_d512`, ...; `memtrain configs list` names them all). A file on disk
always wins over a shipped name.

- Every field has a type, a range where one makes sense, and a default (fields marked **required** have none);
  leave a field, or a whole section, out to take its default.
- An unknown key is an error that suggests the closest valid one; a value of the wrong type or out of range is
  an error naming the field. Every error is one line, and nothing is written before the whole config is valid.
- Override any field from the command line with `--set section.field=value` (repeatable; dotted paths reach
  nested sections). The value is parsed as YAML: `--set optim.lr=3e-4`, `--set optim.betas=[0.9,0.95]`,
  `--set model.no_memory=true`, `--set model.hf_decoder=null`.
- A run directory keeps the config it was started with (`config.yaml`). Starting or resuming a run there with a
  config that differs in what the run computes (`model`, `objective`, `curriculum`, `data.shards`, `optim`,
  `run.seed`, `train.steps`) is refused; the other fields (cadence, device, engine, ...) may change on resume.

```yaml
# yaml/quickstart.yaml: a small masked-mixer memory model on the bundled demo corpus
run: {name: memory, out_dir: runs/quickstart, seed: 0}
model:
  kind: memory
  chunk_len: 8
  n_chunks: 4
  encoder: {arch: mixer, d_model: 128, n_layers: 2, n_heads: 4}
  decoder: {arch: mixer, d_model: 128, n_layers: 2, n_heads: 4}
objective: {weights: {causal: 1.0, copy: 1.0, blank_copy: 1.0}}
data: {shards: data/demo/shards, batch_size: 32}
optim: {lr: 2.0e-3, warmup_steps: 50, schedule: cosine, grad_clip: 1.0}
train: {steps: 800, precision: fp32, eval_every: 200, eval_batches: 8, log_every: 10, ckpt_every: 200}
```

```
$ memtrain train yaml/quickstart.yaml --set model.chunk_lenn=16
memtrain: error: yaml/quickstart.yaml: unknown config key 'model.chunk_lenn'; did you mean 'chunk_len'?
```

## Batch size, micro-batches and gradient accumulation

Sizes count rows; a row holds `model.n_chunks × model.chunk_len` tokens (the shards' row length).

- `data.batch_size` is the number of rows in one *loaded batch* on **each rank**; every rank reads its own
  rows (the loader splits each epoch between the ranks).
- `optim.grad_accum` is the number of loaded batches each rank takes per optimizer step.
- The **global batch**, the rows of one optimizer step over all ranks, is therefore
  `data.batch_size × optim.grad_accum × world size`, in every engine: one process, `torchrun` DDP, DeepSpeed
  ZeRO and DeepSpeed pipeline alike. The logged tokens/s count these rows.
- `dist.micro_batch_size` is the number of rows in one forward/backward pass. Each loaded batch runs as
  `data.batch_size / dist.micro_batch_size` micro-batches (it must divide `data.batch_size`); null makes every
  loaded batch one micro-batch. It changes memory use and the number of passes, not the global batch, the data
  order or the number of optimizer steps.

The gradients of all micro-batches of a step are accumulated (each micro-batch's loss divided by the number of
micro-batches) and averaged over the data-parallel ranks, then the optimizer steps once (clipping, AdamW,
schedule). A step thus minimises the mean of the losses of its micro-batches on all ranks, each the weighted
sum of the objectives' cross-entropies averaged over that micro-batch's supervised tokens.

DeepSpeed's generated config follows from these fields: `train_micro_batch_size_per_gpu` =
`dist.micro_batch_size` (or `data.batch_size`), `gradient_accumulation_steps` = micro-batches per replica per
step = `data.batch_size × optim.grad_accum / micro_batch_size` (× S with S pipeline stages), and
`train_batch_size` = the global batch. DeepSpeed's `gradient_accumulation_steps` is therefore not
`optim.grad_accum`. With a pipeline of S stages the `world size / S` replicas each train the rows that S ranks
loaded, streamed through the stages in micro-batches of `micro_batch_size` rows; a micro-batch carries the
task rows of every active objective.

Example: 4 ranks, `data.batch_size: 8`, `optim.grad_accum: 2`, `dist.micro_batch_size: 4`. A step trains
8 × 2 × 4 = 64 rows; each rank runs 4 forward/backward passes of 4 rows per step (DeepSpeed:
`train_batch_size` 64, micro-batch 4, `gradient_accumulation_steps` 4). With `dist.pipeline_stages: 2` there are
2 replicas, each streaming 32 rows as 8 micro-batches of 4 (`gradient_accumulation_steps` 8).
"""

#: Prose for a section, by dotted path, shown after its heading (and its class docstring, if any).
NOTES: dict[str, str] = {
    "curriculum": """\
For example:

```yaml
curriculum:
  - {name: blank_copy, steps: 2000, weights: {blank_copy: 1.0}}
  - {name: copy, steps: 2000, weights: {copy: 1.0}, freeze: [encoder]}
  - {name: causal_copy, steps: 4000, weights: {causal: 1.0, copy: 0.5}}
```

The stage is decided at every step, so a run resumed mid-stage continues in that stage with its weights and
frozen groups; the learning-rate schedule runs over the whole `train.steps`. Held-out evaluation covers every
objective any stage trains. Frozen parameters get no gradient: the plain engine's AdamW skips them, and
DeepSpeed, whose ZeRO optimizer steps whole parameter groups, gives them learning rate 0 while they are frozen,
so their weights stay exactly as they are.""",
    "data": """\
The loader is mosaicml-streaming's: each rank reads its own part of every epoch, the order is a deterministic
function of `run.seed`, and its position is saved in every checkpoint, so a resumed run reads exactly the
batches the uninterrupted run would have read (`docs/data.md`). How `batch_size` combines with
`optim.grad_accum`, `dist.micro_batch_size` and the ranks:
[Batch size, micro-batches and gradient accumulation](#batch-size-micro-batches-and-gradient-accumulation).""",
    "model.hf_decoder": """\
`model.kind` must be `memory`. `model.chunk_len`, `model.encoder`, `model.frozen_encoder`,
`model.memory_position`, `model.compression` and `model.no_memory` keep their meaning for the encoder;
`model.decoder` is unused. The shards hold both tokenizers' tokens (`memtrain data shards --decoder-tokenizer`).
The LLM is not split into pipeline stages: spread its memory with ZeRO instead (`docs/llm_decoders.md`).""",
    "dist": """\
The plain engine refuses the DeepSpeed-only fields (`zero_stage`, `pipeline_stages`, `offload_*`). How
`micro_batch_size` combines with `data.batch_size`, `optim.grad_accum` and the ranks:
[Batch size, micro-batches and gradient accumulation](#batch-size-micro-batches-and-gradient-accumulation).""",
}

_NONE = type(None)


# ----------------------------------------------------------------------------------------------------
# Walking the schema


def submodels(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models a field's annotation holds, each with the path suffix of its items: ``""`` for a
    section (or an optional one), ``"[]"`` for the items of a list, ``".<key>"`` for the values of a mapping."""
    if _is_model(annotation):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    out: list[tuple[type[BaseModel], str]] = []
    if origin in (Union, types.UnionType):
        for a in args:
            out += submodels(a)
    elif origin in (list, tuple, set, frozenset):
        out += [(m, "[]" + s) for a in args if a is not Ellipsis for m, s in submodels(a)]
    elif origin is dict and len(args) == 2:
        out += [(m, ".<key>" + s) for m, s in submodels(args[1])]
    seen: set = set()
    return [(m, s) for m, s in out if not ((m, s) in seen or seen.add((m, s)))]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


# ----------------------------------------------------------------------------------------------------
# Rendering pieces


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _scalar(v: Any) -> str:
    """A value as YAML writes it inline."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        try:
            plain = bool(v) and v.strip() == v and yaml.safe_load(v) == v
        except yaml.YAMLError:
            plain = False
        return v if plain else json.dumps(v)
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    if isinstance(v, tuple):
        v = list(v)
    return yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def constraint_text(metadata: list) -> str:
    """``ge``/``gt``/``le``/``lt``/length/multiple-of constraints as text ("≥ 1", "0 to 3", "> 0, < 1")."""
    lower = upper = None
    extra = []
    for m in metadata:
        if isinstance(m, at.Ge):
            lower = ("ge", m.ge)
        elif isinstance(m, at.Gt):
            lower = ("gt", m.gt)
        elif isinstance(m, at.Le):
            upper = ("le", m.le)
        elif isinstance(m, at.Lt):
            upper = ("lt", m.lt)
        elif isinstance(m, at.MultipleOf):
            extra.append(f"multiple of {m.multiple_of!r}")
        elif isinstance(m, at.MinLen):
            extra.append(f"at least {m.min_length} item(s)")
        elif isinstance(m, at.MaxLen):
            extra.append(f"at most {m.max_length} item(s)")
    if lower and upper and lower[0] == "ge" and upper[0] == "le":
        parts = [f"{repr(lower[1])} to {repr(upper[1])}"]
    else:
        parts = []
        if lower:
            parts.append(("≥ " if lower[0] == "ge" else "> ") + repr(lower[1]))
        if upper:
            parts.append(("≤ " if upper[0] == "le" else "< ") + repr(upper[1]))
    return ", ".join(parts + [e for e in extra if e])


class _Renderer:
    def __init__(self, root: type[BaseModel]):
        self.root = root
        #: model -> (heading, anchor) of the subsection that documents it
        self.placed: dict[type, tuple[str, str]] = {}
        self.out: list[str] = []

    # -- types and defaults ---------------------------------------------------------------------------------
    def type_text(self, ann: Any) -> str:
        if ann is _NONE:
            return "null"
        if _is_model(ann):
            heading, anchor = self.placed.get(ann, (f"`{ann.__name__}`", ""))
            return f"section [{heading}](#{anchor})" if anchor else f"section {heading}"
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin in (Union, types.UnionType):
            parts = [self.type_text(a) for a in args if a is not _NONE]
            text = _or(parts)
            if _NONE in args:
                text += ", or null" if (" or " in text or "," in text) else " or null"
            return text
        if origin is Literal:
            return _or([f"`{_scalar(v)}`" for v in args])
        if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            inner = self.type_text(args[0]) if args else "any"
            return f"list of ({inner})" if (" or " in inner or "," in inner) else f"list of {inner}"
        if origin is tuple:
            return "[" + ", ".join(self.type_text(a) for a in args) + "]"
        if origin is dict:
            k, v = (self.type_text(a) for a in args) if args else ("str", "any")
            return f"mapping of {k} to {v}"
        if ann is Any:
            return "any"
        if origin is typing.Annotated:
            return self.type_text(args[0])
        return getattr(ann, "__name__", str(ann))

    def field_type(self, info: FieldInfo) -> str:
        ann = info.annotation
        cons = constraint_text(info.metadata)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if cons and origin in (Union, types.UnionType) and _NONE in args:
            rest = [a for a in args if a is not _NONE]
            inner = self.type_text(rest[0] if len(rest) == 1 else Union[tuple(rest)])  # type: ignore[misc]  # noqa: UP007 (built at run time)
            text = f"{inner}{self._join(cons, inner)}{cons}"
            return text + (", or null" if ("," in text or " or " in text) else " or null")
        text = self.type_text(ann)
        return f"{text}{self._join(cons, text)}{cons}" if cons else text

    @staticmethod
    def _join(cons: str, text: str) -> str:
        """ ", " between a type and a compound constraint ("int, 1 to 64"), else " " ("int ≥ 1")."""
        return ", " if ("," in cons or " to " in cons or " or " in text or "," in text) else " "

    @staticmethod
    def default_text(info: FieldInfo) -> str:
        if info.is_required():
            return "**required**"
        value = info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            changed = value.model_dump(mode="json", exclude_defaults=True)
            return f"`{_scalar(changed)}`" if changed else "its fields' defaults"
        return f"`{_scalar(value)}`"

    # -- document -------------------------------------------------------------------------------------------
    def prose(self, model: type[BaseModel] | None, path: str) -> None:
        doc = model.__dict__.get("__doc__") if model is not None else None
        if doc:
            text = inspect.cleandoc(doc).replace("``", "`")
            for para in text.split("\n\n"):
                self.out += [" ".join(para.split()), ""]
        if path in NOTES:
            self.out += [NOTES[path].rstrip(), ""]

    def table(self, model: type[BaseModel]) -> None:
        self.rows(list(model.model_fields.items()))

    def rows(self, fields: list[tuple[str, FieldInfo]]) -> None:
        self.out += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, info in fields:
            self.out.append(
                f"| `{name}` | {_cell(self.field_type(info))} | {_cell(self.default_text(info))} | "
                f"{_cell(info.description or '')} |"
            )
        self.out.append("")

    def place_children(self, model: type[BaseModel], path: str) -> list[tuple[list[str], type[BaseModel]]]:
        """Subsections for the nested models of ``model`` not documented yet; fields of one parent with the same
        model and default share one subsection."""
        groups: list[tuple[list[str], type[BaseModel], Any]] = []
        for name, info in model.model_fields.items():
            for sub, suffix in submodels(info.annotation):
                if sub in self.placed:
                    continue
                default = None if info.is_required() else _scalar(info.get_default(call_default_factory=True))
                for paths, m, d in groups:
                    if m is sub and d == default and suffix == "":
                        paths.append(f"{path}.{name}")
                        break
                else:
                    groups.append(([f"{path}.{name}{suffix}"], sub, default))
        out = []
        for paths, sub, _ in groups:
            if sub in self.placed:  # one model under two names of one parent with different defaults
                continue
            heading = ", ".join(f"`{p}`" for p in paths)
            self.placed[sub] = (heading, slug(heading.replace("`", "")))
            out.append((paths, sub))
        return out

    def subsection(self, paths: list[str], model: type[BaseModel]) -> None:
        heading, _ = self.placed[model]
        self.out += [f"### {heading}", ""]
        self.prose(model, paths[0])
        self.children_then(model, paths[0])

    def children_then(self, model: type[BaseModel], path: str) -> None:
        children = self.place_children(model, path)
        self.table(model)
        for paths, sub in children:
            self.subsection(paths, sub)

    def render(self) -> str:
        self.out = [INTRO.rstrip(), ""]
        fields = self.root.model_fields
        sections = [(n, i) for n, i in fields.items() if submodels(i.annotation)]
        plain = [(n, i) for n, i in fields.items() if not submodels(i.annotation)]
        for name, info in sections:  # a top-level section is documented under its own name, wherever it recurs
            for sub, _ in submodels(info.annotation):
                self.placed.setdefault(sub, (f"`{name}`", slug(name)))
        self.out += ["## Sections", ""]
        if plain:
            self.out.append("- [Top-level fields](#top-level-fields)")
        for name, info in sections:
            self.out.append(f"- [`{name}`](#{slug(name)}): {' '.join((info.description or '').split())}")
        self.out.append("")
        if plain:
            self.out += ["## Top-level fields", ""]
            self.rows(plain)
        for name, info in sections:
            self.out += [f"## `{name}`", ""]
            if info.description:
                self.out += [" ".join(info.description.split()), ""]
            models = submodels(info.annotation)
            shape = self._shape_line(info, models)
            if shape:
                self.out += [shape, ""]
            for sub, suffix in models:
                heading, anchor = self.placed[sub]
                if anchor != slug(name):  # the same model as another section's
                    self.out += [f"The fields of [{heading}](#{anchor}).", ""]
                    continue
                if len(models) > 1:
                    self.out += [f"### `{sub.__name__}`", ""]
                self.prose(sub, name)
                self.children_then(sub, name + suffix)
        return "\n".join(self.out).rstrip() + "\n"

    def _shape_line(self, info: FieldInfo, models: list[tuple[type[BaseModel], str]]) -> str:
        """For a top-level field that is not simply a section: its type and default, in words."""
        if len(models) == 1 and models[0][1] == "" and _is_model(info.annotation):
            return ""
        default = self.default_text(info)
        if any(s.startswith("[]") for _, s in models):
            return f"A list, default {default}; each item has the fields below."
        if any(s.startswith(".<key>") for _, s in models):
            return f"A mapping, default {default}; each value has the fields below."
        return f"Type: {self.field_type(info)}; default {default}; when set, it has the fields below."


def render_markdown(root: type[BaseModel] = Config) -> str:
    """The whole ``docs/config.md`` for the schema ``root`` (the run config's :class:`Config`)."""
    return _Renderer(root).render()


def check_file(path: str | Path, root: type[BaseModel] = Config) -> str | None:
    """None when ``path`` holds exactly :func:`render_markdown`, else a one-line message saying how to fix it."""
    p = Path(path)
    try:
        current = p.read_text(encoding="utf-8")
    except OSError:
        current = None
    if current == render_markdown(root):
        return None
    what = "is missing" if current is None else "is out of date with the config schema (memtrain/config.py)"
    return f"{p} {what}; regenerate it: {regenerate_command(path)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m memtrain.config_docs",
        description="Render the run-config reference (docs/config.md) from the schema.",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="PATH", help="write the document to PATH")
    mode.add_argument("--check", metavar="PATH", help="exit 1 when PATH differs from the generated document")
    args = ap.parse_args(argv)
    if args.check:
        problem = check_file(args.check)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.check} is up to date")
        return 0
    text = render_markdown()
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
