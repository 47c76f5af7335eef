"""Fault injection: a tiny run that checkpoints every step is SIGKILLed at 20 random moments (fixed seed),
many of them in the middle of a checkpoint write, and a few times its newest checkpoint is also damaged (as
a host crash can leave a file whose data never reached the disk). After each kill ``memtrain train --resume``
continues from the newest complete checkpoint; at the end the logged losses and the final weights equal an
uninterrupted run's exactly (CPU, fp32, one thread).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import records, tiny_config, tiny_raw, write_yaml
from safetensors.torch import load_file

from memtrain.engine import checkpoint as ckpt
from memtrain.engine.trainer import train

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS = 100
KILLS = 12
SEED = 20240611
SETS = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=1", "train.keep_ckpts=2"]


def _staged(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    try:
        return [p for p in folder.iterdir() if ".tmp-" in p.name]
    except OSError:
        return []


def _latest_step(run: Path) -> int:
    """Newest committed step (no content check: cheap enough to poll)."""
    try:
        refs = ckpt.list_checkpoints(run)
    except OSError:  # a folder renamed away while it was listed
        return -1
    return refs[-1].step if refs else 0


def _damage(ck: Path, rng: random.Random) -> str:
    name = rng.choice(["model.safetensors", "trainer.pt"])
    data = (ck / name).read_bytes()
    (ck / name).write_bytes(data[: rng.randrange(len(data))])  # truncated, as after a crash before fsync
    return name


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_data, tmp_path):
    rng = random.Random(SEED)
    run = tmp_path / "killed"
    config = write_yaml(tmp_path / "run.yaml", tiny_raw(tiny_data.shards, run, SETS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "memtrain", "train", str(config), "--resume"]
    during_save = damaged = 0
    expected_start = 0
    for i in range(KILLS):
        log = tmp_path / f"out{i}.txt"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start, deadline = _latest_step(run), time.time() + 90
            # let it make progress first (at least one new checkpoint), so the run moves on between kills
            while _latest_step(run) <= max(start, 0) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            if rng.random() < 0.7:  # in the middle of a checkpoint write: when its staging folder appears
                while not _staged(run) and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.004))
            else:
                time.sleep(rng.uniform(0, 0.25))
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        text = log.read_text()
        assert proc.returncode == -signal.SIGKILL, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        if expected_start:
            assert re.search(rf"resumed from \S+step_{expected_start:07d} at step {expected_start};", text), (
                expected_start,
                text[-2000:],
            )
        during_save += any(f".tmp-{proc.pid}" in p.name or ".tmp-del-" in p.name for p in _staged(run))
        latest = ckpt.latest_checkpoint(run)
        assert latest is not None and ckpt.checkpoint_problem(latest.path) is None
        assert latest.step < STEPS, "the run finished before all kills; raise STEPS"
        refs = ckpt.list_checkpoints(run)
        if i % 5 == 2 and len(refs) >= 2:  # now and then a crash also damages the newest checkpoint
            _damage(refs[-1].path, rng)
            damaged += 1
            expected_start = ckpt.latest_checkpoint(run).step
            assert expected_start == refs[-2].step  # the previous complete one, left as it was
        else:
            expected_start = latest.step
    assert during_save >= 4, during_save  # the kills did hit checkpoint writes
    assert damaged >= 2

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {expected_start};" in done.stdout

    whole = tmp_path / "whole"
    train(tiny_config(tiny_data.shards, whole, *SETS))
    a, b = records(run), records(whole)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        for key in b[s]:
            if key.startswith(("loss/", "accuracy/")) or key in ("lr", "grad_norm"):
                assert a[s][key] == b[s][key], (s, key)
    wa = load_file(str(run / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    wb = load_file(str(whole / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
