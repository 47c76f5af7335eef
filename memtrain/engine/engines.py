"""The plain engine (one process, or ``torchrun`` DDP) and :func:`build_engine`, which picks the engine a run
config names. The contract both engines keep is :class:`memtrain.engine.contract.Engine`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import cast

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from memtrain.config import Config
from memtrain.data.memory_batch import Batch, split_memories
from memtrain.devices import autocast_for
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.contract import Engine, StepResult, checkpoint_blocks, split_micro_batches
from memtrain.engine.distributed import DistInfo, barrier
from memtrain.engine.optim import build_optimizer, build_scheduler
from memtrain.errors import UserError
from memtrain.objectives import SpecialTokens, compute_losses


class PlainEngine:
    """One process, or ``torchrun`` DDP (gradients averaged over ranks; every rank holds the whole model and
    optimizer). Checkpoints: ``model.safetensors`` + ``trainer.pt`` (optimizer, schedule, loop state)."""

    name = "plain"

    def __init__(self, cfg: Config, model, info: DistInfo):
        self.cfg, self.model, self.info = cfg, model, info
        self.optimizer = build_optimizer(model, cfg.optim, info.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self._autocast = autocast_for(cfg.train.precision, info.device)
        self._ddp: DDP | None = None
        if cfg.dist.activation_checkpointing:
            checkpoint_blocks(model)

    def describe(self) -> str:
        return "DDP" if self.info.distributed else "single process"

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast()

    def start_stage(self, frozen: list[str]) -> None:
        self.model.freeze(frozen)
        # DDP records which parameters train when it is built: a new wrapper for every stage
        self._ddp = DDP(self.model) if self.info.distributed else None

    def train_step(self, batches: list[Batch], weights: dict[str, float], special: SpecialTokens) -> StepResult:
        micro = split_micro_batches(batches, self.cfg.dist.micro_batch_size)
        forward = self._ddp or self.model  # through DDP, so that backward averages gradients over the ranks
        stats = []
        for i, batch in enumerate(micro):
            ids, memories = split_memories(batch)  # memories: precomputed (data.memories), else None
            sync = contextlib.nullcontext()
            if self._ddp is not None and i < len(micro) - 1:
                sync = self._ddp.no_sync()
            with sync:
                with self.autocast():
                    total, parts = compute_losses(self.model, ids, weights, special, memories=memories, forward=forward)
                (total / len(micro)).backward()
            stats.append(parts)
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(trainable, clip)
            if clip > 0
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(stats, grad_norm)

    def lr(self) -> float:
        return cast(float, self.scheduler.get_last_lr()[0])  # the param groups' learning rates are floats

    def eval_model(self):
        return self.model

    def engine_meta(self) -> dict:
        return {"name": "plain", "world_size": self.info.world_size}

    def save(self, run_dir: Path, step: int, client_state: dict, config_yaml: str, meta: dict, keep: int) -> None:
        if self.info.is_main:
            state = dict(client_state, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            ckpt.save_checkpoint(
                run_dir, step, self.model, state, config_yaml, dict(meta, engine=self.engine_meta()), keep
            )
        barrier(self.info)

    def load(self, path: Path) -> dict:
        engine = ckpt.read_meta(path).get("engine", {}).get("name", "plain")
        if engine != "plain":
            raise UserError(
                f"{path}: written by the {engine} engine; resume it with dist.engine: {engine} "
                f"(or convert it: memtrain convert deepspeed {path} --out DIR)"
            )
        ckpt.load_model_weights(self.model, path)
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state


def build_engine(cfg: Config, model, info: DistInfo, always_frozen: list[str], vocab_size: int) -> Engine:
    """The engine ``cfg.dist.engine`` names, around ``model`` (already on ``info.device``)."""
    if cfg.dist.engine == "deepspeed":
        from memtrain.engine.ds_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, info, always_frozen, vocab_size)
    return PlainEngine(cfg, model, info)
