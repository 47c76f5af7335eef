"""The DeepSpeed config of a run, generated from the run config (there is no JSON file to keep in sync).

Sizes: every rank loads ``data.batch_size`` rows per loader batch and ``optim.grad_accum`` loader batches per
step, as the plain engine does, so the global batch is ``batch_size x grad_accum x world`` rows in every
engine. A loaded batch runs as ``batch_size / micro_batch_size`` micro-batches. Without a pipeline each rank
is its own data-parallel replica; with ``S`` pipeline stages the ``world / S`` replicas each take the rows
that ``S`` ranks loaded, so DeepSpeed's gradient-accumulation steps (= micro-batches per replica per step)
are ``S x batch_size x grad_accum / micro_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtrain.config import Config
from memtrain.errors import UserError

#: DeepSpeed prints a line every `steps_per_print` steps; memtrain logs its own numbers
_NEVER = 2**31 - 1


@dataclass(frozen=True)
class Layout:
    """How a run's ranks and rows are arranged. ``micro_batches``: micro-batches per replica per step."""

    world_size: int
    pipeline_stages: int
    data_parallel: int
    micro_batch_size: int
    micro_batches: int

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all replicas."""
        return self.micro_batch_size * self.micro_batches * self.data_parallel


def layout(cfg: Config, world_size: int) -> Layout:
    """The rank and batch layout of ``cfg`` on ``world_size`` ranks; UserError if the stages do not fit."""
    stages = cfg.dist.pipeline_stages
    if world_size % stages:
        raise UserError(
            f"dist.pipeline_stages {stages} does not divide the {world_size} rank(s) of this launch; "
            f"start a multiple of {stages} ranks (e.g. torchrun --nproc_per_node {stages})"
        )
    mbs = cfg.dist.micro_batch_size or cfg.data.batch_size
    rows = stages * cfg.data.batch_size * cfg.optim.grad_accum  # rows per replica per step
    return Layout(
        world_size=world_size,
        pipeline_stages=stages,
        data_parallel=world_size // stages,
        micro_batch_size=mbs,
        micro_batches=rows // mbs,
    )


def deepspeed_config(cfg: Config, lay: Layout, bf16: bool, device_type: str) -> dict:
    """The ``config`` dict for ``deepspeed.initialize``.

    The optimizer is memtrain's torch AdamW passed in by the engine (no DeepSpeed-built optimizer, so no
    ``fused_adam``/``cpu_adam`` extension build); clipping is set explicitly (DeepSpeed's default is 1.0).
    bf16 keeps fp32 master weights in the optimizer and runs the model in bf16.
    """
    d = cfg.dist
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    out = {
        "train_batch_size": lay.global_batch,
        "train_micro_batch_size_per_gpu": lay.micro_batch_size,
        "gradient_accumulation_steps": lay.micro_batches,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        # a client AdamW is fine for ZeRO and for ZeRO-Offload (it then steps the CPU master copy)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if d.pipeline_stages > 1:
        # non-reentrant checkpointing: the first stage's inputs are token ids, which need no gradient
        out["pipeline"] = {
            "activation_checkpoint_interval": 1 if d.activation_checkpointing else 0,
            "use_reentrant": False,
        }
    return out
