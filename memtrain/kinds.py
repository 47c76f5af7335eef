"""What each model kind is, in one place: ``model.kind`` -> :class:`ModelKind`.

Config validation, objectives, evaluation, the pipeline and the model factory all read :data:`KINDS`
instead of testing ``kind == ...`` themselves. The module sits at the bottom of the package (it imports no
other memtrain module), so the config can use it; the model class is named by its import path and imported
only when a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelKind:
    """One ``model.kind``."""

    name: str
    #: what it is, for messages
    title: str
    #: ``module:Class`` of the model (a :class:`memtrain.models.base.MemtrainModel`)
    model_class: str
    #: the objectives that apply (training and ``memtrain eval``), in report order
    objectives: tuple[str, ...]
    #: the objective always evaluated during training (the model's own task)
    own_objective: str
    #: the model has an encoder that turns chunks into memories (unless ``model.no_memory``)
    has_encoder: bool
    #: rows are chunks that the copy objectives must keep whole (``make_task``'s ``n_chunks``)
    chunked_tasks: bool
    #: how many pipeline layers of a model of this kind train (``dist.pipeline_stages`` can be at most this)
    pipeline_units: Callable[[Any], int]

    def load_class(self) -> type:
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


def _memory_units(m: Any) -> int:
    # decoder blocks + head, the memory assembly, and (when the encoder trains) its blocks + embedding
    n = m.decoder.n_layers + 2
    if not m.no_memory and m.frozen_encoder is None:
        n += m.encoder.n_layers + 1
    return n


def _autoencoder_units(m: Any) -> int:
    # decoder blocks + head, (when the encoder trains) its blocks + embedding, and the memory injection when it
    # holds a trainable weight (a width change, the unroll projection, or the encoder's norm / bottleneck)
    n = m.decoder.n_layers + 1
    inject = m.encoder.d_model != m.decoder.d_model or m.injection == "unroll"
    if m.frozen_encoder is None:
        inject = inject or m.final_norm or m.compression > 1
        n += m.encoder.n_layers + 1
    return n + int(inject)


def _clm_units(m: Any) -> int:
    return m.decoder.n_layers + 2  # token embedding, decoder blocks, head


KINDS: dict[str, ModelKind] = {
    "memory": ModelKind(
        "memory",
        "memory model",
        "memtrain.models.memory:MemoryModel",
        ("causal", "copy", "blank_copy"),
        "causal",
        has_encoder=True,
        chunked_tasks=True,
        pipeline_units=_memory_units,
    ),
    "autoencoder": ModelKind(
        "autoencoder",
        "autoencoder",
        "memtrain.models.autoencoder:Autoencoder",
        ("reconstruction",),
        "reconstruction",
        has_encoder=True,
        chunked_tasks=False,
        pipeline_units=_autoencoder_units,
    ),
    "clm": ModelKind(
        "clm",
        "causal LM",
        "memtrain.models.clm:CausalLM",
        ("causal", "copy", "blank_copy"),
        "causal",
        has_encoder=False,
        chunked_tasks=False,
        pipeline_units=_clm_units,
    ),
}


def kind(name: str) -> ModelKind:
    """The :class:`ModelKind` of ``model.kind`` ``name`` (KeyError for an unknown kind: the config refuses it
    first)."""
    return KINDS[name]
