"""Models: masked-mixer and transformer blocks, the autoencoder, the memory model and the causal LM baseline.

``build_model(cfg.model, vocab_size)`` is the one entry point; every model is a :class:`MemtrainModel`.
"""

from __future__ import annotations

from memtrain.config import ModelConfig
from memtrain.kernels.dispatch import set_kernels  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
from memtrain.kinds import KINDS
from memtrain.models.autoencoder import Autoencoder
from memtrain.models.base import ChunkEncoder, MemtrainModel
from memtrain.models.clm import CausalLM
from memtrain.models.memory import MemoryModel
from memtrain.models.mixing import CausalMix


def model_class(cfg: ModelConfig) -> type[MemtrainModel]:
    """The class that builds ``cfg``: :class:`~memtrain.models.hf_memory.HFMemoryModel` when
    ``model.hf_decoder`` is set (a pretrained Hugging Face LLM as the decoder), else the class of its kind
    (:data:`memtrain.kinds.KINDS`)."""
    if cfg.hf_decoder is not None:
        from memtrain.models.hf_memory import HFMemoryModel

        return HFMemoryModel
    return KINDS[cfg.kind].load_class()


def build_model(cfg: ModelConfig, vocab_size: int) -> MemtrainModel:
    """The model for ``cfg.kind`` ("memory" | "autoencoder" | "clm") over a vocabulary of ``vocab_size``, its
    mixer layers and head set to ``cfg.kernels`` (see :mod:`memtrain.kernels.dispatch`)."""
    return set_kernels(model_class(cfg)(cfg, vocab_size), cfg.kernels)


__all__ = [
    "build_model",
    "MemtrainModel",
    "MemoryModel",
    "Autoencoder",
    "CausalLM",
    "ChunkEncoder",
    "CausalMix",
    "model_class",
]
