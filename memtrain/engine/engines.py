"""Engines: what the training loop drives to turn batches into optimizer steps.

The loop (:mod:`memtrain.engine.trainer`) is the same for every engine; an engine owns the model's
optimizer, schedule, gradient reduction, mixed precision and the engine-specific part of a checkpoint:

=====================  ============================================================================
``start_stage``        freeze module groups at a curriculum stage boundary
``train_step``         one optimizer step from this rank's loaded batches (micro-batches, accumulation,
                       clipping, step, schedule); returns per-objective sums for logging
``lr``                 the current learning rate
``eval_model``         a model holding the current weights, for :func:`memtrain.eval.evaluate.evaluate`
``save`` / ``load``    write / read a complete checkpoint (collective); ``client_state`` is the loop's:
                       step, data position and RNG
=====================  ============================================================================

:class:`PlainEngine` is one process or ``torchrun`` DDP; :class:`memtrain.engine.ds_engine.DeepSpeedEngine`
is DeepSpeed ZeRO 0-3 or its pipeline. Model code never knows which engine runs it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from memtrain.config import Config
from memtrain.data.memory_batch import unpack
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.distributed import DistInfo, barrier
from memtrain.engine.optim import build_optimizer, build_scheduler
from memtrain.errors import UserError
from memtrain.objectives import SpecialTokens, compute_losses


class ModelView:
    """Calls go through a wrapper (DDP, a DeepSpeed engine: so gradients are reduced); attributes come from
    the model."""

    def __init__(self, wrapped, module: torch.nn.Module):
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast when asked for (or 'auto' on a CUDA device that supports it); fp32 otherwise."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def split_micro_batches(batches: list[torch.Tensor], micro_batch_size: int | None) -> list[torch.Tensor]:
    """Loaded batches [B, T] -> micro-batches [micro_batch_size, T] in order (None: the batches as they are)."""
    if micro_batch_size is None:
        return list(batches)
    return [mb for b in batches for mb in b.split(micro_batch_size)]


def add_stats(sums: dict[str, list], parts: dict) -> None:
    """Add one micro-batch's :class:`~memtrain.objectives.ObjectiveStats` (detached) to ``sums``:
    objective -> [ce_sum, n_tokens, n_correct]."""
    for name, st in parts.items():
        ce_sum, n_tok, n_cor = sums.setdefault(name, [0.0, 0, 0])
        sums[name] = [ce_sum + st.ce_sum, n_tok + st.n_tokens, n_cor + st.n_correct]


def checkpoint_blocks(model) -> None:
    """Activation checkpointing without a pipeline: every block of every stack recomputes its activations in
    the backward pass (torch's non-reentrant checkpoint; parameter names are unchanged)."""
    from torch.utils.checkpoint import checkpoint

    from memtrain.models.stack import Stack

    for stack in model.modules():
        if isinstance(stack, Stack):
            for block in stack.blocks:
                forward = block.forward
                block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


@dataclass
class StepResult:
    """One optimizer step: ``sums`` objective -> [ce_sum, n_tokens, n_correct] over this rank's rows (zeros
    on ranks that compute no loss), and the gradient norm before clipping (None if unknown)."""

    sums: dict[str, list]
    grad_norm: float | torch.Tensor | None


class PlainEngine:
    """One process, or ``torchrun`` DDP (gradients averaged over ranks; every rank holds the whole model and
    optimizer). Checkpoints: ``model.safetensors`` + ``trainer.pt`` (optimizer, schedule, loop state)."""

    name = "plain"

    def __init__(self, cfg: Config, model, info: DistInfo):
        self.cfg, self.model, self.info = cfg, model, info
        self.optimizer = build_optimizer(model, cfg.optim, info.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.autocast = autocast_for(cfg.train.precision, info.device)
        self._view = None
        if cfg.dist.activation_checkpointing:
            checkpoint_blocks(model)

    def describe(self) -> str:
        return "DDP" if self.info.distributed else "single process"

    def start_stage(self, frozen: list[str]) -> None:
        self.model.freeze(frozen)
        self._view = ModelView(DDP(self.model) if self.info.distributed else self.model, self.model)

    def train_step(self, batches: list[torch.Tensor], weights: dict[str, float], special: SpecialTokens) -> StepResult:
        micro = split_micro_batches(batches, self.cfg.dist.micro_batch_size)
        sums: dict[str, list] = {}
        for i, batch in enumerate(micro):
            ids, memories = unpack(batch)  # memories: precomputed (data.memories), else None
            sync = contextlib.nullcontext()
            if self.info.distributed and i < len(micro) - 1:
                sync = self._view._wrapped.no_sync()
            with sync:
                with self.autocast():
                    total, parts = compute_losses(self._view, ids, weights, special, memories=memories)
                (total / len(micro)).backward()
            add_stats(sums, parts)
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip) if clip > 0 \
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(sums, grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def eval_model(self):
        return self.model

    def engine_meta(self) -> dict:
        return {"name": "plain", "world_size": self.info.world_size}

    def save(self, run_dir: Path, step: int, client_state: dict, config_yaml: str, meta: dict, keep: int) -> None:
        if self.info.is_main:
            state = dict(client_state, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            ckpt.save_checkpoint(run_dir, step, self.model, state, config_yaml,
                                 dict(meta, engine=self.engine_meta()), keep)
        barrier(self.info)

    def load(self, path: Path) -> dict:
        engine = ckpt.read_meta(path).get("engine", {}).get("name", "plain")
        if engine != "plain":
            raise UserError(f"{path}: written by the {engine} engine; resume it with dist.engine: {engine} "
                            f"(or convert it: memtrain convert deepspeed {path} --out DIR)")
        ckpt.load_model_weights(self.model, path)
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state


def build_engine(cfg: Config, model, info: DistInfo, always_frozen: list[str], vocab_size: int):
    """The engine ``cfg.dist.engine`` names, around ``model`` (already on ``info.device``)."""
    if cfg.dist.engine == "deepspeed":
        from memtrain.engine.ds_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, info, always_frozen, vocab_size)
    return PlainEngine(cfg, model, info)
