"""Single-chunk autoencoder (docs/reference.md §3): encoder -> one memory -> repeat or unroll -> decoder -> every token.

The decoder has no token input: position t sees only the memory (and, causally, earlier decoder positions),
and hidden[:, t] reconstructs token t (no shift).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from memtrain.config import ModelConfig
from memtrain.models.base import ChunkEncoder, MemtrainModel
from memtrain.models.stack import Stack, apply_init, init_like


def unroll_index(seq_len: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """Gather index [L, d/2] of the unroll: row t is the cyclic window (t mod d) .. (t mod d) + d/2 - 1 (mod d).

    ``memory[:, unroll_index(L, d)]`` turns memories [B, d] into windows [B, L, d/2] (docs/reference.md §3.1).
    """
    t = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(d_model // 2, device=device).unsqueeze(0)
    return (t + j) % d_model


class Autoencoder(MemtrainModel):
    """input_ids [B, L] -> hidden [B, L, d]; hidden[:, t] reconstructs token t.

    Parameters: ``encoder`` (:class:`ChunkEncoder`), ``decoder_proj`` Linear(e, d) when e != d, ``projection``
    Linear(d/2, d) for ``injection: unroll``, ``decoder`` (stack of L positions), ``norm``, ``lm_head``.
    """

    kind = "autoencoder"
    label_shift = 0

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        e, d, arch = cfg.encoder.d_model, cfg.decoder.d_model, cfg.decoder.arch
        self.encoder = ChunkEncoder(cfg, vocab_size)
        self.decoder_proj = init_like(nn.Linear(e, d), arch) if e != d else nn.Identity()
        self.projection = init_like(nn.Linear(d // 2, d), arch) if cfg.injection == "unroll" else nn.Identity()
        self.decoder = Stack(cfg.decoder, cfg.chunk_len)
        self._build_head(tie_to=self.encoder.wte)
        apply_init(self, cfg.init)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> memories [B, e] (after the bottleneck, before decoder_proj)."""
        self._check_ids(input_ids, self.cfg.chunk_len)
        return self._run_encoder(input_ids)

    def forward(self, input_ids: torch.Tensor, memories: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] -> hidden [B, L, d]. ``memories`` [B, e] (e.g. precomputed) skips the encoder."""
        if memories is None:
            memories = self.encode(input_ids)
        return self.decoder(self.inject(memories))

    def inject(self, memories: torch.Tensor) -> torch.Tensor:
        """memories [B, e] -> the decoder's input [B, L, d]: decoder_proj, then each position gets the memory
        (``repeat``) or its own window of it through ``projection`` (``unroll``)."""
        L = self.cfg.chunk_len
        dtype = self.lm_head.weight.dtype
        m = self.decoder_proj(memories.to(dtype))  # [B, d]
        if self.cfg.injection == "repeat":
            x = m.unsqueeze(1).expand(-1, L, -1)
        else:
            x = self.projection(m[:, unroll_index(L, m.shape[-1], m.device)])  # [B, L, d/2] -> [B, L, d]
        return x.to(dtype)  # the residual stream stays in the parameters' dtype under autocast

    def _group_modules(self) -> dict[str, Sequence[nn.Module]]:
        return {
            "encoder": [self.encoder],
            "decoder": [self.decoder_proj, self.projection, self.decoder],
            "embeddings": [self.encoder.wte],
            "head": [self.norm, self.lm_head],
        }
