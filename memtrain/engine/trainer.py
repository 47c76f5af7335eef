"""The training loop: one readable function, :func:`train`, for every engine.

The loop reads the data, follows the curriculum, logs, evaluates and checkpoints; an *engine*
(:mod:`memtrain.engine.engines`: single process or ``torchrun`` DDP; :mod:`memtrain.engine.ds_engine`:
DeepSpeed ZeRO 0-3 or pipeline) turns each step's batches into an optimizer step. Each step takes
``optim.grad_accum`` loaded batches of ``data.batch_size`` rows per rank (global batch = batch_size x
grad_accum x world size), run as micro-batches of ``dist.micro_batch_size`` rows. The curriculum's stage
decides, at every step, the objective weights and which module groups are frozen. Checkpoints hold the model,
optimizer, schedule, RNG and data position, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from memtrain.config import Config, dump_config
from memtrain.data.loader import check_compatible, make_loader, read_shard_info
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.contract import Engine
from memtrain.engine.distributed import DistInfo, barrier, init_distributed, shutdown
from memtrain.engine.engines import build_engine
from memtrain.engine.preempt import Preemption, clear_marker, write_marker
from memtrain.engine.profiling import StepProfiler
from memtrain.engine.rates import Rates
from memtrain.engine.rundir import prepare_run_dir, release_run_dir
from memtrain.engine.tracking import Tracker, check_loggers
from memtrain.errors import UserError
from memtrain.evaluation import eval_objectives, evaluate, take_batches
from memtrain.kinds import KINDS
from memtrain.metrics import MetricAccumulator
from memtrain.models import build_model
from memtrain.objectives import special_tokens, stage_at
from memtrain.version import provenance


def build_for_run(cfg: Config, device: torch.device, vocab_size: int) -> tuple[torch.nn.Module, list[str]]:
    """The model of ``cfg`` on ``device`` plus the groups that stay frozen for the whole run."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab_size)
    always_frozen: list[str] = []
    if cfg.model.frozen_encoder is not None:
        if not KINDS[cfg.model.kind].has_encoder or cfg.model.no_memory:
            raise UserError(
                "model.frozen_encoder: only a memory model with memories or an autoencoder has an encoder to freeze"
            )
        if cfg.model.frozen_encoder.checkpoint is not None:
            src = ckpt.resolve_checkpoint(cfg.model.frozen_encoder.checkpoint)
            from safetensors.torch import load_file

            meta = ckpt.read_meta(src)
            model.load_encoder_state(load_file(str(src / "model.safetensors")), source_kind=meta.get("kind", "?"))
        always_frozen.append("encoder")
    return model.to(device), always_frozen


def train(
    cfg: Config,
    resume: bool = False,
    stop_after: int | None = None,
    batch_transform=None,
    preemption: Preemption | None = None,
) -> dict:
    """Train ``cfg`` to ``train.steps``; returns the final summary (also written to ``summary.json``).

    ``stop_after``: run at most this many steps in this invocation, then checkpoint and return (for jobs with
    a time limit that continue with ``resume=True``). ``batch_transform``: a pure function of a batch,
    token ids [B, T] -> [B, T], applied to every training and held-out batch (e.g. the retention probe's
    random-token control); being pure, it keeps resumed runs exact. ``preemption``: a handler installed
    earlier (``memtrain train`` installs one before its imports), else one is installed here."""
    # USR1/TERM from here on only ask the run to stop (finish the step, checkpoint, exit 75): a signal during
    # the start-up below (process group, data, model) is remembered and honoured before the first step
    preemption = preemption or Preemption()
    try:
        if stop_after is not None and stop_after < 1:
            raise UserError(f"--stop-after: expected a number of steps >= 1, got {stop_after}")
        if cfg.dist.engine == "deepspeed":  # ranks vs pipeline stages, before any process group starts
            from memtrain.engine.ds_config import layout

            layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.engine, cfg.dist.timeout_s)
        try:
            with contextlib.ExitStack() as cleanup:  # closes the loader and the tracker, also on errors
                return _train(cfg, resume, info, stop_after, cleanup, batch_transform, preemption)
        finally:
            shutdown(info)
    finally:
        preemption.restore()


def _train(
    cfg: Config,
    resume: bool,
    info: DistInfo,
    stop_after: int | None,
    cleanup: contextlib.ExitStack,
    batch_transform=None,
    preemption: Preemption | None = None,
) -> dict:
    """The loop: build (or resume) the run, then step, log, evaluate and checkpoint until done."""
    if preemption is None:
        preemption = Preemption()
        cleanup.callback(preemption.restore)
    run = _Run(cfg, resume, info, cleanup, batch_transform, preemption)
    if run.finished is not None:
        return run.finished  # resuming a finished run changes nothing
    if run.step < cfg.train.steps and preemption.should_stop(info.distributed, info.device):
        return run.preempted(checkpointed=False)  # signalled during start-up: the first point all ranks agree
    stop_at = min(cfg.train.steps, run.step + stop_after) if stop_after else cfg.train.steps
    run.rates.start()
    while run.step < stop_at:
        run.train_step()
        step = run.step
        if step % cfg.train.log_every == 0 or step == stop_at:
            run.log()
        run.tracker.progress(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            run.evaluate()
        saved = bool(cfg.train.ckpt_every) and step % cfg.train.ckpt_every == 0 and step != stop_at
        if saved:
            run.save()
        # the ranks agree at the same steps only (a collective waits for the device), so a signal costs at most
        # stop_check_every steps; also at a checkpoint step (nothing to redo) and the last one; one process
        # checks its flag at every step
        if step < cfg.train.steps and preemption.should_stop(
            info.distributed, info.device, collective=saved or step == stop_at or step % cfg.train.stop_check_every == 0
        ):
            if not saved:
                run.save()
            return run.preempted(checkpointed=True)
    if run.step < cfg.train.steps:  # stopped early on request: checkpoint and leave the rest for --resume
        return run.stop()
    return run.finish()


class _Run:
    """One attempt of a run: its data, model, engine, sinks and position. Built with every input checked
    before the run directory is touched; the loop in :func:`_train` drives it."""

    def __init__(
        self,
        cfg: Config,
        resume: bool,
        info: DistInfo,
        cleanup: contextlib.ExitStack,
        batch_transform,
        preemption: Preemption,
    ):
        self.cfg, self.info, self.preemption, self.batch_transform = cfg, info, preemption, batch_transform
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        check_loggers(cfg.train.loggers)
        self.run_dir = run_dir = Path(cfg.run.out_dir)
        self._open_data(cleanup)
        self._build_model()
        if info.is_main:  # everything above was checked without writing anything
            prepare_run_dir(run_dir, cfg, resume)
            cleanup.callback(release_run_dir, run_dir)  # an in-process train() hands the directory back when done
        barrier(info)

        self.step, self.finished = 0, None
        self.latest = ckpt.latest_checkpoint(run_dir) if resume else None
        if self.latest is not None:
            state = self.engine.load(self.latest.path)
            self.loader.load_state_dict(state["loader"])
            ckpt.set_rng_state(state["rng"])
            self.step = state["step"]
            self.finished = _finished_summary(run_dir) if self.step >= cfg.train.steps else None
            if self.finished is not None:
                if info.is_main:
                    print(f"memtrain: {run_dir} is complete at step {self.step}; nothing to do", flush=True)
                return

        self.stages = cfg.stages()
        self.stage_index = -1
        self.weights: dict[str, float] = {}
        self.eval_names = eval_objectives(cfg)
        tokens_per_step = cfg.data.batch_size * cfg.optim.grad_accum * info.world_size * cfg.model.seq_len
        self.rates = Rates(cfg, self.vocab_size, info, tokens_per_step)
        self.window = MetricAccumulator(self.vocab_size)  # the objectives' sums since the last log line
        self.grad_norm = None
        self.meta = {
            "kind": cfg.model.kind,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.shards.tokenizer_sha256,
            "special_ids": self.shards.special_ids,
            "n_params": self.n_params,
            "row_len": cfg.model.seq_len,
            "provenance": provenance(info.world_size, info.device.type),
            "flops_per_token": self.rates.flops_per_token,
            "peak_tflops": self.rates.peak,
        }
        self.tracker = Tracker(
            run_dir,
            info.is_main,
            cfg.train.steps,
            self.step,
            cfg.train.progress,
            cfg.train.loggers,
            cfg.model_dump(mode="json"),
            cfg.run.name,
        )
        # closed with its outcome by stop/finish/preempted; an exception on the way closes it as failed
        cleanup.push(lambda exc_type, exc, tb: self.tracker.close("failed") if exc_type else self.tracker.close())
        self.profiler = StepProfiler(
            cfg.train.profile, run_dir, info, self.step, pause=self.rates.paused, announce=self.tracker.write
        )
        cleanup.callback(self.profiler.close)
        self._announce()
        self.batches = iter(self.loader)
        self.model.train()
        if info.is_main:
            clear_marker(run_dir)  # a marker of an earlier attempt; this attempt writes its own if preempted

    # -- building ------------------------------------------------------------------------------------------
    def _open_data(self, cleanup: contextlib.ExitStack) -> None:
        cfg = self.cfg
        self.shards = shards = read_shard_info(cfg.data.shards, cfg.data.cache_dir)
        check_compatible(
            shards,
            row_len=cfg.model.seq_len,
            vocab_size=cfg.model.vocab_size,
            row_len_source=f"model.chunk_len x model.n_chunks = {cfg.model.chunk_len} x {cfg.model.n_chunks}",
        )
        self.vocab_size = shards.vocab_size
        self.memories = None
        if cfg.data.memories:  # precomputed memories ride along with the batches; the frozen encoder is skipped
            from memtrain.data.memories import open_memories

            if self.batch_transform is not None:
                raise UserError("data.memories: a batch transform changes the tokens the stored memories encode")
            self.memories = open_memories(cfg, shards)
        self.loader = make_loader(
            cfg.data.shards,
            "train",
            batch_size=cfg.data.batch_size,
            shuffle=cfg.data.shuffle,
            seed=cfg.run.seed,
            num_workers=cfg.data.num_workers,
            cache_dir=cfg.data.cache_dir,
            memories=self.memories,
            num_canonical_nodes=cfg.data.num_canonical_nodes,
        )
        cleanup.callback(self.loader.close)
        # the same held-out batches at every evaluation; shards without a validation split train without one
        self.val_batches = (
            take_batches(cfg.data.shards, "val", cfg.data.batch_size, cfg.train.eval_batches, cfg.data.cache_dir)
            if shards.rows("val")
            else None
        )
        if self.batch_transform is not None and self.val_batches:
            self.val_batches = [self.batch_transform(b) for b in self.val_batches]

    def _build_model(self) -> None:
        cfg, info = self.cfg, self.info
        self.model, self.always_frozen = build_for_run(cfg, info.device, self.vocab_size)
        if self.memories is not None:
            self.memories.check_encoder(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        if cfg.train.compile:
            self.model.compile()
        self.special = special_tokens(cfg.objective, self.shards.special_ids)
        self.engine: Engine = build_engine(cfg, self.model, info, self.always_frozen, self.vocab_size)

    def _announce(self) -> None:
        if not self.info.is_main:
            return
        cfg, info = self.cfg, self.info
        where = f"resumed from {self.latest.path} at step {self.step}" if self.latest else "from scratch"
        self.tracker.write(
            f"memtrain: {cfg.model.kind} model, {self.n_params / 1e6:.2f}M params, "
            f"{info.world_size} rank(s) on {info.device.type} ({self.engine.describe()}), {where}; "
            f"run dir {self.run_dir}"
        )
        if self.val_batches is None:
            self.tracker.write(f"data.shards: {cfg.data.shards} has no validation split; training without evaluation")
        if self.rates.peak is None and info.device.type == "cuda":
            self.tracker.write(
                f"train.peak_tflops: no datasheet peak for {self.rates.device_name}; MFU is not "
                "logged (set train.peak_tflops)"
            )

    # -- one step ------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        """Enter the curriculum stage of the next step, load its batches and take one optimizer step."""
        self.profiler.before_step(self.step + 1)
        idx, stage, _ = stage_at(self.stages, self.step)
        if idx != self.stage_index:
            self.stage_index = idx
            frozen = sorted(set(stage.freeze) | set(self.always_frozen))
            self.engine.start_stage(frozen)
            if self.info.is_main and len(self.stages) > 1:
                self.tracker.write(
                    f"stage {idx} '{stage.name}' from step {self.step}: objectives "
                    f"{stage.weights.active()}, frozen {frozen}"
                )
        self.weights = stage.weights.active()
        batches = []
        for _ in range(self.cfg.optim.grad_accum):
            ids = next(self.batches)
            if self.batch_transform is not None:
                ids = self.batch_transform(ids)
            batches.append(ids.to(self.info.device, non_blocking=True))
        result = self.engine.train_step(batches, self.weights, self.special)
        for record in result.stats:  # detached; read on the host at log steps only
            for name, stats in record.items():
                self.window.update_from_stats(name, stats)
        self.grad_norm = result.grad_norm
        self.step += 1
        self.rates.steps += 1
        self.profiler.after_step(self.step)

    def log(self) -> None:
        """One record of the steps since the last one, pooled over all ranks, to every sink."""
        logged = {"lr": self.engine.lr(), "stage": self.stage_index}
        if self.grad_norm is not None:
            logged["grad_norm"] = float(self.grad_norm)
        self.window.ensure(self.weights, self.info.device)  # pipeline stages without the loss add zeros
        if self.info.distributed:  # log the global batch's numbers, not rank 0's share
            self.window.all_reduce()
        pooled = self.window.compute()
        self.window.reset()
        loss_total = 0.0
        for name, r in pooled.items():
            loss = r["ce"] if r["tokens"] else 0.0
            logged[f"loss/{name}"], logged[f"accuracy/{name}"] = loss, r["accuracy"] if r["tokens"] else 0.0
            loss_total += self.weights.get(name, 0.0) * loss
        logged["loss/total"] = loss_total
        logged.update(self.rates.window(self.step, self.stage_index))  # after the losses were read: device idle
        if not math.isfinite(loss_total):
            raise UserError(f"loss became {loss_total} at step {self.step}; lower optim.lr or check the data")
        self.tracker.log_step(self.step, logged, self.weights)

    # -- evaluation and checkpoints ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out metrics of the current weights (logged as ``eval/<objective>/<metric>``)."""
        if self.val_batches is None:
            return {}
        with self.rates.paused():
            evaluated = self.engine.eval_model()
            evaluated.eval()
            with self.engine.autocast():
                results = evaluate(
                    evaluated, self.val_batches, self.eval_names, self.special, self.info.device, self.info
                )
            evaluated.train()
            flat: dict[str, float] = {
                f"eval/{name}/{k}": v
                for name, r in results.items()
                for k, v in r.items()
                if isinstance(v, (int, float))
            }
            self.tracker.scalars(self.step, flat, kind="eval")
            if self.info.is_main:
                self.tracker.write(
                    f"step {self.step}: "
                    + "  ".join(f"{n} ce {r['ce']:.3f} acc {r['accuracy']:.3f}" for n, r in results.items())
                )
        return results

    def save(self) -> None:
        with self.rates.paused():
            state = {"step": self.step, "loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
            self.engine.save(
                self.run_dir, self.step, state, dump_config(self.cfg), self.meta, self.cfg.train.keep_ckpts
            )
            self.tracker.flush()  # the logs then hold every step up to the checkpoint, even if killed later

    # -- endings -------------------------------------------------------------------------------------------
    def preempted(self, checkpointed: bool) -> dict:
        """Leave the marker, then wait for every rank, so no rank exits (75) while another still writes."""
        if self.info.is_main:
            write_marker(self.run_dir, self.step, self.preemption.requested or "?")
            self.tracker.write(
                f"preempted ({self.preemption.requested}) after step {self.step}; "
                + ("checkpoint written" if checkpointed else "signal came during start-up, nothing new to checkpoint")
                + ", continue with --resume"
            )
        self.tracker.close("preempted")
        barrier(self.info)
        return {"step": self.step, "eval": {}, "run_dir": str(self.run_dir), "complete": False, "preempted": True}

    def stop(self) -> dict:
        """``--stop-after`` reached: checkpoint and leave the rest for ``--resume``."""
        self.save()
        self.tracker.write(f"stopped after step {self.step} of {self.cfg.train.steps}; continue with --resume")
        self.tracker.close("stopped")
        return {"step": self.step, "eval": {}, "run_dir": str(self.run_dir), "complete": False}

    def finish(self) -> dict:
        """The last step is done: checkpoint, evaluate, write summary.json."""
        if self.latest is None or self.latest.step != self.step:
            self.save()  # before the final evaluation, so nothing trained is lost if that fails
        results = self.evaluate()
        summary = {
            "step": self.step,
            "eval": results,
            "run_dir": str(self.run_dir),
            "complete": True,
            "provenance": self.meta["provenance"],
        }
        if self.info.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.close()
        return summary


def _finished_summary(run_dir: Path) -> dict | None:
    """The summary.json of a completed run, or None if it is missing or unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("complete") else None
