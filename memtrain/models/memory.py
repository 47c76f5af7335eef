"""The memory model (docs/reference.md §4.1, batched over chunks): a row of C chunks of L tokens.

The encoder turns chunks 0..C-2 into one memory each. The decoder for chunk c reads
``[slot_0 .. slot_{C-1}, E_dec(tokens of chunk c)]`` (length C + L) with slot_j = memory j if j < c, else
zeros. Chunks are independent given the memories, so the encoder runs once on [B*(C-1), L] and the decoder
once on [B*C, C+L]: no loop over chunks.

Output alignment: decoder position C-1+j (slot C-1, always a zero slot, for j = 0) sees the memories and
tokens 0..j-1 of its chunk, and predicts token j. So hidden[:, c*L + j] predicts token j of chunk c, the
chunk's first token included (the reference never trains it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from memtrain.config import ModelConfig
from memtrain.labels import IGNORE_INDEX
from memtrain.models.base import ChunkEncoder, MemtrainModel
from memtrain.models.stack import Stack, apply_init, init_like


class MemoryModel(MemtrainModel):
    """input_ids [B, C*L] -> hidden [B, C*L, d]; hidden[:, t] predicts token t from earlier tokens of its
    chunk plus the memories of earlier chunks.

    Parameters: ``encoder`` (:class:`ChunkEncoder`; absent when cfg.no_memory), ``decoder_proj`` Linear(e, d)
    when e != d, ``decoder_wte`` Embedding(V, d), ``decoder`` (stack of C+L positions), ``norm``, ``lm_head``.
    """

    kind = "memory"
    label_shift = 0

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        e, d, arch = cfg.encoder.d_model, cfg.decoder.d_model, cfg.decoder.arch
        self.encoder = None if cfg.no_memory else ChunkEncoder(cfg, vocab_size)
        self.decoder_proj = init_like(nn.Linear(e, d), arch) if e != d and not cfg.no_memory else nn.Identity()
        self.decoder_wte = init_like(nn.Embedding(vocab_size, d), arch)
        self.decoder = Stack(cfg.decoder, cfg.n_chunks + cfg.chunk_len)
        self._build_head(tie_to=self.decoder_wte)
        apply_init(self, cfg.init)

    def align_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """targets [B, T] -> labels [B, T]: the targets, except the row's first token (no context) = -100."""
        labels = targets.clone()
        labels[:, 0] = IGNORE_INDEX
        return labels

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, C*L] (or just the first [B, (C-1)*L]) -> memories [B, C-1, e] of chunks 0..C-2,
        after the bottleneck and before decoder_proj. Runs without autograd when the encoder is frozen."""
        if self.encoder is None:
            raise TypeError("this memory model has no encoder (model.no_memory is true)")
        return self.unfold_memories(self._run_encoder(self.encoder_chunks(input_ids)), input_ids.shape[0])

    def unfold_memories(self, memories: torch.Tensor, batch: int) -> torch.Tensor:
        """The encoder's memories of :meth:`encoder_chunks` [B*(C-1), e] -> per row [B, C-1, e]."""
        return memories.view(batch, self.cfg.n_chunks - 1, -1)

    def encoder_chunks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, C*L] (or [B, (C-1)*L]) -> the chunks that get a memory, folded into the batch:
        [B*(C-1), L] (chunk c of row b at index b*(C-1) + c)."""
        C, L = self.cfg.n_chunks, self.cfg.chunk_len
        if input_ids.dim() != 2 or input_ids.shape[1] not in (C * L, (C - 1) * L):
            raise ValueError(f"memory model expects input_ids [B, {C * L}], got {list(input_ids.shape)}")
        return input_ids[:, : (C - 1) * L].reshape(input_ids.shape[0] * (C - 1), L)

    def forward(self, input_ids: torch.Tensor, memories: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, C*L] -> hidden [B, C*L, d].

        ``memories`` [B, C-1, e] (encoder outputs, e.g. precomputed) skips the encoder.
        """
        return self.decoder_output(self.decoder(self.decoder_input(input_ids, memories)))

    def decoder_input(self, input_ids: torch.Tensor, memories: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, C*L] (+ memories [B, C-1, e], else encoded here) -> the decoder's input with the
        chunks folded into the batch: [B*C, C+L, d], row b*C + c = [slots of chunk c, tokens of chunk c]."""
        C, L = self.cfg.n_chunks, self.cfg.chunk_len
        self._check_ids(input_ids, C * L)
        B = input_ids.shape[0]
        tokens = self.decoder_wte(input_ids.reshape(B, C, L))  # [B, C, L, d]
        if self.encoder is None:
            if memories is not None:
                raise ValueError("memories were given to a memory model built with no_memory: true")
            slots = tokens.new_zeros(B, C, C, tokens.shape[-1])
        else:
            if memories is None:
                memories = self.encode(input_ids)
            elif memories.shape[:2] != (B, C - 1):
                raise ValueError(f"memories must be [B={B}, C-1={C - 1}, e], got {list(memories.shape)}")
            m = self.decoder_proj(memories.to(self.decoder_wte.weight.dtype))  # [B, C-1, d]
            m = torch.cat([m, m.new_zeros(B, 1, m.shape[-1])], dim=1)  # [B, C, d]: slot C-1 is never a memory
            visible = torch.ones(C, C, dtype=torch.bool, device=m.device).tril(-1)  # [c, j]: j < c
            slots = torch.where(visible[None, :, :, None], m[:, None, :, :], 0.0)  # [B, C, C, d]
            slots = slots.to(tokens.dtype)
        return torch.cat([slots, tokens], dim=2).view(B * C, C + L, -1)  # [B*C, C+L, d]

    def decoder_output(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder output [B*C, C+L, d] -> hidden [B, C*L, d] aligned with the row's tokens (decoder
        position C-1+j of chunk c predicts token j of chunk c)."""
        C, L = self.cfg.n_chunks, self.cfg.chunk_len
        return h[:, C - 1 : C + L - 1].reshape(h.shape[0] // C, C * L, -1)

    def _group_modules(self) -> dict[str, Sequence[nn.Module]]:
        encoder = [] if self.encoder is None else [self.encoder]
        return {
            "encoder": encoder,
            "decoder": [self.decoder_proj, self.decoder_wte, self.decoder],
            "embeddings": [self.decoder_wte] + [m.wte for m in encoder],
            "head": [self.norm, self.lm_head],
        }
