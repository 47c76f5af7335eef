"""The engine contract: what the training loop (:mod:`memtrain.engine.trainer`) calls, and nothing else.

An engine owns the model's optimizer, schedule, gradient reduction, mixed precision and the engine-specific
part of a checkpoint. :class:`~memtrain.engine.engines.PlainEngine` (one process, or ``torchrun`` DDP) and
:class:`~memtrain.engine.ds_engine.DeepSpeedEngine` (ZeRO 0-3, or its pipeline) implement :class:`Engine`;
``build_engine`` returns one typed as :class:`Engine`, so the type checker holds both to it. Model code never
knows which engine runs it. This module also holds the small pieces both engines share.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from memtrain.data.memory_batch import Batch
    from memtrain.models.base import MemtrainModel
    from memtrain.objectives import ObjectiveStats, SpecialTokens


@dataclass
class StepResult:
    """One optimizer step: ``stats``, one ``{objective: ObjectiveStats}`` per micro-batch that computed a loss
    on this rank (none on pipeline stages without the loss), and the gradient norm before clipping (None if
    unknown)."""

    stats: list[dict[str, ObjectiveStats]] = field(default_factory=list)
    grad_norm: float | torch.Tensor | None = None


@runtime_checkable
class Engine(Protocol):
    """What the loop calls on an engine (every method is collective: all ranks call it at the same step)."""

    #: ``plain`` or ``deepspeed``, as recorded in a checkpoint's ``meta.json``
    name: str

    def describe(self) -> str:
        """One line for the start-up message: the parallelism, precision and micro-batching."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the model's forward passes run in (bf16 autocast, or nothing)."""
        ...

    def start_stage(self, frozen: list[str]) -> None:
        """Freeze the module groups ``frozen`` (every other group trains) at a curriculum stage boundary."""
        ...

    def train_step(self, batches: list[Batch], weights: dict[str, float], special: SpecialTokens) -> StepResult:
        """One optimizer step from this rank's loaded batches (micro-batches, accumulation, clipping, step,
        schedule)."""
        ...

    def lr(self) -> float:
        """The learning rate after the last schedule update."""
        ...

    def eval_model(self) -> MemtrainModel:
        """A model holding the current weights, for :func:`memtrain.evaluation.evaluate`."""
        ...

    def save(self, run_dir: Path, step: int, client_state: dict, config_yaml: str, meta: dict, keep: int) -> None:
        """Write a complete checkpoint of ``step`` (``client_state``: the loop's step, data position and RNG)."""
        ...

    def load(self, path: Path) -> dict:
        """Restore weights, optimizer, schedule and engine state from checkpoint ``path``; returns the loop's
        ``client_state``."""
        ...


def split_micro_batches(batches: list[Batch], micro_batch_size: int | None) -> list[Batch]:
    """Loaded batches [B, T] -> micro-batches [micro_batch_size, T] in order (None: the batches as they are)."""
    if micro_batch_size is None:
        return list(batches)
    return [mb for b in batches for mb in b.split(micro_batch_size)]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing without a pipeline: every block of every stack recomputes its activations in
    the backward pass (torch's non-reentrant checkpoint, :attr:`memtrain.models.stack.Stack.recompute`)."""
    from memtrain.models.stack import Stack

    for stack in model.modules():
        if isinstance(stack, Stack):
            stack.recompute = True
