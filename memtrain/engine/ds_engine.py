"""The DeepSpeed engine: ZeRO stages 0-3 (optionally offloaded), bf16, and the pipeline over model stages.

It keeps the same contract as the plain engine (:class:`memtrain.engine.contract.Engine`). The
DeepSpeed config comes from the run config (:mod:`memtrain.engine.ds_config`); the optimizer is memtrain's
torch AdamW and the schedule memtrain's, handed to ``deepspeed.initialize``.

Curriculum freezing: ZeRO flattens each parameter group and steps it whole, so a frozen parameter cannot be
skipped as the plain engine's AdamW skips a parameter without a gradient. Parameters are grouped by the
curriculum stages that freeze them and those groups get learning rate 0 while frozen (their weights stay
exactly as they are). Parameters frozen for the whole run (a frozen encoder) are not in the optimizer.

Checkpoints (one folder per step, renamed into place when complete, like the plain engine's)::

    ds/state/...        DeepSpeed's own files (save_checkpoint / load_checkpoint), the loop state in
                        client_state; per-layer files under a pipeline
    model.safetensors   the consolidated fp32 weights (gathered from ZeRO partitions or pipeline stages)
    config.yaml, meta.json
    manifest.json       size and sha256 of every file above, DeepSpeed's included; written last

so ``memtrain eval``, frozen encoders and ``memtrain convert`` read a DeepSpeed checkpoint like any other.

DeepSpeed reads its own files with ``torch.load(weights_only=False)`` (full unpickling: a crafted file runs
code). memtrain therefore lets DeepSpeed load a checkpoint only after every file in it matches the
checkpoint's manifest (:func:`memtrain.engine.checkpoint.verify_checkpoint`): a missing, extra, planted or
modified file is refused before anything is unpickled, and a checkpoint without a manifest is incomplete.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from memtrain.config import Config
from memtrain.data.memory_batch import Batch, split_memories
from memtrain.devices import resolve_precision
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.contract import StepResult, checkpoint_blocks, split_micro_batches
from memtrain.engine.distributed import DistInfo, barrier, import_deepspeed
from memtrain.engine.ds_config import deepspeed_config, layout
from memtrain.engine.optim import make_adamw, staged_param_groups, staged_scheduler, unmasked_lr
from memtrain.errors import UserError
from memtrain.objectives import compute_losses

if TYPE_CHECKING:
    from deepspeed import DeepSpeedSchedulerCallable
    from deepspeed.runtime.pipe.engine import PipelineEngine

#: DeepSpeed's checkpoint tag inside ``<checkpoint>/ds``
TAG = "state"


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg: Config, model, info: DistInfo, always_frozen: list[str], vocab_size: int):
        deepspeed = import_deepspeed(info.device)
        self.cfg, self.model, self.info, self.vocab_size = cfg, model, info, vocab_size
        self.layout = layout(cfg, info.world_size)
        self.bf16 = resolve_precision(cfg.train.precision, info.device) == "bf16"
        self.pipeline = cfg.dist.pipeline_stages > 1
        self.always_frozen = list(always_frozen)
        stages = cfg.stages()
        model.freeze(self.always_frozen)  # what trains at some point is in the optimizer from the start
        module = model
        if self.pipeline:
            from memtrain.engine.pipeline import PipelineLoss, build_pipeline_module

            self.loss = PipelineLoss(model)
            module, self.layers, self.parts = build_pipeline_module(
                model,
                cfg.dist.pipeline_stages,
                cfg.dist.pipeline_partition,
                self.loss,
                cfg.dist.activation_checkpointing,
            )
        elif cfg.dist.activation_checkpointing:
            checkpoint_blocks(model)
        groups, frozen = staged_param_groups(
            model, cfg.optim.weight_decay, stages, self.always_frozen, params=list(module.parameters())
        )
        self._trained = {id(p) for g in groups for p in g["params"]}
        optimizer = make_adamw(groups, cfg.optim, info.device, allow_apex=False)
        schedule = lambda opt: staged_scheduler(opt, cfg.optim, cfg.train.steps, stages, frozen)  # noqa: E731
        ds_cfg = deepspeed_config(cfg, self.layout, self.bf16, info.device.type)
        # DeepSpeed annotates the callable as returning the deprecated _LRScheduler; a LambdaLR works
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=cast("DeepSpeedSchedulerCallable", schedule), config=ds_cfg
        )
        self._shadow = None

    def autocast(self):
        """No autocast: with bf16 DeepSpeed holds the model in bf16 (fp32 master weights in the optimizer)."""
        return contextlib.nullcontext()

    def describe(self) -> str:
        lay = self.layout
        what = f"DeepSpeed ZeRO-{self.cfg.dist.zero_stage}"
        if self.cfg.dist.offload_optimizer or self.cfg.dist.offload_param:
            what += " offload"
        if self.pipeline:
            what += f", pipeline of {lay.pipeline_stages} stages (layers {self.parts}) x {lay.data_parallel} replica(s)"
        what += f", {'bf16' if self.bf16 else 'fp32'}, {lay.micro_batches} micro-batch(es) of {lay.micro_batch_size}"
        return what

    # -- training ------------------------------------------------------------------------------------------
    def start_stage(self, frozen: list[str]) -> None:
        self.model.freeze(frozen)
        if self.pipeline:  # a stage's objectives (rows per micro-batch) and frozen outputs (dtypes) may change
            self._pipe().reset_activation_shape()

    def train_step(self, batches: list[Batch], weights: dict[str, float], special) -> StepResult:
        if self.pipeline:
            return self._pipeline_step(batches, weights, special)
        micro = split_micro_batches(batches, self.cfg.dist.micro_batch_size)
        assert len(micro) == self.layout.micro_batches, (len(micro), self.layout)
        stats = []
        for batch in micro:
            ids, memories = split_memories(batch)  # memories: precomputed (data.memories), else None
            # forward through the DeepSpeed engine (it reduces gradients); everything else from the model
            total, parts = compute_losses(self.model, ids, weights, special, memories=memories, forward=self.ds)
            self.ds.backward(total)  # DeepSpeed divides by the micro-batch count itself
            self.ds.step()  # steps (clip, AdamW, schedule) at the last micro-batch only
            stats.append(parts)
        return StepResult(stats, self.ds.get_global_grad_norm())

    def _pipeline_step(self, batches, weights, special) -> StepResult:
        from memtrain.engine.pipeline import stack_tasks

        rows = self._replica_rows(torch.cat(batches))
        micro = list(rows.split(self.layout.micro_batch_size))
        assert len(micro) == self.layout.micro_batches, (len(micro), self.layout)
        self.loss.weights, self.loss.records = dict(weights), []
        data = iter([((x,), y) for x, y in (stack_tasks(self.model, ids, weights, special) for ids in micro)])
        self._pipe().train_batch(data_iter=data)
        return StepResult(list(self.loss.records), self.ds.get_global_grad_norm())  # none on stages without the loss

    def _replica_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's loaded rows [n, T] -> the rows of its pipeline replica [n * stages, T]: all ranks'
        rows in rank order (the global batch a DDP run would train), cut into one part per replica."""
        if self.info.world_size == 1:
            return rows
        gathered = [torch.empty_like(rows) for _ in range(self.info.world_size)]
        dist.all_gather(gathered, rows.contiguous())
        replica = self._pipe().grid.data_parallel_id
        return torch.cat(gathered).view(self.layout.data_parallel, -1, rows.shape[1])[replica]

    def _pipe(self) -> PipelineEngine:
        """The DeepSpeed engine under a pipeline (deepspeed.initialize makes a PipelineEngine of a PipelineModule)."""
        return cast("PipelineEngine", self.ds)

    def lr(self) -> float:
        return unmasked_lr(self.scheduler)  # groups frozen in this stage are at 0, and a stage may hold only them

    # -- weights -------------------------------------------------------------------------------------------
    def eval_model(self):
        """The model itself (ZeRO-3 gathers parameters as modules run); under a pipeline, where each rank
        holds current weights of its own stage only, an fp32 copy loaded with the gathered weights."""
        if not self.pipeline:
            return self.model
        return self._shadow_with(self.full_state_dict(), self.info.device)

    def _shadow_with(self, state: dict[str, torch.Tensor], device: torch.device):
        from memtrain.models import build_model

        if self._shadow is None:
            self._shadow = build_model(self.cfg.model, self.vocab_size).to(device)
        with torch.no_grad():
            for name, p in self._shadow.named_parameters():
                p.copy_(state[name])
        return self._shadow

    def _fp32(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 value of one parameter (collective over the ranks that partition it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned
            if id(p) in self._trained:
                was = p.requires_grad
                p.requires_grad_(True)  # DeepSpeed returns nothing for a parameter frozen right now
                try:
                    value = safe_get_full_fp32_param(p)
                finally:
                    p.requires_grad_(was)
                assert value is not None  # the parameter requires grad while it is read
                return value.detach().float()
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().float().clone()
        value = safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None
        return (p if value is None else value).detach().float().clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """name -> full fp32 weight (CPU) for every parameter of the model (collective; every rank gets it)."""
        if not self.pipeline:
            return {name: self._fp32(p).cpu() for name, p in self.model.named_parameters()}
        from memtrain.engine.pipeline import layer_param_names

        grid = self._pipe().grid
        names = layer_param_names(self.model, self.layers)
        state = {}
        for idx, layer in enumerate(self.layers):
            owner = next(s for s in range(len(self.parts) - 1) if self.parts[s] <= idx < self.parts[s + 1])
            src = grid.stage_to_global(stage_id=owner, data=0)
            for local, p in layer.named_parameters():
                if grid.get_stage_id() == owner:
                    value = self._fp32(p).to(self.info.device)
                else:
                    value = torch.empty(p.shape, dtype=torch.float32, device=self.info.device)
                dist.broadcast(value, src=src)
                state[names[idx][local]] = value.cpu()
        return state

    # -- checkpoints ---------------------------------------------------------------------------------------
    def engine_meta(self) -> dict:
        lay = self.layout
        return {
            "name": "deepspeed",
            "zero_stage": self.cfg.dist.zero_stage,
            "world_size": lay.world_size,
            "pipeline_stages": lay.pipeline_stages,
            "data_parallel": lay.data_parallel,
            "bf16": self.bf16,
            "ds_dir": "ds",
            "ds_tag": TAG,
            "pipeline_parts": list(self.parts) if self.pipeline else None,
        }

    def save(self, run_dir: Path, step: int, client_state: dict, config_yaml: str, meta: dict, keep: int) -> None:
        """Every rank writes its DeepSpeed shards into the staged folder; rank 0 adds the consolidated
        ``model.safetensors``, ``config.yaml`` and ``meta.json`` and renames it into place."""
        from safetensors.torch import save_model

        name = [str(ckpt.staging_dir(run_dir, step)) if self.info.is_main else None]
        if self.info.world_size > 1:
            dist.broadcast_object_list(name, src=0)
        assert name[0] is not None  # rank 0's, on every rank
        tmp = Path(name[0])
        self.ds.save_checkpoint(str(tmp / "ds"), tag=TAG, client_state=client_state, save_latest=False)
        state = self.full_state_dict()
        barrier(self.info)  # every rank's DeepSpeed files are complete before rank 0 records them in the manifest
        if self.info.is_main:
            save_model(self._shadow_with(state, self._shadow_device()), str(tmp / "model.safetensors"))
            ckpt.commit_checkpoint(run_dir, tmp, step, config_yaml, dict(meta, engine=self.engine_meta()), keep)
        barrier(self.info)

    def _shadow_device(self) -> torch.device:
        return self.info.device if self.pipeline else torch.device("cpu")

    def load(self, path: Path) -> dict:
        """Restore weights, optimizer, schedule and engine state; returns the loop's client_state."""
        saved = ckpt.read_meta(path).get("engine", {})
        self._check_resumable(path, saved)
        if saved.get("ds_dir", "ds") != "ds" or saved.get("ds_tag", TAG) != TAG:
            raise UserError(f"{path / 'meta.json'}: engine.ds_dir / engine.ds_tag must be 'ds' / '{TAG}'")
        ds_dir = path / saved.get("ds_dir", "ds")
        if not (ds_dir / saved.get("ds_tag", TAG)).is_dir():
            raise UserError(f"{path}: its DeepSpeed state {ds_dir / TAG} is missing; the checkpoint is incomplete")
        # DeepSpeed unpickles its files with weights_only=False: only files the manifest vouches for
        ckpt.verify_checkpoint(path, require_manifest=True)
        try:
            loaded, client = self.ds.load_checkpoint(
                str(ds_dir), tag=saved.get("ds_tag", TAG), load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except (OSError, RuntimeError, KeyError, AssertionError, EOFError, ValueError) as exc:
            raise UserError(
                f"{ds_dir}: cannot load the DeepSpeed state, it is damaged or incomplete "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        if loaded is None or not client or "step" not in client:
            raise UserError(f"{ds_dir}: no DeepSpeed state with the loop's client state; the checkpoint is incomplete")
        return client

    def _check_resumable(self, path: Path, saved: dict) -> None:
        if saved.get("name") != "deepspeed":
            raise UserError(
                f"{path}: written by the {saved.get('name', 'plain')} engine; resume it with "
                f"dist.engine: {saved.get('name', 'plain')}, or start a new run from its weights"
            )
        now = self.engine_meta()
        for key, what in (("pipeline_stages", "dist.pipeline_stages"), ("zero_stage", "dist.zero_stage")):
            if saved.get(key) != now[key]:
                raise UserError(
                    f"{path}: saved with {what} = {saved.get(key)}, this run has {now[key]}; resume "
                    f"with the same setting, or convert it (memtrain convert deepspeed {path} --out DIR) "
                    "and start a new run from its weights"
                )
        if saved.get("data_parallel") != now["data_parallel"] and (saved.get("zero_stage") or saved.get("bf16")):
            raise UserError(
                f"{path}: saved by {saved.get('world_size')} rank(s) ({saved.get('data_parallel')} data-parallel), "
                f"this launch has {now['world_size']} ({now['data_parallel']}); the ZeRO optimizer state is "
                f"split per rank, so resume with {saved.get('world_size')} rank(s), or convert the checkpoint "
                f"(memtrain convert deepspeed {path} --out DIR) and start a new run from its weights"
            )


__all__ = ["DeepSpeedEngine", "TAG"]
