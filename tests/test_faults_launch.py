"""Launch-path faults: stale preemption markers and bounded requeues, overrides that keep their type, collective
timeouts, and the preemption signal reaching the ranks (not the launchers) with the whole grace period.

Rendered batch scripts run under bash with fake ``srun`` / ``scontrol`` / ``sbatch`` on PATH (no cluster):
the fake ``srun`` runs its command as one task in a new session and records its pid; the test then plays
slurmstepd and sends the ``#SBATCH --signal`` to that task's process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import FAKE_PYTHON, fake_bin, job_env, render_job, run_job, tiny_cfg, tiny_raw, use_python, write_yaml

from memtrain.cli import main
from memtrain.config import load_config
from memtrain.launch.sweep import expand

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------------------------------------------
# R1: stale markers, bounded requeues


def _preempt_job(tmp_path, fake_cluster, *flags):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_cfg(tmp_path, run_dir)
    script = render_job(tmp_path, [str(cfg), "--partition", "cpu", *flags])
    bin_dir = fake_bin(tmp_path, FAKE_PYTHON)
    use_python(script, bin_dir / "fakepython")
    return script, bin_dir, run_dir


@pytest.mark.slurm
def test_stale_marker_does_not_requeue_an_attempt_that_fails_before_training(tmp_path, fake_cluster):
    script, bin_dir, run_dir = _preempt_job(tmp_path, fake_cluster)
    # attempt 0 was preempted and left its marker; attempt 1 fails before training starts
    (run_dir / "PREEMPTED").write_text(json.dumps({"step": 5, "signal": "SIGUSR1", "attempt": "4242.0"}))
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_RESTART_COUNT=1, FAKE_MODE="fail"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert not (tmp_path / "fakelog" / "scontrol.log").exists(), "requeued on a stale marker"
    assert "requeueing" not in out.stdout
    assert not (run_dir / "PREEMPTED").exists()  # cleared when the attempt started


@pytest.mark.slurm
def test_marker_of_this_attempt_requeues(tmp_path, fake_cluster):
    script, bin_dir, run_dir = _preempt_job(tmp_path, fake_cluster)
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_RESTART_COUNT=3, FAKE_MODE="preempt"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "fakelog" / "scontrol.log").read_text() == "requeue 4242\n"
    assert "requeueing job 4242 (requeue 4 of 20)" in out.stdout
    assert json.loads((run_dir / "PREEMPTED").read_text())["attempt"] == "4242.3"


@pytest.mark.slurm
def test_requeues_are_bounded(tmp_path, fake_cluster):
    script, bin_dir, run_dir = _preempt_job(tmp_path, fake_cluster, "--max-requeues", "2")
    assert "export MEMTRAIN_MAX_REQUEUES=2" in script.read_text()
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_RESTART_COUNT=2, FAKE_MODE="preempt"))
    assert out.returncode == 75
    assert not (tmp_path / "fakelog" / "scontrol.log").exists()
    assert (
        "not requeueing: job 4242 was requeued 2 time(s), slurm.max_requeues is 2; resubmit to continue "
        "from the newest checkpoint"
    ) in out.stdout


@pytest.mark.slurm
def test_marker_of_another_attempt_is_ignored(tmp_path, fake_cluster):
    script, bin_dir, run_dir = _preempt_job(tmp_path, fake_cluster)
    # a stray process of attempt 0 writes its marker while attempt 1 fails
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_RESTART_COUNT=1, FAKE_MODE="stray"))
    assert out.returncode == 1
    assert "was not written by this attempt (4242.1); not requeueing" in out.stdout
    assert not (tmp_path / "fakelog" / "scontrol.log").exists()


# ------------------------------------------------------------------------------------------------------
# R4: overrides keep their values


@pytest.mark.slurm
def test_submit_time_and_account_flags_are_text(tmp_path, fake_cluster, capsys):
    rc = main(
        [
            "submit",
            str(ROOT / "yaml/tiny.yaml"),
            "--partition",
            "cpu",
            "--time",
            "10:00:00",
            "--account",
            "12345",
            "--dry-run",
            "--workdir",
            str(tmp_path),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "#SBATCH --time=10:00:00" in out and "#SBATCH --account=12345" in out
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    frozen = load_config(job / "config.yaml")
    assert (frozen.slurm.time, frozen.slurm.account) == ("10:00:00", "12345")


def test_set_text_fields_are_not_yaml_numbers():
    cfg = load_config(
        ROOT / "yaml/tiny.yaml",
        ["slurm.time=10:00:00", "slurm.account=12345", "run.name=007", "optim.lr=3e-4", "slurm.nodes=2"],
    )
    assert (cfg.slurm.time, cfg.slurm.account, cfg.run.name) == ("10:00:00", "12345", "007")
    assert cfg.optim.lr == 3e-4 and cfg.slurm.nodes == 2


def test_unquoted_time_in_a_file_is_refused_with_a_hint(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("slurm:\n  time: 10:00:00\n")
    assert main(["submit", str(p), "--dry-run", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slurm.time: write the time limit as a quoted string" in err


def test_sweep_out_dir_with_hash_gives_one_dir_per_point(tmp_path):
    out_dir = tmp_path / "sweep #1"
    p = tmp_path / "grid.yaml"
    p.write_text(
        f"name: g\nbase: {ROOT / 'yaml/tiny.yaml'}\nout_dir: '{out_dir}'\n"
        "set: {slurm.time: '10:00:00', slurm.account: '12345'}\n"
        "grid:\n  model.decoder.d_model: [32, 64]\n"
    )
    _, points = expand(p)
    dirs = [pt.cfg.run.out_dir for pt in points]
    assert dirs == [str(out_dir / "g-000"), str(out_dir / "g-001")]
    assert {(pt.cfg.slurm.time, pt.cfg.slurm.account) for pt in points} == {("10:00:00", "12345")}


# ------------------------------------------------------------------------------------------------------
# R7: a rank that hangs or never joins ends the others within dist.timeout_s

WORKER = textwrap.dedent("""\
    import os, sys, time
    rank = int(os.environ["RANK"])
    if rank == 1 and sys.argv[1] == "absent":
        time.sleep(300)  # never joins the process group
    import torch
    import torch.distributed as dist
    from memtrain.config import config_from_dict
    from memtrain.engine.distributed import init_distributed
    cfg = config_from_dict({"dist": {"timeout_s": 3}})
    try:
        info = init_distributed("cpu", "gloo", "plain", cfg.dist.timeout_s)
        if rank == 1:
            time.sleep(300)  # joined, then hangs before the collective
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # noqa: BLE001
        print("collective failed:", exc, flush=True)
        # without the interpreter's teardown: after a timed-out collective, gloo's threads can abort it
        # ("terminate called without an active exception", SIGABRT) before the exit code is set
        os._exit(3 if "timed out" in str(exc).lower() or "timeout" in str(exc).lower() else 4)
    sys.exit(0)
    """)


@pytest.mark.parametrize("case", ["hangs", "absent"])
@pytest.mark.distributed
def test_collective_times_out_when_a_rank_hangs_or_never_joins(tmp_path, case):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(
        os.environ,
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    peer = subprocess.Popen(
        [PY, str(script), case],
        env=dict(base, RANK="1", LOCAL_RANK="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [PY, str(script), case],
            env=dict(base, RANK="0", LOCAL_RANK="0"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        elapsed = time.monotonic() - t0
    finally:
        peer.kill()
        peer.wait()
    assert out.returncode == 3, out.stdout + out.stderr
    assert elapsed < 3 + 40


# ------------------------------------------------------------------------------------------------------
# R8: the preemption signal reaches the ranks, not the launchers; a signal during start-up is not fatal


def _signal_of(script: Path) -> signal.Signals:
    m = re.search(r"(?m)^#SBATCH --signal=(?:B:)?([A-Z0-9]+)@\d+$", script.read_text())
    return signal.Signals["SIG" + m.group(1)]


def _catches(pid: int, sig: signal.Signals) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def _task_pid(log: Path, proc: subprocess.Popen, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return int((log / "task.pid").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise AssertionError("the fake srun never started its task")


def _real_job(tmp_path, tiny_data, *flags, overrides=()):
    run_dir = tmp_path / "run"
    raw = tiny_raw(
        tiny_data.shards,
        run_dir,
        ["train.steps=100000", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1", *overrides],
    )
    cfg = write_yaml(tmp_path / "cfg.yaml", raw)
    # a 100,000-step run must name its time limit; one CPU per task, as this machine has few
    script = render_job(
        tmp_path, [str(cfg), "--partition", "cpu", "--time", "01:00:00", "--cpus-per-task", "1", *flags]
    )
    return script, run_dir


@pytest.mark.slurm
def test_signal_during_start_up_exits_75_and_requeues(tmp_path, fake_cluster, tiny_data):
    script, run_dir = _real_job(tmp_path, tiny_data)
    bin_dir = fake_bin(tmp_path)
    env = job_env(tmp_path, bin_dir, OMP_NUM_THREADS=1)
    log = tmp_path / "fakelog"
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = _task_pid(log, proc)
        sig = _signal_of(script)
        deadline = time.monotonic() + 1.0  # the rank is still importing torch by then
        while time.monotonic() < deadline and not _catches(pid, sig):
            time.sleep(0.01)
        os.killpg(pid, sig)  # slurmstepd signals the task
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert (log / "scontrol.log").read_text() == "requeue 4242\n", out
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["attempt"] == "4242.0" and marker["step"] == 0
    rank_log = "".join(p.read_text() for p in (script.parent / "logs").glob("*.out"))
    assert "signal came during start-up" in (rank_log + out)


@pytest.mark.distributed
@pytest.mark.slurm
def test_torchrun_ranks_get_the_signal_and_are_not_killed_by_the_agent(tmp_path, fake_cluster, tiny_data):
    script, run_dir = _real_job(tmp_path, tiny_data, "--launcher", "torchrun", "--tasks-per-node", "2")
    bin_dir = fake_bin(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a grace of 0 s in torchrun's agent: a rank the agent shuts down is SIGKILLed at once, before it can
    # write any checkpoint; the ranks must get the signal without the agent acting on it
    env = job_env(tmp_path, bin_dir, OMP_NUM_THREADS=1, MASTER_PORT=port, TORCH_ELASTIC_SHUTDOWN_TIMEOUT=0)
    log = tmp_path / "fakelog"
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = _task_pid(log, proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        os.killpg(pid, _signal_of(script))  # slurmstepd signals the task (the workers run in their own sessions)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (log / "scontrol.log").read_text() == "requeue 4242\n", out
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    assert marker["attempt"] == "4242.0" and marker["step"] >= 1
    assert list((run_dir / "checkpoints").glob(f"step_{marker['step']:07d}*")), out
    assert proc.returncode == 0
