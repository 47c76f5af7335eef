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
from memtrain.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from memtrain.engine.engines import ModelView, autocast_for, build_engine  # noqa: F401 (re-exported)
from memtrain.engine.profiling import StepProfiler
from memtrain.engine.rates import Rates
from memtrain.engine.rundir import prepare_run_dir, release_run_dir
from memtrain.engine.tracking import Tracker, check_loggers
from memtrain.errors import UserError
from memtrain.launch.preempt import Preemption, clear_marker, write_marker
from memtrain.eval.evaluate import eval_objectives, evaluate, take_batches
from memtrain.models import build_model
from memtrain.objectives import special_tokens, stage_at
from memtrain.version import provenance


def build_for_run(cfg: Config, device: torch.device, vocab_size: int) -> tuple[torch.nn.Module, list[str]]:
    """The model of ``cfg`` on ``device`` plus the groups that stay frozen for the whole run."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab_size)
    always_frozen: list[str] = []
    if cfg.model.frozen_encoder is not None:
        if cfg.model.kind == "clm" or cfg.model.no_memory:
            raise UserError("model.frozen_encoder: only a memory model with memories or an autoencoder has an "
                            "encoder to freeze")
        if cfg.model.frozen_encoder.checkpoint is not None:
            src = ckpt.resolve_checkpoint(cfg.model.frozen_encoder.checkpoint)
            from safetensors.torch import load_file

            meta = ckpt.read_meta(src)
            model.load_encoder_state(load_file(str(src / "model.safetensors")), source_kind=meta.get("kind", "?"))
        always_frozen.append("encoder")
    return model.to(device), always_frozen


def train(cfg: Config, resume: bool = False, stop_after: int | None = None, batch_transform=None,
          preemption: Preemption | None = None) -> dict:
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


def _train(cfg: Config, resume: bool, info: DistInfo, stop_after: int | None,
           cleanup: contextlib.ExitStack, batch_transform=None, preemption: Preemption | None = None) -> dict:
    if preemption is None:
        preemption = Preemption()
        cleanup.callback(preemption.restore)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_loggers(cfg.train.loggers)
    run_dir = Path(cfg.run.out_dir)
    shards = read_shard_info(cfg.data.shards, cfg.data.cache_dir)
    check_compatible(shards, row_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                     row_len_source=f"model.chunk_len x model.n_chunks = {cfg.model.chunk_len} x {cfg.model.n_chunks}")
    # data, then model: both are checked before the run directory is touched
    memories = None
    if cfg.data.memories:  # precomputed memories ride along with the batches; the frozen encoder is skipped
        from memtrain.data.memories import open_memories

        if batch_transform is not None:
            raise UserError("data.memories: a batch transform changes the tokens the stored memories encode")
        memories = open_memories(cfg, shards)
    loader = make_loader(cfg.data.shards, "train", batch_size=cfg.data.batch_size, shuffle=cfg.data.shuffle,
                         seed=cfg.run.seed, num_workers=cfg.data.num_workers, cache_dir=cfg.data.cache_dir,
                         memories=memories)
    cleanup.callback(loader.close)
    # the same held-out batches at every evaluation; shards without a validation split train without one
    val_batches = take_batches(cfg.data.shards, "val", cfg.data.batch_size, cfg.train.eval_batches,
                               cfg.data.cache_dir) if shards.rows("val") else None
    if batch_transform is not None and val_batches:
        val_batches = [batch_transform(b) for b in val_batches]

    device = info.device
    model, always_frozen = build_for_run(cfg, device, shards.vocab_size)
    if memories is not None:
        memories.check_encoder(model)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if cfg.train.compile:
        model.compile()
    special = special_tokens(cfg.objective, shards.special_ids)
    engine = build_engine(cfg, model, info, always_frozen, shards.vocab_size)
    if info.is_main:  # everything above was checked without writing anything
        prepare_run_dir(run_dir, cfg, resume)
        cleanup.callback(release_run_dir, run_dir)  # an in-process train() hands the directory back when done
    barrier(info)

    step = 0
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        state = engine.load(latest.path)
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step = state["step"]
        done = _finished_summary(run_dir) if step >= cfg.train.steps else None
        if done is not None:  # resuming a finished run changes nothing
            if info.is_main:
                print(f"memtrain: {run_dir} is complete at step {step}; nothing to do", flush=True)
            return done

    stages = cfg.stages()
    eval_names = eval_objectives(cfg)
    autocast = engine.autocast
    tokens_per_step = cfg.data.batch_size * cfg.optim.grad_accum * info.world_size * cfg.model.seq_len
    rates = Rates(cfg, shards.vocab_size, info, tokens_per_step)
    meta = {"kind": cfg.model.kind, "vocab_size": shards.vocab_size, "tokenizer_sha256": shards.tokenizer_sha256,
            "special_ids": shards.special_ids, "n_params": n_params,
            "row_len": cfg.model.seq_len, "provenance": provenance(info.world_size, device.type),
            "flops_per_token": rates.flops_per_token, "peak_tflops": rates.peak}
    tracker = Tracker(run_dir, info.is_main, cfg.train.steps, step, cfg.train.progress, cfg.train.loggers,
                      cfg.model_dump(mode="json"), cfg.run.name)
    # closed with its outcome below; an exception on the way closes it as failed
    cleanup.push(lambda exc_type, exc, tb: tracker.close("failed") if exc_type else tracker.close())
    profiler = StepProfiler(cfg.train.profile, run_dir, info, step, pause=rates.paused, announce=tracker.write)
    cleanup.callback(profiler.close)
    if info.is_main:
        where = f"resumed from {latest.path} at step {step}" if latest else "from scratch"
        tracker.write(f"memtrain: {cfg.model.kind} model, {meta['n_params'] / 1e6:.2f}M params, "
                      f"{info.world_size} rank(s) on {device.type} ({engine.describe()}), {where}; run dir {run_dir}")
        if val_batches is None:
            tracker.write(f"data.shards: {cfg.data.shards} has no validation split; training without evaluation")
        if rates.peak is None and device.type == "cuda":
            tracker.write(f"train.peak_tflops: no datasheet peak for {rates.device_name}; MFU is not logged "
                          "(set train.peak_tflops)")

    def save(at_step: int) -> None:
        with rates.paused():
            state = {"step": at_step, "loader": loader.state_dict(), "rng": ckpt.rng_state()}
            engine.save(run_dir, at_step, state, dump_config(cfg), meta, cfg.train.keep_ckpts)
            tracker.flush()  # the logs then hold every step up to the checkpoint, even if killed later

    def run_eval(at_step: int) -> dict:
        if val_batches is None:
            return {}
        with rates.paused():
            return _run_eval(at_step)

    def _run_eval(at_step: int) -> dict:
        evaluated = engine.eval_model()
        evaluated.eval()
        with autocast():
            results = evaluate(evaluated, val_batches, eval_names, special, device, info)
        evaluated.train()
        flat = {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.items()
                if isinstance(v, (int, float))}
        tracker.scalars(at_step, flat, kind="eval")
        if info.is_main:
            tracker.write(f"step {at_step}: " + "  ".join(
                f"{n} ce {r['ce']:.3f} acc {r['accuracy']:.3f}" for n, r in results.items()))
        return results

    stage_index = -1
    start_step = step
    stop_at = min(cfg.train.steps, start_step + stop_after) if stop_after else cfg.train.steps
    it = iter(loader)
    model.train()
    if info.is_main:
        clear_marker(run_dir)  # a marker of an earlier attempt; this attempt writes its own if preempted

    def preempted(at_step: int, checkpointed: bool) -> dict:
        """Leave the marker, then wait for every rank, so no rank exits (75) while another still writes."""
        if info.is_main:
            write_marker(run_dir, at_step, preemption.requested or "?")
            tracker.write(f"preempted ({preemption.requested}) after step {at_step}; "
                          + ("checkpoint written" if checkpointed else "signal came during start-up, nothing new "
                             "to checkpoint") + ", continue with --resume")
        tracker.close("preempted")
        barrier(info)
        return {"step": at_step, "eval": {}, "run_dir": str(run_dir), "complete": False, "preempted": True}

    if step < cfg.train.steps and preemption.should_stop(info.distributed, device):
        return preempted(step, checkpointed=False)  # signalled during start-up: the first point all ranks agree
    rates.start()
    sums: dict[str, list] = {}  # objective -> [ce_sum, tokens, correct] since the last log step
    while step < stop_at:
        profiler.before_step(step + 1)
        idx, stage, _ = stage_at(stages, step)
        if idx != stage_index:
            stage_index = idx
            engine.start_stage(sorted(set(stage.freeze) | set(always_frozen)))
            if info.is_main and len(stages) > 1:
                tracker.write(f"stage {idx} '{stage.name}' from step {step}: objectives "
                              f"{stage.weights.active()}, frozen {sorted(set(stage.freeze) | set(always_frozen))}")
        weights = stage.weights.active()
        batches = []
        for _ in range(cfg.optim.grad_accum):
            ids = next(it) if batch_transform is None else batch_transform(next(it))
            batches.append(ids.to(device, non_blocking=True))
        result = engine.train_step(batches, weights, special)
        for name, (ce_sum, n_tok, n_cor) in result.sums.items():  # detached; read on the host at log steps
            acc = sums.setdefault(name, [0.0, 0, 0])
            sums[name] = [acc[0] + ce_sum, acc[1] + n_tok, acc[2] + n_cor]
        step += 1
        rates.steps += 1
        profiler.after_step(step)
        if step % cfg.train.log_every == 0 or step == stop_at:
            logged = {"lr": engine.lr(), "stage": stage_index}
            if result.grad_norm is not None:
                logged["grad_norm"] = float(result.grad_norm)
            if info.distributed:  # log the global batch's numbers, not rank 0's share
                pooled = torch.tensor([[float(v) for v in sums[n]] for n in sums], dtype=torch.float64,
                                      device=device)
                sums = dict(zip(sums, all_reduce_sum(pooled, info).tolist()))
            loss_total = 0.0
            for name, (ce_sum, n_tok, n_cor) in sums.items():
                loss = float(ce_sum) / max(n_tok, 1)
                logged[f"loss/{name}"], logged[f"accuracy/{name}"] = loss, float(n_cor) / max(n_tok, 1)
                loss_total += weights.get(name, 0.0) * loss
            logged["loss/total"] = loss_total
            sums.clear()
            logged.update(rates.window(step, stage_index))  # after the losses were read: the device is idle
            if not math.isfinite(loss_total):
                raise UserError(f"loss became {loss_total} at step {step}; lower optim.lr or check the data")
            tracker.log_step(step, logged, weights)
        tracker.progress(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            run_eval(step)
        saved = bool(cfg.train.ckpt_every) and step % cfg.train.ckpt_every == 0 and step != stop_at
        if saved:
            save(step)
        # the ranks agree at the same steps only (a collective waits for the device), so a signal costs at most
        # stop_check_every steps; also at a checkpoint step (nothing to redo) and the last one; one process
        # checks its flag at every step
        if step < cfg.train.steps and preemption.should_stop(
                info.distributed, device,
                collective=saved or step == stop_at or step % cfg.train.stop_check_every == 0):
            if not saved:
                save(step)
            return preempted(step, checkpointed=True)

    if step < cfg.train.steps:  # stopped early on request: checkpoint and leave the rest for --resume
        save(step)
        tracker.write(f"stopped after step {step} of {cfg.train.steps}; continue with --resume")
        tracker.close("stopped")
        return {"step": step, "eval": {}, "run_dir": str(run_dir), "complete": False}
    if latest is None or latest.step != step:
        save(step)  # before the final evaluation, so nothing trained is lost if that fails
    results = run_eval(step)
    summary = {"step": step, "eval": results, "run_dir": str(run_dir), "complete": True,
               "provenance": meta["provenance"]}
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tracker.close()
    return summary


def _finished_summary(run_dir: Path) -> dict | None:
    """The summary.json of a completed run, or None if it is missing or unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("complete") else None
