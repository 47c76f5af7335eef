"""The training engine: loss goes down, exact resume (in process, across a curriculum boundary, after a real
SIGKILL), atomic checkpoints, data position, TensorBoard scalars, and a two-rank torchrun run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import records, tiny_config, tiny_raw, weights, write_yaml

from memtrain.engine import checkpoint as ckpt
from memtrain.engine.trainer import train

CURRICULUM = (
    "curriculum=[{name: joint, steps: 6, weights: {causal: 1.0, copy: 0.5}}, "
    "{name: decoder, steps: 6, weights: {causal: 1.0}, freeze: [encoder]}]"
)


def ckpt_steps(run_dir: Path) -> list[int]:
    return [r.step for r in ckpt.list_checkpoints(run_dir)]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> None:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefix))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], steps) -> None:
    for s in steps:
        for key in ("loss/total", "loss/causal", "accuracy/causal", "lr"):
            if key in a[s]:
                assert b[s][key] == pytest.approx(a[s][key], rel=0, abs=1e-6), (s, key)


# ----------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(tiny_data, tmp_path):
    cfg = tiny_config(
        tiny_data.shards,
        tmp_path / "run",
        "train.steps=60",
        "train.log_every=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
    )
    summary = train(cfg)
    losses = [r["loss/total"] for _, r in sorted(records(tmp_path / "run").items())]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    assert summary["complete"] and summary["step"] == 60
    assert set(summary["eval"]) == {"causal", "copy"}
    assert ckpt_steps(tmp_path / "run") == [60]  # ckpt_every 0: only the final checkpoint
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 60


@pytest.fixture(scope="module")
def single_stage(tiny_data, tmp_path_factory) -> dict:
    """Run A: 12 steps uninterrupted. Run B: the same config stopped after 4 steps, then resumed."""
    root = tmp_path_factory.mktemp("resume")
    args = ("train.steps=12", "train.log_every=1", "train.ckpt_every=3", "train.eval_every=4", "train.keep_ckpts=10")
    a = tiny_config(tiny_data.shards, root / "a", *args)
    b = tiny_config(tiny_data.shards, root / "b", *args)
    train(a)
    stopped = train(b, stop_after=4)
    resumed = train(b, resume=True)
    return {"a": root / "a", "b": root / "b", "stopped": stopped, "resumed": resumed, "k": 4, "n": 12}


def test_stop_and_resume_gives_the_same_next_losses(single_stage):
    a, b, k, n = single_stage["a"], single_stage["b"], single_stage["k"], single_stage["n"]
    assert single_stage["stopped"] == {"step": k, "eval": {}, "run_dir": str(b), "complete": False}
    assert single_stage["resumed"]["complete"] and single_stage["resumed"]["step"] == n
    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb) == list(range(1, n + 1))
    assert_same_losses(ra, rb, range(k + 1, n + 1))
    # evaluation after the resume point sees the same model
    ea, eb = records(a, "eval"), records(b, "eval")
    assert sorted(ea) == sorted(eb) == [4, 8, 12]
    assert eb[8]["eval/copy/ce"] == pytest.approx(ea[8]["eval/copy/ce"], rel=0, abs=1e-6)
    assert_same_weights(weights(a, n), weights(b, n))
    # the stop wrote a checkpoint at step k although k is not a multiple of ckpt_every
    assert ckpt_steps(a) == [3, 6, 9, 12] and ckpt_steps(b) == [3, 4, 6, 9, 12]


def test_checkpoint_holds_the_data_position(single_stage):
    """The loader state in trainer.pt advanced by steps x batch size; the resumed run read on from there."""
    b, k = single_stage["b"], single_stage["k"]
    for step in (3, k, 12):
        state = ckpt.load_trainer_state(b / "checkpoints" / f"step_{step:07d}")
        assert state["step"] == step
        assert state["loader"]["streaming"]["sample_in_epoch"] == step * 4  # batch_size 4, one rank
        assert state["loader"]["streaming"]["epoch"] == 0


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def tensorboard_scalars(run_dir: Path, tag: str) -> list:
    return tensorboard(run_dir).Scalars(tag)


def test_tensorboard_scalars(single_stage):
    b = single_stage["b"]
    assert list((b / "tb").glob("events.out.tfevents.*"))
    acc = tensorboard(b)
    tags = set(acc.Tags()["scalars"])
    want = {
        "loss/total",
        "loss/causal",
        "loss/copy",
        "accuracy/causal",
        "accuracy/copy",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "eval/causal/ce",
        "eval/copy/ce",
    }
    assert want <= tags, want - tags
    # after the resume every step appears once (steps 5.. of the first part purged, step 4 kept)
    total = acc.Scalars("loss/total")
    assert [e.step for e in total] == list(range(1, 13))
    ra = records(single_stage["a"])
    for e in total:
        assert e.value == pytest.approx(ra[e.step]["loss/total"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/causal/ce")] == [4, 8, 12]
    assert all(e.value > 0 for e in acc.Scalars("tokens_per_s"))


def test_resume_across_a_curriculum_boundary_keeps_the_encoder_frozen(tiny_data, tmp_path):
    args = (
        "train.steps=12",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.eval_every=0",
        "train.keep_ckpts=10",
        "optim.grad_accum=2",
        CURRICULUM,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(tiny_data.shards, a, *args))
    cfg_b = tiny_config(tiny_data.shards, b, *args)
    train(cfg_b, stop_after=4)  # resume point inside stage 0, before the boundary at step 6
    train(cfg_b, resume=True)
    ra, rb = records(a), records(b)
    assert [ra[s]["stage"] for s in range(1, 13)] == [0] * 6 + [1] * 6
    assert [rb[s]["stage"] for s in range(1, 13)] == [0] * 6 + [1] * 6
    assert "loss/copy" in rb[6] and "loss/copy" not in rb[7]
    assert_same_losses(ra, rb, range(5, 13))
    assert_same_weights(weights(a, 12), weights(b, 12))
    loader = ckpt.load_trainer_state(b / "checkpoints" / "step_0000004")["loader"]
    assert loader["streaming"]["sample_in_epoch"] == 4 * 4 * 2  # steps x batch_size x grad_accum
    for run in (a, b):
        # stage 0 trains the encoder; stage 1 leaves it exactly as it was at the boundary
        assert not torch.equal(weights(run, 4)["encoder.wte.weight"], weights(run, 6)["encoder.wte.weight"])
        assert_same_weights(weights(run, 6), weights(run, 12), prefix="encoder.")
        assert not torch.equal(weights(run, 6)["lm_head.weight"], weights(run, 12)["lm_head.weight"])


def test_sigkill_and_resume_gives_the_same_next_losses(tiny_data, tmp_path):
    """A real `memtrain train` process killed once a checkpoint exists, resumed with --resume."""
    n = 150
    args = [f"train.steps={n}", "train.log_every=1", "train.ckpt_every=10", "train.eval_every=0", "train.keep_ckpts=3"]
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tiny_data.shards, tmp_path / "killed", args))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "memtrain", "train", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ckpt.list_checkpoints(tmp_path / "killed") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    killed_at = ckpt.latest_checkpoint(tmp_path / "killed").step
    assert killed_at < n and not (tmp_path / "killed" / "summary.json").exists()
    before = records(tmp_path / "killed")  # the killed process's own log, past its checkpoint too

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"at step {killed_at};" in done.stdout
    assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr
    after = records(tmp_path / "killed")
    assert sorted(after) == list(range(1, n + 1))
    # both logs hold each step once: what the killed process logged after its checkpoint was dropped
    lines = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, n + 1))
    assert [e.step for e in tensorboard_scalars(tmp_path / "killed", "loss/total")] == list(range(1, n + 1))
    # the resumed process repeats what the killed one computed after the checkpoint...
    overlap = [s for s in before if s > killed_at]
    assert_same_losses(before, after, overlap)
    # ...and equals an uninterrupted run
    train(tiny_config(tiny_data.shards, tmp_path / "whole", *args))
    assert_same_losses(records(tmp_path / "whole"), after, range(killed_at + 1, n + 1))
    assert_same_weights(weights(tmp_path / "whole", n), weights(tmp_path / "killed", n))


def test_restart_of_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_data.shards, run, "train.steps=6", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0"
    )
    train(cfg, stop_after=4)
    shutil.rmtree(run / "checkpoints")  # as if killed at step 4 before any checkpoint was written
    assert sorted(records(run)) == [1, 2, 3, 4]
    train(cfg)  # starts afresh in the same directory
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 7))
    assert [e.step for e in tensorboard_scalars(run, "loss/total")] == list(range(1, 7))


def test_shards_without_a_validation_split_train_without_evaluation(tiny_data, tmp_path, capsys):
    from memtrain.data.ingest import build_shards

    shards = tmp_path / "noval"
    build_shards(
        [str(tiny_data.corpus)], tiny_data.tokenizer, shards, row_len=32, val_fraction=0, workers=1, progress=False
    )
    run = tmp_path / "run"
    summary = train(tiny_config(shards, run, "train.steps=4", "train.eval_every=2", "train.ckpt_every=0"))
    assert summary["complete"] and summary["eval"] == {}
    assert "has no validation split; training without evaluation" in capsys.readouterr().out
    assert ckpt_steps(run) == [4] and sorted(records(run)) == [4] and records(run, "eval") == {}


# ----------------------------------------------------------------------------------------------------
# checkpoints


def test_half_written_checkpoint_is_ignored_then_removed_and_old_ones_pruned(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(
        tiny_data.shards, run, "train.steps=8", "train.ckpt_every=2", "train.keep_ckpts=2", "train.eval_every=0"
    )
    train(cfg, stop_after=4)
    assert ckpt_steps(run) == [2, 4]
    # a save of step 6 killed half-way (it even got as far as meta.json)
    tmp = run / "checkpoints" / "step_0000006.tmp-123"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 100)
    (tmp / "meta.json").write_text("{}")
    assert ckpt.latest_checkpoint(run).step == 4
    capsys.readouterr()
    train(cfg, resume=True, stop_after=1)
    assert "checkpoints/step_0000004 at step 4;" in capsys.readouterr().out
    assert not tmp.exists()  # removed by the next save
    assert ckpt_steps(run) == [4, 5]
    train(cfg, resume=True)
    assert ckpt_steps(run) == [6, 8]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]


def test_failed_save_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    meta = {"kind": "memory"}
    ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, "run: {}\n", meta, keep=2)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, "run: {}\n", meta, keep=2)
    monkeypatch.undo()
    assert ckpt_steps(tmp_path) == [1]
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000001"
    leftovers = list((tmp_path / "checkpoints").glob("step_0000002*"))
    assert [p.name.split(".tmp-")[0] for p in leftovers] == ["step_0000002"]
    ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3}, "run: {}\n", meta, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000003"]


# ----------------------------------------------------------------------------------------------------
# torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_two_ranks(tiny_data, tmp_path):
    steps, batch = 6, 4
    run = tmp_path / "ddp"
    config = write_yaml(
        tmp_path / "ddp.yaml",
        tiny_raw(
            tiny_data.shards,
            run,
            [f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=3", "train.eval_every=0"],
        ),
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "memtrain",
            "train",
            str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s)" in done.stdout
    assert done.stdout.count("| tiny | causal |") == 1  # the result table is printed by rank 0 only
    assert ckpt_steps(run) == [3, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    recs = records(run)
    assert sorted(recs) == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss/total"]) for r in recs.values())
    assert records(run, "eval")[steps]["eval/causal/ce"] > 0
    # two ranks of 4 rows train exactly like one process with batches of 8 (same rows, averaged gradients),
    # and the logged loss is the global batch's
    single = tmp_path / "single"
    train(
        tiny_config(
            tiny_data.shards,
            single,
            f"train.steps={steps}",
            "train.log_every=1",
            "train.ckpt_every=3",
            "train.eval_every=0",
            f"data.batch_size={2 * batch}",
        )
    )
    one = records(single)
    for s in range(1, steps + 1):
        assert recs[s]["loss/total"] == pytest.approx(one[s]["loss/total"], rel=0, abs=1e-5), s
    ddp_w, one_w = weights(run, steps), weights(single, steps)
    assert sorted(ddp_w) == sorted(one_w)
    # (not the mixers' per-position biases: the LayerNorm after them cancels a shift shared by all features, so
    # their gradient is rounding noise, which Adam turns into steps of +-lr that differ with the reduction order)
    compared = [k for k in ddp_w if not k.endswith("conv.bias")]
    assert len(compared) > 20
    for k in compared:
        torch.testing.assert_close(ddp_w[k], one_w[k], rtol=0, atol=1e-4)
    # the data position counts the global batch: batch_size x 2 ranks per step
    for step in (3, 6):
        state = ckpt.load_trainer_state(run / "checkpoints" / f"step_{step:07d}")
        assert state["loader"]["streaming"]["sample_in_epoch"] == step * batch * 2
    # tokens/s counts the global batch too: the time a step of 2 x 4 x 32 tokens takes at the logged rate,
    # summed over steps 2..6, is the wall time between the log records of steps 1 and 6, less the checkpoint
    # write of step 3 that the rate's window leaves out (a rate of one rank's tokens would give a ratio of 0.5)
    at_rate = sum(batch * 2 * 32 / recs[s]["tokens_per_s"] for s in range(2, steps + 1))
    ratio = at_rate / (recs[steps]["time"] - recs[1]["time"])
    assert 0.7 < ratio < 1.25, ratio
