"""Preemption checks spaced by ``train.stop_check_every``: the ranks' agreement (an all-reduce that waits for the
device) runs only at every ``stop_check_every``-th step, at checkpoint steps and at the last step, the same steps
on every rank; a single process still stops right after the step in which the signal came; and a 2-rank run
preempted by SIGUSR1 at several steps (on one rank at a time) resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, rank_env, records, tiny_config, tiny_raw, write_yaml
from safetensors.torch import load_file

from memtrain.engine import checkpoint as ckpt
from memtrain.engine import trainer as trainer_mod
from memtrain.engine.preempt import Preemption

STEPS, EVERY, CKPT = 14, 4, 6
#: (rank that gets SIGUSR1, step in which it gets it, --stop-after or None) per attempt of the preempted run.
#: Checks run at steps 4, 8, 12 (every 4), 6 (checkpoint) and at an attempt's last step.
PLAN = [
    (1, 1, None),  # rank 1 only, step 1 -> the ranks agree at step 4
    (0, 5, None),  # rank 0, step 5 -> step 6, a checkpoint step (written once)
    (1, 9, 3),  # --stop-after 3 from step 6: the attempt's last step 9 is checked -> preempted at 9
    (0, 10, None),  # step 10 -> 12
    (None, None, None),  # no signal: 12 -> 14, complete
]
EXPECTED_STOPS = [4, 6, 9, 12, STEPS]
#: steps < STEPS where a run of all STEPS steps checks collectively: multiples of EVERY or CKPT
CHECK_STEPS = [s for s in range(1, STEPS) if s % EVERY == 0 or s % CKPT == 0]

DRIVER = textwrap.dedent('''
    """One rank of the test: the uninterrupted run, then the preempted attempts; one JSON file per rank."""
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    import memtrain.engine.trainer as trainer_mod
    from memtrain.config import load_config
    from memtrain.engine import checkpoint as ckpt
    from memtrain.engine.preempt import Preemption

    ref_cfg, run_cfg, out, ports, plan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    ports = ports.split(",")
    rank = int(os.environ["RANK"])
    counts = {"flag_all_reduce": 0, "should_stop": 0, "collective": 0}
    signal_at = {"step": None}

    real_all_reduce = dist.all_reduce
    def counting_all_reduce(t, *a, **k):
        if t.dtype == torch.int32 and t.numel() == 1:  # Preemption.should_stop's flag
            counts["flag_all_reduce"] += 1
        return real_all_reduce(t, *a, **k)
    dist.all_reduce = counting_all_reduce

    real_should_stop = Preemption.should_stop
    def counting_should_stop(self, distributed, device, collective=True):
        counts["should_stop"] += 1
        counts["collective"] += bool(collective)
        return real_should_stop(self, distributed, device, collective)
    Preemption.should_stop = counting_should_stop

    real_build = trainer_mod.build_engine
    def build_engine(cfg, *a, **k):
        engine = real_build(cfg, *a, **k)
        step_fn = engine.train_step
        latest = ckpt.latest_checkpoint(cfg.run.out_dir)
        done = {"step": latest.step if latest else 0}
        def train_step(*a, **k):
            result = step_fn(*a, **k)
            done["step"] += 1
            if done["step"] == signal_at["step"]:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, to this rank only, in this step
            return result
        engine.train_step = train_step
        return engine
    trainer_mod.build_engine = build_engine

    results = []
    for i, (cfg_path, who, at, stop_after) in enumerate([(ref_cfg, None, None, None)]
                                                       + [(run_cfg, *p) for p in plan]):
        os.environ["MASTER_PORT"] = ports[i]
        signal_at["step"] = at if who == rank else None
        for k in counts:
            counts[k] = 0
        s = trainer_mod.train(load_config(cfg_path), resume=i > 1, stop_after=stop_after)
        results.append({"step": s["step"], "preempted": bool(s.get("preempted")),
                        "complete": bool(s.get("complete")), **counts})
    with open(out, "w") as f:
        json.dump(results, f)
''')


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preempt_sync")
    args = [
        f"train.steps={STEPS}",
        "train.log_every=1",
        f"train.ckpt_every={CKPT}",
        "train.eval_every=0",
        "train.keep_ckpts=20",
        f"train.stop_check_every={EVERY}",
        "dist.timeout_s=60",
    ]
    ref = write_yaml(root / "ref.yaml", tiny_raw(tiny_data.shards, root / "ref", args))
    run = write_yaml(root / "run.yaml", tiny_raw(tiny_data.shards, root / "run", args))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    ports = ",".join(map(str, _free_ports(len(PLAN) + 1)))
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(driver),
                    str(ref),
                    str(run),
                    str(root / f"rank{rank}.json"),
                    ports,
                    json.dumps(PLAN),
                ],
                env=env,
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return {
        "ref": root / "ref",
        "run": root / "run",
        "out": outs,
        "ranks": [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)],
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_both_ranks_stop_after_the_same_check_step_wherever_the_signal_came(two_ranks):
    r0, r1 = two_ranks["ranks"]
    assert [a["step"] for a in r0[1:]] == [a["step"] for a in r1[1:]] == EXPECTED_STOPS
    for a0, a1 in zip(r0, r1):
        assert (a0["preempted"], a0["complete"]) == (a1["preempted"], a1["complete"])
    assert [a["preempted"] for a in r0[1:]] == [True] * (len(PLAN) - 1) + [False]
    assert r0[0]["complete"] and r0[-1]["complete"]
    run = two_ranks["run"]
    # every preemption checkpointed its step, plus the periodic checkpoints; the marker is gone once complete
    assert [c.step for c in ckpt.list_checkpoints(run)] == [4, 6, 9, 12, 14]
    assert not (run / "PREEMPTED").exists()
    # rank 0 (which logs) learnt of rank 1's signals from the collective, and of its own from its handler
    log = two_ranks["out"][0]
    for step, reason in zip(EXPECTED_STOPS, ["peer", "SIGUSR1", "peer", "SIGUSR1"]):
        assert f"preempted ({reason}) after step {step};" in log, log[-3000:]
    assert ckpt.load_trainer_state(run / "checkpoints" / "step_0000004")["step"] == 4


@pytest.mark.distributed
@pytest.mark.slow
def test_preempted_run_resumes_to_the_uninterrupted_weights_and_losses(two_ranks):
    ref, run = two_ranks["ref"], two_ranks["run"]
    a, b = records(ref), records(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for key in ("loss/total", "loss/causal", "loss/copy", "accuracy/causal", "lr"):
            assert b[s][key] == a[s][key], (s, key)
    wa, wb = _weights(ref, STEPS), _weights(run, STEPS)
    assert sorted(wa) == sorted(wb) and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.distributed
@pytest.mark.slow
def test_collective_runs_once_per_stop_check_every_steps(two_ranks):
    for results in two_ranks["ranks"]:
        ref = results[0]
        # asked after every step but the last, but all-reduced only before the first step and at check steps
        assert ref["should_stop"] == 1 + (STEPS - 1)
        assert ref["collective"] == ref["flag_all_reduce"] == 1 + len(CHECK_STEPS) == 5
        # the last attempt (12 -> 14): start-up, step 13 is neither a check step nor the last step checked
        assert results[-1]["flag_all_reduce"] == 1


def test_should_stop_without_collective_does_not_communicate(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    p = Preemption(signals=())
    p.requested = "SIGUSR1"
    assert p.should_stop(True, torch.device("cpu"), collective=False) is False
    assert p.should_stop(False, torch.device("cpu"), collective=False) is True  # one process: its own flag
    assert calls == []


def test_one_process_stops_right_after_the_signalled_step(tiny_data, tmp_path, monkeypatch):
    """stop_check_every 10 does not delay a single process: the signal in step 3 stops it after step 3."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(a))
    real_build = trainer_mod.build_engine

    def build_engine(*a, **k):
        engine = real_build(*a, **k)
        step_fn, n = engine.train_step, [0]

        def train_step(*a, **k):
            result = step_fn(*a, **k)
            n[0] += 1
            if n[0] == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return result

        engine.train_step = train_step
        return engine

    monkeypatch.setattr(trainer_mod, "build_engine", build_engine)
    cfg = tiny_config(
        tiny_data.shards,
        tmp_path / "run",
        "train.steps=20",
        "train.stop_check_every=10",
        "train.ckpt_every=0",
        "train.eval_every=0",
        "train.log_every=1",
    )
    summary = trainer_mod.train(cfg)
    assert summary["preempted"] and summary["step"] == 3
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "run")] == [3]
    assert json.loads((tmp_path / "run" / "PREEMPTED").read_text())["step"] == 3
    assert calls == []  # no process group, no collective


def test_the_resource_tracker_does_not_die_of_the_preemption_signal():
    """Slurm signals every process of a step: the tracker of the loader's shared memory, which
    ``memtrain train`` starts with its preemption handler, must survive USR1 (else its successor prints a
    KeyError per segment at exit). In a fresh process, as ``memtrain train`` is."""
    script = textwrap.dedent("""\
        import os, signal, time
        from multiprocessing import resource_tracker
        from memtrain.engine.preempt import Preemption
        p = Preemption()
        pid = resource_tracker._resource_tracker._pid
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        print("alive" if os.waitpid(pid, os.WNOHANG) == (0, 0) else "died", p.requested)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.split() == ["alive", "None"], out.stdout + out.stderr
