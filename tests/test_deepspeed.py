"""The DeepSpeed engine on CPU with 2 gloo ranks: ZeRO 0-3 train exactly like one process on the same global
batch, a killed ZeRO-2 run resumes with the same next losses, checkpoints convert to one safetensors file,
the generated DeepSpeed config, and bad combinations refused before any process group starts.

Every run skips DeepSpeed's shared-memory extension build (memtrain.engine.distributed.import_deepspeed)
and passes a torch AdamW (no fused_adam build), so a run costs its imports and its steps only.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

deepspeed = pytest.importorskip("deepspeed")

from helpers import (  # noqa: E402
    BATCH,
    CURRICULUM,
    KILL_RUN,
    RUN,
    STEPS,
    assert_close_weights,
    check_kill_and_resume,
    records,
    same_losses,
    tiny_config,
    tiny_raw,
    torchrun,
    weights,
    write_yaml,
)

from memtrain.cli import main  # noqa: E402
from memtrain.engine import checkpoint as ckpt  # noqa: E402
from memtrain.engine.ds_config import deepspeed_config, layout  # noqa: E402
from memtrain.engine.trainer import train  # noqa: E402
from memtrain.errors import UserError  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# the generated DeepSpeed config


def test_deepspeed_config_comes_from_the_run_config(tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data.shards,
        tmp_path,
        "dist.engine=deepspeed",
        "dist.zero_stage=2",
        "optim.grad_accum=3",
        "optim.grad_clip=0.5",
        "data.batch_size=4",
        "dist.micro_batch_size=2",
        "dist.offload_optimizer=true",
    )
    lay = layout(cfg, world_size=4)
    ds = deepspeed_config(cfg, lay, bf16=True, device_type="cpu")
    # 4 ranks x 3 loaded batches of 4 rows, run as micro-batches of 2: 6 accumulation steps per rank
    assert (lay.data_parallel, lay.micro_batches, lay.global_batch) == (4, 6, 48)
    assert ds["train_batch_size"] == 48 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 6
    assert ds["gradient_clipping"] == 0.5  # always explicit: DeepSpeed's own default is 1.0
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds and "pipeline" not in ds
    # a pipeline of 2 stages on 4 ranks: 2 replicas, each training the rows its 2 ranks loaded
    pipe = tiny_config(
        tiny_data.shards,
        tmp_path,
        "dist.engine=deepspeed",
        "dist.zero_stage=1",
        "dist.pipeline_stages=2",
        "dist.activation_checkpointing=true",
        "optim.grad_clip=0",
    )
    lay = layout(pipe, world_size=4)
    ds = deepspeed_config(pipe, lay, bf16=False, device_type="cpu")
    assert (lay.data_parallel, lay.micro_batches, lay.micro_batch_size) == (2, 2, 4)
    assert ds["train_batch_size"] == 16 == pipe.data.batch_size * 4  # = what 4 DDP ranks would train
    assert ds["gradient_clipping"] == 0.0
    assert ds["pipeline"] == {"activation_checkpoint_interval": 1, "use_reentrant": False}
    with pytest.raises(UserError, match="pipeline_stages 2 does not divide the 3 rank"):
        layout(pipe, world_size=3)


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["dist.engine=deepspeed", "dist.zero_stage=2", "dist.pipeline_stages=2"], ["ZeRO-2", "pipeline"]),
        (["dist.engine=deepspeed", "dist.zero_stage=3", "dist.pipeline_stages=2"], ["ZeRO-3", "zero_stage 0 or 1"]),
        (["dist.engine=deepspeed", "dist.pipeline_stages=6"], ["pipeline_stages 6", "5 pipeline layers"]),
        (["dist.engine=deepspeed", "dist.micro_batch_size=3"], ["micro_batch_size 3", "data.batch_size 4"]),
        (["dist.zero_stage=1"], ["zero_stage: 1 needs engine: deepspeed"]),
        (
            ["dist.engine=deepspeed", "dist.zero_stage=2", "dist.offload_param=true"],
            ["offload_param needs zero_stage: 3"],
        ),
        (["dist.engine=deepspeed", "dist.offload_optimizer=true"], ["offload_optimizer needs zero_stage 1, 2 or 3"]),
        (
            [
                "dist.engine=deepspeed",
                "dist.pipeline_stages=2",
                "model.tie_embeddings=true",
                "model.decoder.d_model=32",
            ],
            ["tie_embeddings"],
        ),
        (["dist.engine=deepspeed", "dist.pipeline_stages=2", "data.memories=mem"], ["data.memories", "pipeline"]),
    ],
)
def test_invalid_combinations_are_refused_before_any_process_group(tiny_data, tmp_path, capsys, sets, needles):
    argv = ["train", str(tmp_path / "c.yaml")]
    write_yaml(tmp_path / "c.yaml", tiny_raw(tiny_data.shards, tmp_path / "run", sets))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memtrain: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_stages_that_do_not_divide_the_ranks_stop_before_the_process_group(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data.shards, tmp_path / "run", "dist.engine=deepspeed", "dist.pipeline_stages=2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"pipeline_stages 2 does not divide the 3 rank\(s\)"):
        train(cfg)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_the_deepspeed_launchers_local_size_reaches_the_data_loader(monkeypatch):
    """The deepspeed launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE; without the copy, streaming takes every rank
    for a node of its own and ranks of one machine race for the same shared memory."""
    from memtrain.engine.distributed import adopt_launcher_env

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # so that monkeypatch restores the original (or its absence)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert adopt_launcher_env() == ["LOCAL_WORLD_SIZE"] and os.environ["LOCAL_WORLD_SIZE"] == "2"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's own value wins
    assert adopt_launcher_env() == [] and os.environ["LOCAL_WORLD_SIZE"] == "4"


# ----------------------------------------------------------------------------------------------------
# ZeRO 0-3 on 2 ranks == one process


@pytest.mark.parametrize("stage", [0, 1, 3])
@pytest.mark.distributed
def test_zero_stage_on_two_ranks_equals_one_process(stage, reference, tiny_data, tmp_path):
    """ZeRO 0/1/3 with 2 ranks x 4 rows (started by torchrun) train like one process with batches of 8. ZeRO-3
    runs the curriculum (its second stage freezes the encoder: DeepSpeed keeps it exactly as it was at the
    boundary). The DeepSpeed launcher's own runs, one node of two ranks and two nodes of one, are compared in
    tests/test_multinode.py."""
    extra = (CURRICULUM,) if stage == 3 else ()
    run = tmp_path / f"zero{stage}"
    config = write_yaml(
        tmp_path / "c.yaml",
        tiny_raw(tiny_data.shards, run, [*RUN, "dist.engine=deepspeed", f"dist.zero_stage={stage}", *extra]),
    )
    done = torchrun(config)
    assert f"2 rank(s) on cpu (DeepSpeed ZeRO-{stage}, fp32" in done.stdout
    ref = reference["curriculum" if stage == 3 else "plain"]
    same_losses(run, ref, STEPS)
    assert_close_weights(weights(run, STEPS), weights(ref, STEPS))
    if stage == 3:
        w3, w6 = weights(run, 3), weights(run, STEPS)
        enc = [k for k in w3 if k.startswith("encoder.")]
        assert enc and all(torch.equal(w3[k], w6[k]) for k in enc)
        assert not torch.equal(w3["lm_head.weight"], w6["lm_head.weight"])
    # the DeepSpeed files convert to the consolidated file the engine wrote at save time
    out = tmp_path / "converted"
    assert main(["convert", "deepspeed", str(run), "--out", str(out)]) == 0
    converted, saved = load_file(str(out / "model.safetensors")), weights(run, STEPS)
    assert sorted(converted) == sorted(saved) and all(torch.equal(converted[k], saved[k]) for k in saved)
    meta = ckpt.read_meta(run / "checkpoints" / f"step_{STEPS:07d}")
    assert meta["engine"]["name"] == "deepspeed" and meta["engine"]["zero_stage"] == stage
    assert (run / "checkpoints" / f"step_{STEPS:07d}" / "ds" / "state").is_dir()


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_killed_and_resumed_gives_the_same_next_losses(reference, tiny_data, tmp_path, capsys):
    run = tmp_path / "zero2"
    config = write_yaml(
        tmp_path / "c.yaml", tiny_raw(tiny_data.shards, run, [*KILL_RUN, "dist.engine=deepspeed", "dist.zero_stage=2"])
    )
    check_kill_and_resume(config, run, reference["long"])
    # the data position counts the global batch
    state = torch.load(
        run / "checkpoints" / "step_0000010" / "ds" / "state" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )
    assert state["step"] == 10 and state["loader"]["streaming"]["sample_in_epoch"] == 10 * BATCH * 2
    # memtrain eval reads the DeepSpeed run directly (its consolidated model.safetensors)
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--objectives", "causal"]) == 0
    assert "| tiny | causal |" in capsys.readouterr().out
    # resuming with another number of ranks stops with how to go on
    cfg = tiny_config(tiny_data.shards, run, *KILL_RUN, "dist.engine=deepspeed", "dist.zero_stage=2")
    with pytest.raises(
        UserError,
        match=r"saved by 2 rank\(s\).*resume with 2 rank\(s\), or convert the "
        r"checkpoint \(memtrain convert deepspeed",
    ):
        train(cfg, resume=True)
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------------
# one in-process rank


def test_single_rank_bf16_resumes_exactly_and_converts_to_fp32_master_weights(tiny_data, tmp_path):
    """A DeepSpeed run without a launcher (rank variables set in-process), bf16 with ZeRO-1: stopped and
    resumed it equals the uninterrupted run; conversion gives the fp32 master weights, not bf16 ones."""
    args = (
        "train.steps=6",
        "train.log_every=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "dist.engine=deepspeed",
        "dist.zero_stage=1",
        "train.precision=bf16",
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny_config(tiny_data.shards, whole, *args))
    cfg = tiny_config(tiny_data.shards, parts, *args)
    assert train(cfg, stop_after=2)["step"] == 2
    assert "RANK" not in os.environ and not torch.distributed.is_initialized()
    train(cfg, resume=True)
    ra, rb = records(whole), records(parts)
    assert [ra[s]["loss/total"] for s in range(1, 7)] == [rb[s]["loss/total"] for s in range(1, 7)]
    saved = weights(whole, 6)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())  # really fp32 values
    assert main(["convert", "deepspeed", str(whole), "--out", str(tmp_path / "conv")]) == 0
    converted = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert all(torch.equal(converted[k], saved[k]) for k in saved)
    assert all(torch.equal(a, b) for a, b in zip(saved.values(), weights(parts, 6).values()))


@pytest.mark.parametrize(
    "sets",
    [
        ("dist.engine=deepspeed", "dist.zero_stage=2", "dist.offload_optimizer=true"),
        (
            "dist.engine=deepspeed",
            "dist.zero_stage=3",
            "dist.offload_optimizer=true",
            "dist.offload_param=true",
            "dist.activation_checkpointing=true",
        ),
        ("dist.activation_checkpointing=true",),
    ],
)
def test_offload_and_activation_checkpointing_train_like_the_plain_engine(sets, tiny_data, tmp_path):
    """ZeRO-Offload (the torch AdamW steps the CPU master copy; no cpu_adam build) and recomputed activations
    change where tensors live and when they are computed, not the numbers."""
    args = ("train.steps=4", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0")
    train(tiny_config(tiny_data.shards, tmp_path / "plain", *args))
    train(tiny_config(tiny_data.shards, tmp_path / "other", *args, *sets))
    same_losses(tmp_path / "other", tmp_path / "plain", 4, atol=1e-6)
    assert_close_weights(weights(tmp_path / "other", 4), weights(tmp_path / "plain", 4), atol=1e-6)


def test_convert_refuses_what_is_not_a_deepspeed_checkpoint(tiny_data, tmp_path, capsys):
    run = tmp_path / "plain"
    train(tiny_config(tiny_data.shards, run, "train.steps=2", "train.eval_every=0", "train.ckpt_every=0"))
    for argv, needle in (
        (["convert", "deepspeed", str(run), "--out", str(tmp_path / "o")], "not a DeepSpeed"),
        (["convert", "deepspeed", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "checkpoint not found"),
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
