"""Causal language model baseline: embedding -> decoder stack over all C*L positions -> next-token head.

With a transformer decoder this is exactly ``LlamaForCausalLM`` (``wte`` = ``model.embed_tokens``,
``decoder.blocks.{i}`` = ``model.layers.{i}``, ``norm`` = ``model.norm``); with a mixer decoder it is the
reference ``LanguageMixer`` (plus the optional final norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtrain.config import ModelConfig
from memtrain.labels import IGNORE_INDEX
from memtrain.models.base import MemtrainModel
from memtrain.models.stack import Stack, apply_init, init_like


class CausalLM(MemtrainModel):
    """input_ids [B, T] -> hidden [B, T, d]; hidden[:, t] predicts token t+1 (label_shift 1).

    Parameters: ``wte`` Embedding(V, d), ``decoder`` (stack of T = C*L positions), ``norm``, ``lm_head``.
    """

    kind = "clm"
    label_shift = 1

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.wte = init_like(nn.Embedding(vocab_size, cfg.decoder.d_model), cfg.decoder.arch)
        self.decoder = Stack(cfg.decoder, cfg.seq_len)
        self._build_head(tie_to=self.wte)
        apply_init(self, cfg.init)

    def align_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """targets [B, T] -> labels [B, T] with labels[:, t] = targets[:, t+1] and labels[:, -1] = -100."""
        return F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)

    def forward(self, input_ids: torch.Tensor, memories: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> hidden [B, T, d]. ``memories`` must be None (a causal LM has none)."""
        if memories is not None:
            raise TypeError("a clm model takes no memories")
        self._check_ids(input_ids, self.cfg.seq_len)
        return self.decoder(self.wte(input_ids))

    def _group_modules(self) -> dict[str, Sequence[nn.Module]]:
        return {
            "encoder": [],
            "decoder": [self.wte, self.decoder],
            "embeddings": [self.wte],
            "head": [self.norm, self.lm_head],
        }
