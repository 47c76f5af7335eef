"""Checkpoints and run directories on a shared cluster: what memtrain unpickles, what it refuses, one process
per run directory, and falling back from a damaged newest checkpoint.

* ``trainer.pt`` is read with ``torch.load(weights_only=True)``: a crafted file whose pickle would run code
  is refused with a one-line error naming it, and its payload never runs.
* DeepSpeed unpickles its own files fully; memtrain lets it only after every file matches the checkpoint's
  manifest: planted, extra or modified files are refused before anything is unpickled.
* A second process on a run directory held by another one stops with exit 2 naming the holder, and changes
  nothing (the holder keeps running and finishes).
* A damaged newest checkpoint makes ``--resume`` use the previous complete one, with a warning.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import records, tiny_config, tiny_raw, tree_hash, write_yaml

from memtrain.cli import main
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.trainer import train
from memtrain.errors import UserError

pytestmark = pytest.mark.security

SETS = ("train.steps=6", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=2", "train.keep_ckpts=3")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(capsys, argv: list, *needles: str) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def plain_run(tiny_data, tmp_path):
    """A plain run stopped at step 4 (checkpoints 2 and 4) and its config file."""
    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tiny_data.shards, run, list(SETS)))
    train(tiny_config(tiny_data.shards, run, *SETS), stop_after=4)
    assert [r.step for r in ckpt.list_checkpoints(run)] == [2, 4]
    return run, config


# ----------------------------------------------------------------------------------------------------
# trainer.pt


@pytest.mark.parametrize("fmt", ["zip", "legacy-pickle"])
def test_crafted_trainer_pt_is_refused_and_its_payload_never_runs(plain_run, tmp_path, capsys, fmt):
    run, config = plain_run
    ck = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "pwned"
    state = torch.load(ck / "trainer.pt", weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, ck / "trainer.pt", _use_new_zipfile_serialization=(fmt == "zip"))
    (ck / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(ck)  # whoever can write the file can rewrite the manifest too
    assert ckpt.checkpoint_problem(ck) is None
    err = one_line_error(capsys, ["train", config, "--resume"], str(ck / "trainer.pt"), "refused", "system")
    assert not marker.exists(), err
    with pytest.raises(UserError, match="refused"):
        ckpt.load_trainer_state(ck)
    assert not marker.exists()


def test_trainer_pt_holds_only_tensors_and_plain_data_and_old_ones_still_load(plain_run, tmp_path):
    run, _ = plain_run
    ck = run / "checkpoints" / "step_0000004"
    # no allowlist needed: the RNG states are tensors and lists, not numpy arrays
    state = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=True)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    # a trainer.pt of an older version (numpy's RNG state as its array tuple) still loads, and restores it
    np.random.seed(7)
    random.seed(7)
    old = dict(state, rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()})
    expected = (np.random.rand(3), random.random())
    torch.save(old, ck / "trainer.pt")
    loaded = ckpt.load_trainer_state(ck)
    np.random.seed(0)
    random.seed(0)
    ckpt.set_rng_state(loaded["rng"])
    assert (np.random.rand(3) == expected[0]).all() and random.random() == expected[1]
    # and the new form restores the same states
    saved = ckpt.rng_state()
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    ckpt.set_rng_state(saved)
    assert (np.random.rand(3) == expected[0]).all() and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])


# ----------------------------------------------------------------------------------------------------
# DeepSpeed files


@pytest.fixture
def ds_run(tiny_data, tmp_path):
    pytest.importorskip("deepspeed")

    def make(stage: int) -> tuple[Path, tuple]:
        run = tmp_path / f"ds{stage}"
        sets = (*SETS, "dist.engine=deepspeed", f"dist.zero_stage={stage}")
        train(tiny_config(tiny_data.shards, run, *sets), stop_after=4)
        assert [r.step for r in ckpt.list_checkpoints(run)] == [2, 4]
        return run, sets

    return make


def test_modified_deepspeed_file_is_refused_before_deepspeed_unpickles_it(ds_run, tiny_data, tmp_path, capsys):
    run, sets = ds_run(0)
    ck = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "pwned"
    target = ck / "ds" / "state" / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # the test's own file, trusted
    state["extra"] = Payload(marker)
    torch.save(state, target)
    with pytest.raises(UserError, match=r"step_0000004: refused.*mp_rank_00_model_states.pt differs"):
        ckpt.verify_checkpoint(ck, require_manifest=True)
    # resume skips it (warning naming it) and continues from step 2; the payload never ran
    capsys.readouterr()
    train(tiny_config(tiny_data.shards, run, *sets), resume=True, stop_after=1)
    out = capsys.readouterr()
    assert not marker.exists()
    assert "step_0000004 is damaged (ds/state/mp_rank_00_model_states.pt differs from its manifest.json" in out.err
    assert "at step 2;" in out.out
    # convert refuses the damaged checkpoint outright
    one_line_error(
        capsys,
        ["convert", "deepspeed", ck, "--out", tmp_path / "conv"],
        str(ck),
        "refused",
        "mp_rank_00_model_states.pt differs",
    )
    assert not marker.exists() and not (tmp_path / "conv").exists()


def test_planted_deepspeed_file_is_refused_without_being_unpickled(ds_run, tmp_path, capsys):
    run, _ = ds_run(2)
    ck = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "pwned"
    # DeepSpeed's ZeRO consolidator reads every *_optim_states.pt it finds
    torch.save({"x": Payload(marker)}, ck / "ds" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    one_line_error(
        capsys,
        ["convert", "deepspeed", ck, "--out", tmp_path / "conv"],
        "refused",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is not listed in its manifest.json",
    )
    assert not marker.exists()
    # without a manifest a DeepSpeed checkpoint is incomplete: nothing of it is unpickled
    ck2 = run / "checkpoints" / "step_0000002"
    (ck2 / ckpt.MANIFEST).unlink()
    one_line_error(capsys, ["convert", "deepspeed", ck2, "--out", tmp_path / "conv"], "refused", "manifest.json")
    assert not (tmp_path / "conv").exists()


class SubprocessPayload(Payload):
    def __reduce__(self):
        return subprocess.run, (["touch", str(self.marker)],)


def test_convert_reads_zero0_module_states_with_weights_only(ds_run, tmp_path, capsys):
    """Even a file its manifest vouches for (rewritten by whoever can write the folder) runs nothing: a
    global torch blocks outright is refused, any other one is read as an inert placeholder."""
    run, _ = ds_run(0)
    ck = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "pwned"
    target = ck / "ds" / "state" / "mp_rank_00_model_states.pt"
    clean = torch.load(target, map_location="cpu", weights_only=False)  # the test's own file, trusted
    for payload in (Payload(marker), SubprocessPayload(marker)):
        torch.save(dict(clean, extra=payload), target)
        (ck / ckpt.MANIFEST).unlink()
        ckpt.write_manifest(ck)
        if isinstance(payload, SubprocessPayload):
            capsys.readouterr()
            assert main(["convert", "deepspeed", str(ck), "--out", str(tmp_path / "conv")]) == 0
        else:
            one_line_error(
                capsys, ["convert", "deepspeed", ck, "--out", tmp_path / "conv"], str(target), "refused", "posix.system"
            )
        assert not marker.exists()
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "conv" / "model.safetensors")), load_file(str(ck / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# one process per run directory


@pytest.mark.slow
def test_second_process_on_a_run_directory_is_refused_and_changes_nothing(tiny_data, tmp_path):
    steps = 60
    run = tmp_path / "run"
    config = write_yaml(
        tmp_path / "run.yaml",
        tiny_raw(
            tiny_data.shards,
            run,
            [
                f"train.steps={steps}",
                "train.log_every=1",
                "train.eval_every=0",
                "train.ckpt_every=1",
                "train.keep_ckpts=2",
            ],
        ),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "memtrain", "train", str(config)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        ck = run / "checkpoints"
        # stop the first process in the middle of a save if the polling catches one, else between two
        while time.time() < deadline and first.poll() is None:
            if ck.is_dir() and any(".tmp-" in p.name for p in ck.iterdir()) and ckpt.list_checkpoints(run):
                break
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and ckpt.list_checkpoints(run)
        before = tree_hash(run)
        second = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert str(run) in err[0] and f"pid {first.pid} on host " in err[0] and "in use" in err[0], err
        assert tree_hash(run) == before  # the first one's staged checkpoint and everything else untouched
        # the first process goes on unharmed...
        at = ckpt.latest_checkpoint(run).step
        first.send_signal(signal.SIGCONT)
        while ckpt.latest_checkpoint(run).step < at + 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert first.poll() is None, first.communicate()[1][-2000:]
        # ...and when it dies, even by SIGKILL, the kernel drops its lock: the run resumes
        first.kill()
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    third = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-2000:]
    assert sorted(records(run)) == list(range(1, steps + 1))


# ----------------------------------------------------------------------------------------------------
# damaged newest checkpoint


def _truncate(ck: Path, name: str) -> None:
    data = (ck / name).read_bytes()
    (ck / name).write_bytes(data[: len(data) // 2])


def _flip(ck: Path, name: str) -> None:
    data = bytearray((ck / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / name).write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda ck: _truncate(ck, "model.safetensors"),
        lambda ck: _flip(ck, "model.safetensors"),
        lambda ck: _truncate(ck, "trainer.pt"),
        lambda ck: _flip(ck, "trainer.pt"),
        lambda ck: (ck / "trainer.pt").unlink(),
        lambda ck: (ck / ckpt.MANIFEST).unlink(),
    ],
    ids=[
        "truncated-weights",
        "corrupted-weights",
        "truncated-trainer",
        "corrupted-trainer",
        "missing-trainer",
        "missing-manifest",
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(plain_run, tiny_data, tmp_path, capsys, damage):
    run, _ = plain_run
    damaged, good = run / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000002"
    damage(damaged)
    good_before = tree_hash(good)
    capsys.readouterr()
    cfg = tiny_config(tiny_data.shards, run, *SETS)
    train(cfg, resume=True, stop_after=1)
    out = capsys.readouterr()
    warnings = [ln for ln in out.err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and f"checkpoint {damaged} is damaged (" in warnings[0], out.err
    assert f"previous complete checkpoint {good}" in warnings[0]
    assert f"resumed from {good} at step 2;" in out.out
    assert tree_hash(good) == good_before  # the good one is never touched
    assert [r.step for r in ckpt.list_checkpoints(run)] == [2, 3, 4]
    train(cfg, resume=True)  # on to the end; the damaged step 4 is replaced when the run reaches it
    assert [r.step for r in ckpt.list_checkpoints(run)] == [3, 4, 6]
    assert ckpt.checkpoint_problem(damaged) is None
    whole = tmp_path / "whole"
    train(tiny_config(tiny_data.shards, whole, *SETS))
    a, b = records(run), records(whole)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s]["loss/total"] == b[s]["loss/total"] for s in a)


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(plain_run, capsys):
    run, config = plain_run
    for ref in ckpt.list_checkpoints(run):
        _truncate(ref.path, "model.safetensors")
    before = tree_hash(run)
    one_line_error(capsys, ["train", config, "--resume"], "every checkpoint is damaged", "step_0000004")
    assert tree_hash(run) == before
