"""A real one-node Slurm cluster: `memtrain submit` with 2 tasks, preempted by USR1, requeued, finished.

The cluster (munge, slurmctld, slurmd) is started under a temporary directory by tools/local_slurm.py and
stopped by its PID files. The preempted-and-requeued run must end with the same weights as a run of the
same config that was never interrupted.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_raw, write_yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import local_slurm  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


REQUIRED = os.environ.get("MEMTRAIN_REQUIRE_SLURM") == "1"


def _require_slurm() -> None:
    """Skip unless MEMTRAIN_REQUIRE_SLURM=1 (the test starts its own munge, slurmctld and slurmd, which needs root
    and Debian's Slurm packages, and must never run beside a real cluster's daemons); then Slurm must be here."""
    if not REQUIRED:
        pytest.skip(
            "needs a local one-node Slurm cluster: set MEMTRAIN_REQUIRE_SLURM=1 on a machine with Slurm "
            "installed, as root (.ci/run does)"
        )
    missing = local_slurm.missing_binaries()
    if missing:
        pytest.fail(
            f"MEMTRAIN_REQUIRE_SLURM=1 but {', '.join(missing)} not installed; install with: "
            f"{local_slurm.install_hint()}"
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _require_slurm()
    root = tmp_path_factory.mktemp("slurm")
    env = local_slurm.start(root)
    yield dict(os.environ, **env)
    local_slurm.stop(root)


def _submit(env, cfg_path: Path, workdir: Path) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memtrain",
            "submit",
            str(cfg_path),
            "--tasks-per-node",
            "2",
            "--time",
            "00:10:00",
            "--workdir",
            str(workdir),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[2].rstrip(":")


def _job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "UNKNOWN"


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _wait_done(env, job: str, timeout: float, logs: Path) -> None:
    """Wait for a terminal state; anything but COMPLETED fails with the job's logs."""
    _wait(lambda: _job_state(env, job) in TERMINAL, timeout, f"job {job} to finish")
    state = _job_state(env, job)
    if state != "COMPLETED":
        text = "\n".join(f"== {p}\n" + p.read_text()[-3000:] for p in sorted(logs.glob("*/logs/*.out")))
        raise AssertionError(f"job {job} ended {state}:\n{text}")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_submit_preempt_requeue_finish(cluster, tiny_data, tmp_path):
    steps = 600
    overrides = [
        f"train.steps={steps}",
        "train.ckpt_every=50",
        "train.eval_every=0",
        "train.log_every=50",
        "slurm.signal_seconds=0",
        "optim.warmup_steps=10",
    ]
    runs = {}
    for name in ("straight", "preempted"):
        raw = tiny_raw(tiny_data.shards, tmp_path / "runs" / name, overrides + [f"run.name={name}"])
        runs[name] = write_yaml(tmp_path / f"{name}.yaml", raw)

    job_a = _submit(cluster, runs["straight"], tmp_path)
    _wait_done(cluster, job_a, 300, tmp_path / "slurm-jobs")

    job_b = _submit(cluster, runs["preempted"], tmp_path)
    run_b = tmp_path / "runs" / "preempted"
    _wait(lambda: any((run_b / "checkpoints").glob("step_*/meta.json")), 180, "the first checkpoint of job B")
    subprocess.run(["scancel", "--signal=USR1", job_b], env=cluster, check=True)
    _wait(
        lambda: (run_b / "PREEMPTED").exists() or _job_state(cluster, job_b) in ("PENDING", "REQUEUED"),
        120,
        "job B to checkpoint on USR1",
    )
    _wait_done(cluster, job_b, 300, tmp_path / "slurm-jobs")

    logs = "".join(p.read_text() for p in (tmp_path / "slurm-jobs").glob("preempted-*/logs/*.out"))
    assert "preempted (SIGUSR1) after step" in logs and "requeueing job" in logs
    assert "restart 1" in logs  # the requeued run of the same job
    assert len(list((tmp_path / "slurm-jobs").glob("preempted-*/logs/*rank1.out"))) == 1  # one log per rank
    summary = json.loads((run_b / "summary.json").read_text())
    assert summary["complete"] and summary["step"] == steps
    assert not (run_b / "PREEMPTED").exists()
    records = [json.loads(line) for line in (run_b / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if r["kind"] == "train"]
    assert logged == list(range(50, steps + 1, 50))  # every logged step once, across the requeue

    a = load_file(str(tmp_path / "runs" / "straight" / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"))
    b = load_file(str(run_b / "checkpoints" / f"step_{steps:07d}" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_shards_array_job_builds_what_one_process_builds(cluster, tiny_data, tmp_path):
    from test_shards_cluster import array_case, tree

    out, array_env = array_case(tmp_path, tiny_data.tokenizer)
    env = dict(cluster, **{k: v for k, v in array_env.items() if k.startswith(("MEMTRAIN_", "PYTHONPATH"))})
    res = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-2",
            "--cpus-per-task=1",
            "--time=00:10:00",
            f"--output={tmp_path}/shards-%A_%a.out",
            "--chdir",
            str(tmp_path),
            "--export=ALL",
            str(Path(__file__).resolve().parents[1] / "slurm" / "shards_array.sbatch"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    _wait(
        lambda: (
            (out / "memtrain_shards.json").is_file()
            and not any(_job_state(env, f"{job}_{i}") in ("PENDING", "RUNNING", "COMPLETING") for i in range(3))
        ),
        300,
        "the array job to publish the shards",
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("shards-*.out"))
    assert logs.count("memtrain: shards slice") == 3, logs
    assert tree(out) == tree(tmp_path / "single")


def _memtrain(env, *argv: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "memtrain", *argv], env=env, capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _rows(text: str) -> dict[str, list[str]]:
    """``memtrain jobs`` output as {job id: [state words ...]}."""
    return {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}


def test_jobs_and_cancel(cluster, tiny_data, tmp_path):
    """A run and a two-point sweep on the local cluster: `memtrain jobs` shows their state and step;
    `memtrain cancel RUN` checkpoints and stops the run without a requeue; `cancel SWEEP --now` ends both
    points, the running one and the one still in the queue."""
    work = tmp_path / "work"
    work.mkdir()
    raw = tiny_raw(tiny_data.shards, work / "runs" / "long", ["train.steps=5000", "train.log_every=5", "run.name=long"])
    cfg = write_yaml(tmp_path / "long.yaml", raw)
    flags = ["--cpus-per-task", "1", "--time", "00:10:00", "--workdir", str(work)]
    assert "follow it with: memtrain jobs" in _memtrain(cluster, "submit", str(cfg), *flags, cwd=work)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: g\nbase: {cfg}\nout_dir: sweep\ngrid:\n  model.decoder.d_model: [32, 48]\n")
    _memtrain(cluster, "sweep", str(grid), *flags, cwd=work)
    run = work / "runs" / "long"
    _wait(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip(), 120, "a step")

    (row,) = _rows(_memtrain(cluster, "jobs", "runs/long", cwd=work)).values()
    assert row[0] == "RUNNING" and row[1] == "0" and row[2].endswith("/5000"), row
    points = _rows(_memtrain(cluster, "jobs", "sweep", cwd=work))
    assert len(points) == 2 and all(k.endswith(("_0", "_1")) for k in points)
    assert {r[0] for r in points.values()} <= {"RUNNING", "PENDING", "CONFIGURING"}
    assert len(_rows(_memtrain(cluster, "jobs", cwd=work))) == 3  # the working directory: every job

    assert "signalled to checkpoint and stop" in _memtrain(cluster, "cancel", "runs/long", cwd=work)
    (job_id,) = _rows(_memtrain(cluster, "jobs", "runs/long", cwd=work))
    _wait(lambda: _job_state(cluster, job_id) in TERMINAL, 120, "the run to stop")
    (row,) = _rows(_memtrain(cluster, "jobs", "runs/long", cwd=work)).values()
    assert row[:3] == ["STOPPED", "(memtrain", "cancel)"], row
    log = next(work.glob(f"slurm-jobs/long-*/logs/long-{job_id}.out")).read_text()
    assert "stopped by memtrain cancel at step" in log and "requeueing job" not in log
    assert list((run / "checkpoints").glob("step_*/meta.json"))  # resubmitting continues from it

    _memtrain(cluster, "cancel", "sweep", "--now", cwd=work)
    _wait(lambda: all(_job_state(cluster, j) in TERMINAL for j in points), 60, "the sweep to end")
    states = {j: " ".join(r[:3]) for j, r in _rows(_memtrain(cluster, "jobs", "sweep", cwd=work)).items()}
    assert set(states.values()) == {"CANCELLED (memtrain cancel)"}, states
