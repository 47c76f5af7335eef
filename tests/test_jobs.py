"""``memtrain jobs`` / ``memtrain cancel`` without a cluster: the submission records, where a job's state
comes from (controller, accounting, run directory), the batch script's answer to a cancel mark, and damaged
records. The same commands against a real local Slurm are in tests/test_slurm_e2e.py."""

import os

import pytest
from helpers import FAKE_PYTHON, fake_bin, job_env, render_job, run_job, tiny_cfg, use_python

from memtrain.cli import main
from memtrain.engine.rundir import JOBS_NAME
from memtrain.launch import jobs

pytestmark = pytest.mark.slurm


def _fake_slurm(tmp_path, monkeypatch, scontrol: str, sacct: str = "", sacct_rc: int = 0):
    """``scontrol -o show job`` and ``sacct`` that print what they are given; ``scancel`` records its argv."""
    b = tmp_path / "slurmbin"
    b.mkdir(exist_ok=True)
    (b / "scontrol").write_text(f"#!/bin/bash\ncat <<'EOF'\n{scontrol}\nEOF\n[ -n '{scontrol}' ] || exit 1\n")
    (b / "sacct").write_text(f"#!/bin/bash\nprintf '{sacct}'\nexit {sacct_rc}\n")
    (b / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scancel.log\n')
    for f in b.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")


def _submitted(tmp_path, job_id="41", runs=("a",), sweep=False, name="job"):
    job_dir = tmp_path / "work" / "slurm-jobs" / f"{name}-1"
    (job_dir / "logs").mkdir(parents=True)
    run_dirs = [tmp_path / "work" / "runs" / r for r in runs]
    jobs.record_submission(job_dir, job_id, name, run_dirs, sweep=tmp_path / "work" / "sweep" if sweep else None)
    return job_dir, run_dirs


def test_records_find_the_jobs_of_a_run_a_sweep_and_a_working_directory(tmp_path):
    _submitted(tmp_path, "41", ("solo",), name="solo")
    _, runs = _submitted(tmp_path, "42", ("p0", "p1", "p2"), sweep=True, name="grid")
    work = tmp_path / "work"
    assert [j.job_id for j in jobs.find_jobs(work)] == ["42_0", "42_1", "42_2", "41"]
    assert [j.job_id for j in jobs.find_jobs(work / "sweep")] == ["42_0", "42_1", "42_2"]
    (job,) = jobs.find_jobs(runs[1])
    assert job.job_id == "42_1" and job.run_dir == runs[1].resolve()
    assert job.log == work / "slurm-jobs" / "grid-1" / "logs" / "grid-42_1.out"  # Slurm's %x-%A_%a.out
    (solo,) = jobs.find_jobs(work / "runs" / "solo")
    assert solo.log.name == "solo-41.out"
    with open(runs[1] / JOBS_NAME, "a") as f:
        f.write('{"job_id": "42_1", "job_di')  # a line a crash cut short is skipped
    assert [j.job_id for j in jobs.find_jobs(runs[1])] == ["42_1"]


def test_a_run_directory_with_only_its_job_list_still_starts_a_run(tmp_path, tiny_data):
    from memtrain.config import load_config
    from memtrain.engine.rundir import prepare_run_dir, release_run_dir

    _, (run,) = _submitted(tmp_path)
    cfg = load_config(tiny_cfg(tmp_path, run))
    prepare_run_dir(run, cfg, resume=True)
    release_run_dir(run)
    assert (run / "config.yaml").is_file() and (run / JOBS_NAME).is_file()


def test_state_from_the_controller_then_accounting_then_the_run(tmp_path, monkeypatch):
    _, runs = _submitted(tmp_path, "42", ("p0", "p1", "p2", "p3"), sweep=True)
    _submitted(tmp_path, "7", ("old",), name="old")
    _submitted(tmp_path, "8", ("older",), name="older")
    (runs[0] / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 10}\n{"kind": "eval", "step": 20}\n{"kind": "train", "st'
    )
    (runs[0] / "config.yaml").write_text("train: {steps: 100}\n")
    finished = tmp_path / "work" / "runs" / "older"
    (finished / "summary.json").write_text("{}")
    (tmp_path / "work" / "slurm-jobs" / "old-1" / "logs" / "old-7.out").write_text(
        "memtrain: job 7 (restart 0) on n1\nmemtrain: job 7 (restart 1) on n2\nmemtrain: job 7 (restart 2) on n1\n"
    )
    _fake_slurm(
        tmp_path,
        monkeypatch,
        # one running task with 1 restart, and a line standing for the pending tasks 1-3
        "JobId=43 ArrayJobId=42 ArrayTaskId=0 JobState=RUNNING Reason=None Restarts=1\n"
        "JobId=42 ArrayJobId=42 ArrayTaskId=1-3%2 JobState=PENDING Reason=Resources Restarts=0",
        sacct="7|FAILED\n",
    )
    found = {j.job_id: j for j in jobs.fill_states(jobs.find_jobs(tmp_path / "work"))}
    assert (found["42_0"].state, found["42_0"].restarts, found["42_0"].step) == ("RUNNING", 1, "20/100")
    assert {found[f"42_{i}"].state for i in (1, 2, 3)} == {"PENDING (Resources)"}
    assert (found["7"].state, found["7"].restarts) == ("FAILED", 2)  # accounting; restarts from the batch log
    assert found["8"].state == "ended (run finished)" and found["8"].restarts is None


def test_jobs_command_prints_a_table_and_refuses_what_is_not_memtrains(tmp_path, monkeypatch, capsys):
    _, (run,) = _submitted(tmp_path, "41", ("solo",))
    _fake_slurm(tmp_path, monkeypatch, "JobId=41 JobState=RUNNING Reason=None Restarts=0")
    assert main(["jobs", str(run)]) == 0
    head, row = capsys.readouterr().out.splitlines()
    assert head.split() == ["job", "state", "restarts", "step", "run", "dir", "log"]
    assert row.split()[:3] == ["41", "RUNNING", "0"] and row.endswith("job-41.out")
    assert main(["jobs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no jobs submitted by memtrain here" in err
    (tmp_path / "work" / "slurm-jobs" / "job-1" / "job.json").write_text('{"job_id": "41; rm -rf /"}')
    assert main(["jobs", str(run)]) == 2
    assert "job.json: not a memtrain job record" in capsys.readouterr().err


def test_cancel_marks_then_signals_running_jobs_and_removes_pending_ones(tmp_path, monkeypatch, capsys):
    job_dir, _ = _submitted(tmp_path, "42", ("p0", "p1", "p2"), sweep=True)
    _fake_slurm(
        tmp_path,
        monkeypatch,
        "JobId=43 ArrayJobId=42 ArrayTaskId=0 JobState=RUNNING Restarts=0\n"
        "JobId=44 ArrayJobId=42 ArrayTaskId=1 JobState=COMPLETED Restarts=0\n"
        "JobId=42 ArrayJobId=42 ArrayTaskId=2 JobState=PENDING Reason=Priority Restarts=0",
    )
    assert main(["cancel", str(tmp_path / "work" / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "42_0 p0: signalled to checkpoint and stop" in out and "42_1 p1: COMPLETED, nothing to cancel" in out
    assert (tmp_path / "scancel.log").read_text() == "--signal=USR1 42_0\n42_2\n"
    assert sorted(p.name for p in (job_dir / "cancelled").iterdir()) == ["42_0", "42_2"]
    assert main(["cancel", str(tmp_path / "work" / "sweep"), "--job", "42_0", "--now"]) == 0
    assert (tmp_path / "scancel.log").read_text().splitlines()[-1] == "42_0"
    assert main(["cancel", str(tmp_path / "work"), "--job", "99"]) == 2
    assert "--job 99: not among the jobs of" in capsys.readouterr().err


def test_the_batch_script_obeys_a_cancel_mark(tmp_path, fake_cluster):
    """Marked before launch: no training starts. Marked, then preempted by the cancel's USR1: no requeue."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = render_job(tmp_path, [str(tiny_cfg(tmp_path, run_dir)), "--partition", "cpu"])
    bin_dir = fake_bin(tmp_path, FAKE_PYTHON)
    use_python(script, bin_dir / "fakepython")
    (script.parent / "cancelled").mkdir()
    (script.parent / "cancelled" / "4242").touch()
    out = run_job(script, job_env(tmp_path, bin_dir))
    assert out.returncode == 0 and "cancelled by memtrain cancel before training started" in out.stdout
    assert not (tmp_path / "fakelog" / "python.argv").exists()

    (script.parent / "cancelled" / "4242").unlink()
    text = script.read_text().replace(
        'if memtrain_cancelled; then\n  echo "memtrain: cancelled by', 'if false; then\n  echo "x'
    )
    script.write_text(text)  # the mark arrives after the launch, with the signal
    (script.parent / "cancelled" / "4242").touch()
    out = run_job(script, job_env(tmp_path, bin_dir, FAKE_MODE="preempt"))
    assert out.returncode == 75, out.stdout + out.stderr
    assert "stopped by memtrain cancel at step 7; not requeueing" in out.stdout
    assert not (tmp_path / "fakelog" / "scontrol.log").exists()  # no requeue
