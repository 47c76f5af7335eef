"""``memtrain jobs`` and ``memtrain cancel``: the Slurm jobs memtrain submitted, and stopping them.

Every submission leaves ``job.json`` in its job folder (``slurm-jobs/<name>-<time>/``: the job id, its name,
and the run directory of each array task) and one line per job in ``.memtrain-jobs.jsonl`` of each run
directory and sweep directory it trains, so a run or a sweep finds its jobs without knowing where they were
submitted from.

A job's state comes from the controller (``scontrol show job``, which knows a job until a few minutes after it
ended), then from accounting (``sacct``, where the cluster keeps it), then from the run directory (a finished
run has ``summary.json``). Restarts come from the controller or, once it has forgotten the job, from the batch
log (every attempt logs ``memtrain: job ID (restart N)``); the last step from the run's ``metrics.jsonl``.

``memtrain cancel`` first marks each job as cancelled in its job folder, so that a run stopped by its
preemption signal ends instead of requeueing itself. By default a running job gets USR1 (its ranks finish the
step, checkpoint and exit; resubmitting continues from that checkpoint); ``--now`` cancels at once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from memtrain.engine.rundir import JOBS_NAME  # the per-run and per-sweep list of its jobs, one JSON object a line
from memtrain.errors import UserError
from memtrain.fileio import write_json

#: a job folder's record of its submission
RECORD_NAME = "job.json"
#: a job folder's marks of cancelled jobs: one empty file per job id (``1234`` or ``1234_5``)
CANCELLED_DIR = "cancelled"
#: states in which a job may still start or run
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING"}
ACTIVE |= {"SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


def record_submission(job_dir: Path, job_id: str, name: str, runs: list[Path], sweep: Path | None = None) -> None:
    """Remember a submitted job: ``job.json`` in its folder, a line in each run's (and the sweep's) job list.
    ``runs`` holds one run directory per array task (one for a plain job)."""
    record = {
        "job_id": job_id,
        "name": name,
        "array": sweep is not None,
        "runs": [str(r.resolve()) for r in runs],
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(job_dir / RECORD_NAME, record)
    for i, run in enumerate(runs):
        _append(run / JOBS_NAME, {"job_id": f"{job_id}_{i}" if sweep else job_id, "job_dir": str(job_dir)})
    if sweep is not None:
        _append(sweep / JOBS_NAME, {"job_id": job_id, "job_dir": str(job_dir)})


def _append(path: Path, entry: dict) -> None:
    """One line appended in a single write (a reader skips a line that a crash cut short)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


@dataclass
class Job:
    """One job, or one task of an array job, that memtrain submitted."""

    job_id: str  # "1234" or "1234_5"
    name: str
    job_dir: Path
    run_dir: Path
    state: str = "?"
    restarts: int | None = None
    step: str = ""

    @property
    def base_id(self) -> str:
        return self.job_id.split("_")[0]

    @property
    def log(self) -> Path:
        """The batch log (every attempt appends to it)."""
        if "_" in self.job_id:
            array_id, task = self.job_id.split("_")
            return self.job_dir / "logs" / f"{self.name}-{array_id}_{task}.out"
        return self.job_dir / "logs" / f"{self.name}-{self.job_id}.out"

    @property
    def active(self) -> bool:
        return self.state.split()[0] in ACTIVE


def _read_record(job_dir: Path) -> list[Job]:
    path = job_dir / RECORD_NAME
    try:
        rec = json.loads(path.read_text())
        job_id, name, runs, array = str(rec["job_id"]), str(rec["name"]), list(rec["runs"]), bool(rec["array"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path}: not a memtrain job record (expected JSON with job_id, name, array and runs)"
        ) from None
    if not re.fullmatch(r"\d+", job_id):
        raise UserError(f"{path}: job_id: expected a Slurm job number, got {job_id!r}")
    return [Job(f"{job_id}_{i}" if array else job_id, name, job_dir, Path(run)) for i, run in enumerate(runs)]


def _job_list(path: Path) -> list[tuple[str, Path]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            out.append((str(entry["job_id"]), Path(entry["job_dir"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line a crash cut short
    return out


def find_jobs(target: Path) -> list[Job]:
    """The jobs memtrain submitted for ``target``: a working directory (every job in its ``slurm-jobs/``), a
    sweep directory (every point) or a run directory."""
    target = target.resolve()
    if (target / "slurm-jobs").is_dir():
        jobs = []
        for job_dir in sorted((target / "slurm-jobs").iterdir()):
            if (job_dir / RECORD_NAME).is_file():  # a dry run's folder has no record
                jobs += _read_record(job_dir)
        return jobs
    if not (target / JOBS_NAME).is_file():
        raise UserError(
            f"{target}: no jobs submitted by memtrain here (expected a working directory with slurm-jobs/, a "
            f"sweep directory or a run directory with {JOBS_NAME})"
        )
    jobs, seen = [], set()
    for job_id, job_dir in _job_list(target / JOBS_NAME):
        if job_dir in seen:
            continue
        seen.add(job_dir)
        for job in _read_record(job_dir):
            # a run directory lists the task that trains it; a sweep directory lists whole array jobs
            if job.job_id == job_id or job.base_id == job_id:
                jobs.append(job)
    return jobs


# ------------------------------------------------------------------------------------------------------
# state


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", "no answer within 60 s")


def _expand_tasks(spec: str) -> list[str]:
    """``ArrayTaskId`` of a line that stands for several pending tasks: ``2-4,7`` (``%N`` limits dropped)."""
    out: list[str] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def controller_states(base_ids: list[str]) -> dict[str, tuple[str, int]]:
    """``{job id: (state, restarts)}`` for the jobs the controller still knows (array tasks as ``ID_I``)."""
    states: dict[str, tuple[str, int]] = {}
    for base in base_ids:
        out = _run(["scontrol", "-o", "show", "job", base])
        if out.returncode != 0:
            continue  # "Invalid job id specified": ended long enough ago to be forgotten
        for line in out.stdout.splitlines():
            f = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            state = f.get("JobState", "?")
            if f.get("Reason") not in (None, "None", "(null)") and state == "PENDING":
                state = f"PENDING ({f['Reason']})"
            restarts = int(f.get("Restarts", "0") or 0)
            if f.get("ArrayJobId") and f.get("ArrayTaskId"):
                for task in _expand_tasks(f["ArrayTaskId"]):
                    states[f"{f['ArrayJobId']}_{task}"] = (state, restarts)
            elif f.get("JobId"):
                states[f["JobId"]] = (state, restarts)
    return states


def accounting_states(base_ids: list[str]) -> dict[str, str]:
    """``{job id: state}`` from ``sacct`` where the cluster keeps accounting (empty where it does not)."""
    if not base_ids or shutil.which("sacct") is None:
        return {}
    out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(base_ids)])
    if out.returncode != 0:
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else "?"
    return states


def _restarts_in_log(log: Path) -> int | None:
    if not log.is_file():
        return None
    found = re.findall(rb"^memtrain: job \S+ \(restart (\d+)\)", log.read_bytes(), re.M)
    return max((int(x) for x in found), default=0)


def last_step(run_dir: Path) -> int | None:
    """The last step the run logged (from the end of ``metrics.jsonl``), or None before its first log."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec["step"]
    return None


def _total_steps(run_dir: Path) -> int | None:
    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return None


def fill_states(jobs: list[Job]) -> list[Job]:
    """Each job's state, restarts and last step, from Slurm and the run directory."""
    bases = sorted({j.base_id for j in jobs}, key=int)
    known = controller_states(bases) if shutil.which("scontrol") else {}
    missing = [b for b in bases if not any(k.split("_")[0] == b for k in known)]
    accounted = accounting_states(missing)
    for j in jobs:
        if j.job_id in known:
            j.state, j.restarts = known[j.job_id]
        elif j.job_id in accounted:
            j.state = accounted[j.job_id]
        elif (j.run_dir / "summary.json").is_file():
            j.state = "ended (run finished)"
        else:
            j.state = "ended"  # forgotten by the controller, no accounting here, run not finished
        marks = j.job_dir / CANCELLED_DIR
        if not j.active and ((marks / j.job_id).exists() or (marks / j.base_id).exists()):
            # cancelled in the queue or at once (CANCELLED), or stopped after a checkpoint (the ranks' exit 75)
            j.state = "CANCELLED (memtrain cancel)" if j.state.startswith("CANCELLED") else "STOPPED (memtrain cancel)"
        if j.restarts is None:
            j.restarts = _restarts_in_log(j.log)
        step, total = last_step(j.run_dir), _total_steps(j.run_dir)
        j.step = "" if step is None else f"{step}/{total}" if total else str(step)
    return jobs


def table(jobs: list[Job]) -> str:
    head = ("job", "state", "restarts", "step", "run dir", "log")
    rows = [
        (j.job_id, j.state, "" if j.restarts is None else str(j.restarts), j.step, str(j.run_dir), str(j.log))
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


# ------------------------------------------------------------------------------------------------------
# cancel


def mark_cancelled(job: Job) -> None:
    """Tell the job's batch script (``memtrain_finish``) not to requeue it: an empty file named after it."""
    d = job.job_dir / CANCELLED_DIR
    d.mkdir(exist_ok=True)
    (d / job.job_id).touch()


def cancel(jobs: list[Job], now: bool = False) -> list[str]:
    """Cancel the active ``jobs``; returns one line per job saying what was done. A running job gets USR1
    (checkpoint and stop) unless ``now``; a pending one is removed from the queue."""
    if shutil.which("scancel") is None:
        raise UserError("scancel not found: this machine has no Slurm client")
    said = []
    for j in jobs:
        if not j.active:
            said.append(f"{j.job_id} {j.run_dir.name}: {j.state}, nothing to cancel")
            continue
        mark_cancelled(j)
        running = j.state.split()[0] == "RUNNING"
        cmd = ["scancel", "--signal=USR1", j.job_id] if running and not now else ["scancel", j.job_id]
        out = _run(cmd)
        if out.returncode != 0:
            said.append(f"{j.job_id} {j.run_dir.name}: scancel failed: {(out.stderr or out.stdout).strip()}")
        elif running and not now:
            said.append(f"{j.job_id} {j.run_dir.name}: signalled to checkpoint and stop; log {j.log}")
        else:
            said.append(f"{j.job_id} {j.run_dir.name}: cancelled (was {j.state})")
    return said
