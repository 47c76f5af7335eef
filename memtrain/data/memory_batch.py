"""What a loader yields: :data:`Batch`, and the batch that carries precomputed memories
(:mod:`memtrain.data.memories` makes them).

Kept apart from the loader code (no streaming import): engines only need :data:`Batch` and
:func:`split_memories`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MemoryBatch(NamedTuple):
    """A training batch with its memories: ``(ids, memories)``.

    ``ids`` ``[B, C*L]`` long token rows; ``memories`` objective -> ``[B, C-1, e]`` memories as that
    objective's encoder inputs give them (storage dtype: bf16, fp16 or fp32; the model casts them).
    A tuple, so that streaming's loader counts its rows as ``len(batch[0])``.
    """

    ids: torch.Tensor
    memories: dict[str, torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        """The token rows' shape ``[B, C*L]``."""
        return self.ids.shape

    def to(self, device, non_blocking: bool = False) -> MemoryBatch:
        return MemoryBatch(
            self.ids.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.memories.items()},
        )

    def split(self, size: int) -> list[MemoryBatch]:
        """Micro-batches of ``size`` rows, in order."""
        ids = self.ids.split(size)
        parts = {k: v.split(size) for k, v in self.memories.items()}
        return [MemoryBatch(ids[i], {k: p[i] for k, p in parts.items()}) for i in range(len(ids))]


#: A loader batch, one of three layouts:
#:
#: - token rows, ``torch.long [B, C*L]`` (``data.shards``);
#: - dual rows, ``torch.long [B, C*(L + L_dec)]``: per chunk, L encoder ids then L_dec decoder slots
#:   (``data.dual_shards``, for a memory model with an HF decoder; the model reads them through its
#:   ``DualLayout`` and reports ``chunk_span`` = L + L_dec);
#: - :class:`MemoryBatch`, token rows with their precomputed memories (``data.memories``).
#:
#: All three have ``.shape``, ``.to(device)`` and ``.split(rows)``, which is all engines use besides
#: :func:`split_memories`.
Batch = torch.Tensor | MemoryBatch


def split_memories(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``(ids, memories)`` of a loader batch: memories is None for a plain token batch."""
    if isinstance(batch, MemoryBatch):
        return batch.ids, batch.memories
    return batch, None
