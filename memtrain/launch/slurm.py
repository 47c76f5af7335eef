"""Rendering and submitting Slurm batch scripts for a run config.

The templates live in the repository's ``slurm/`` folder (installed as ``memtrain/slurm/``) and are usable on their own with ``sbatch``
(parameterised by environment variables, see ``slurm/_common.sh``). ``memtrain submit`` renders a
self-contained script from the same files: ``#SBATCH`` lines from ``cfg.slurm`` (or flags), the run config
frozen into a job folder (so a requeued job trains exactly what was submitted), the shared prologue inlined,
then the launcher's body. Everything is checked against the cluster (partition, nodes, GPUs per node)
before anything is submitted.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from memtrain.config import Config, SlurmConfig, dump_config, format_validation_error
from memtrain.errors import UserError
from memtrain.shipped import slurm_dir

TEMPLATES = {"srun": "train_srun.sbatch", "torchrun": "train_torchrun.sbatch", "deepspeed": "train_deepspeed.sbatch"}
#: the preemption signal per launcher: always USR1, which the launchers ignore (memtrain.launch.node) and
#: only the ranks act on, so they get the whole ``slurm.signal_seconds``
SIGNALS = {"srun": "USR1", "torchrun": "USR1", "deepspeed": "USR1"}
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
#: what may stand in a #SBATCH value or a job folder name unquoted: no spaces, quotes or shell metacharacters
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+,:@%/=-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _job_name(name: str) -> str:
    """``name`` as a Slurm job name and folder name: every character other than letters, digits and ``._+-``
    becomes ``_`` (so spaces, quotes, ``$``, backticks, ``;`` and ``/`` are inert), at most 64 characters."""
    slug = re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:64].lstrip(".")
    return slug or "memtrain"


def _check_path(path: Path, what: str) -> None:
    """A folder written into ``#SBATCH --output`` (which sbatch reads without shell quoting)."""
    if not _SAFE_PATH.match(str(path)):
        raise UserError(
            f"{what}: {str(path)!r} cannot be written into an #SBATCH line; use a folder whose path has "
            "only letters, digits and . _ + , : @ % / = - (no spaces, quotes or control characters)"
        )


def check_workdir(workdir: Path) -> None:
    """Refuse a job working directory that cannot be written into ``#SBATCH --output`` (before anything is
    written)."""
    _check_path(workdir.resolve(), "--workdir")


def _check_script_values(cfg: Config, name: str) -> None:
    """Every config value that reaches the script, checked again where it is used (the config's validators
    refuse them when a config is read; a Config built or changed in code passes through here too)."""
    s = cfg.slurm
    for field, value in (
        ("run.name", name),
        ("run.out_dir", cfg.run.out_dir),
        ("slurm.time", s.time),
        ("slurm.partition", s.partition or ""),
        ("slurm.account", s.account or ""),
        *((f"slurm.extra_sbatch[{i}]", x) for i, x in enumerate(s.extra_sbatch)),
    ):
        if _CONTROL.search(value):
            raise UserError(
                f"{field}: must be one line of printable text (no newline or other control character), got {value!r}"
            )


@dataclass
class Partition:
    name: str
    nodes: int
    gpus_per_node: int
    cpus_per_node: int


#: seconds ``sinfo`` may take before the controller counts as unreachable (its own retries take about as long)
SINFO_TIMEOUT = 60


def _run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"no answer within {timeout:.0f} s")


def cluster_partitions() -> dict[str, Partition] | None:
    """Partitions of the reachable cluster (``sinfo``), or None when no Slurm client is installed.

    Raises :class:`UserError` when ``sinfo`` exists but cannot answer (no controller reachable)."""
    if shutil.which("sinfo") is None:
        return None
    out = _run(["sinfo", "-h", "-o", "%P|%D|%G|%c"], timeout=SINFO_TIMEOUT)
    if out.returncode != 0:
        raise UserError(f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}")
    parts: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, gres, cpus = (line.split("|") + ["", "", "", ""])[:4]
        name = name.rstrip("*")
        gpus = max((int(m) for m in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres)), default=0)
        p = parts.get(name)
        n = int(nodes or 0)
        c = int(re.sub(r"\D", "", cpus) or 0)
        if p is None:
            parts[name] = Partition(name, n, gpus, c)
        else:  # several node groups in one partition: count nodes, keep the largest node
            parts[name] = Partition(name, p.nodes + n, max(p.gpus_per_node, gpus), max(p.cpus_per_node, c))
    return parts


def partitions_to_check(dry_run: bool, hint: str = "use --dry-run to only render") -> dict[str, Partition] | None:
    """The partitions a request is checked against before ``sbatch``.

    A real submission needs a reachable cluster. A dry run only writes the script, so without a Slurm client,
    or with one whose controller cannot be reached (a laptop, a login node during an outage), it warns once on
    stderr that the resources were not checked and goes on (returns None)."""
    try:
        partitions = cluster_partitions()
    except UserError as err:
        if not dry_run:
            raise UserError(f"{err} (the Slurm controller cannot be reached; {hint})") from None
        print(f"memtrain: warning: resources not checked against the cluster ({err})", file=sys.stderr)
        return None
    if partitions is None:
        if not dry_run:
            raise UserError(f"sbatch not found: this machine has no Slurm client; {hint}")
        print("memtrain: warning: resources not checked against a cluster (no Slurm client here)", file=sys.stderr)
    return partitions


def default_partition() -> str | None:
    out = _run(["sinfo", "-h", "-o", "%P"], timeout=SINFO_TIMEOUT)
    for line in out.stdout.splitlines():
        if line.endswith("*"):
            return line[:-1]
    return None


def check_resources(s: SlurmConfig, partitions: dict[str, Partition] | None) -> None:
    """Refuse a request the cluster cannot run, before anything is submitted."""
    if not _TIME.match(s.time):
        raise UserError(f"slurm.time: {s.time!r} is not a Slurm time limit (e.g. 01:00:00 or 2-00:00:00)")
    if s.launcher == "srun" and s.gpus_per_node and s.tasks_per_node not in (1, s.gpus_per_node):
        raise UserError("slurm.tasks_per_node: with the srun launcher there is one task per GPU; leave it at 1")
    if partitions is None:
        return
    name = s.partition or default_partition()
    if name is None:
        raise UserError(
            "slurm.partition: not set and the cluster has no default partition "
            f"(partitions: {', '.join(sorted(partitions)) or 'none'})"
        )
    if name not in partitions:
        raise UserError(
            f"slurm.partition: '{name}' does not exist on this cluster "
            f"(partitions: {', '.join(sorted(partitions)) or 'none'})"
        )
    p = partitions[name]
    if s.nodes > p.nodes:
        raise UserError(f"slurm.nodes: {s.nodes} nodes requested but partition '{name}' has {p.nodes}")
    if s.gpus_per_node > p.gpus_per_node:
        raise UserError(
            f"slurm.gpus_per_node: {s.gpus_per_node} GPUs per node requested but the nodes of "
            f"partition '{name}' have {p.gpus_per_node}"
        )
    cpus = s.cpus_per_task * (1 if s.launcher != "srun" else s.ranks_per_node)
    if p.cpus_per_node and cpus > p.cpus_per_node:
        raise UserError(
            f"slurm.cpus_per_task: {cpus} CPUs per node requested but the nodes of partition "
            f"'{name}' have {p.cpus_per_node}"
        )


def _body(template: str) -> list[str]:
    """The template's commands: everything after its leading comment / #SBATCH block, minus the source line."""
    lines = template.splitlines()
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return [ln for ln in lines[i:] if "_common.sh" not in ln]


def render(
    cfg: Config,
    config_file: Path | None,
    workdir: Path,
    job_dir: Path,
    array_list: Path | None = None,
    n_array: int = 0,
    job_name: str | None = None,
) -> str:
    """A complete sbatch script for ``cfg`` (its ``slurm`` section decides the resources and launcher).

    ``array_list``: a job array over the configs listed one per line in that file (task i trains line i+1);
    then ``config_file`` is None."""
    s = cfg.slurm
    tasks = s.ranks_per_node if s.launcher == "srun" else 1
    raw_name = job_name if job_name is not None else cfg.run.name
    _check_script_values(cfg, raw_name)
    try:
        SlurmConfig.model_validate(s.model_dump())
    except ValidationError as err:
        raise UserError(format_validation_error(err, "slurm").replace("slurm: ", "slurm.", 1)) from None
    _check_path(job_dir, "--workdir")
    name = _job_name(raw_name)
    log = "%x-%A_%a.out" if array_list else "%x-%j.out"
    head = [
        "#!/bin/bash",
        f"# memtrain: {name}, rendered {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={s.cpus_per_task}",
        f"#SBATCH --time={s.time}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={job_dir}/logs/{log}",
    ]
    if array_list:
        head.append(f"#SBATCH --array=0-{n_array - 1}")
    if s.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    if s.partition:
        head.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        head.append(f"#SBATCH --account={s.account}")
    if s.signal_seconds:
        head.append(f"#SBATCH --signal={SIGNALS[s.launcher]}@{s.signal_seconds}")
    head.append("#SBATCH --requeue" if s.requeue else "#SBATCH --no-requeue")
    head += [f"#SBATCH {x}" for x in s.extra_sbatch]
    env = {
        "MEMTRAIN_WORKDIR": str(workdir),
        "MEMTRAIN_LOG_DIR": str(job_dir / "logs"),
        "MEMTRAIN_PYTHON": sys.executable,
        "MEMTRAIN_REQUEUE": "1" if s.requeue else "0",
        "MEMTRAIN_MAX_REQUEUES": str(s.max_requeues),
    }
    if config_file is not None:
        env["MEMTRAIN_CONFIG"] = str(config_file)
        env["MEMTRAIN_RUN_DIR"] = str((workdir / cfg.run.out_dir).resolve())
    if s.launcher != "srun":
        env["MEMTRAIN_NPROC_PER_NODE"] = str(s.ranks_per_node)
    exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if array_list:
        exports.append(f'MEMTRAIN_CONFIG=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(array_list))})')
        exports.append("export MEMTRAIN_CONFIG")
    d = slurm_dir()
    common = (d / "_common.sh").read_text().splitlines()
    body = _body((d / TEMPLATES[s.launcher]).read_text())
    return (
        "\n".join(
            head
            + [""]
            + exports
            + ["", "# --- slurm/_common.sh ---"]
            + common
            + ["", f"# --- slurm/{TEMPLATES[s.launcher]} ---"]
            + body
        )
        + "\n"
    )


def new_job_dir(workdir: Path, name: str) -> Path:
    """A fresh ``<workdir>/slurm-jobs/<name>-<time>`` folder with a logs/ subfolder."""
    base = (workdir / "slurm-jobs" / f"{_job_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    job_dir, n = base, 1
    while job_dir.exists():
        n += 1
        job_dir = base.with_name(f"{base.name}-{n}")
    (job_dir / "logs").mkdir(parents=True)
    return job_dir


def prepare_job(cfg: Config, workdir: Path) -> tuple[Path, str]:
    """Write the frozen config and rendered script into a new job folder; returns (script path, text)."""
    _check_script_values(cfg, cfg.run.name)
    _check_path(workdir.resolve(), "--workdir")
    job_dir = new_job_dir(workdir, cfg.run.name)
    config_file = job_dir / "config.yaml"
    config_file.write_text(dump_config(cfg))
    text = render(cfg, config_file, workdir.resolve(), job_dir)
    script = job_dir / "job.sbatch"
    script.write_text(text)
    return script, text


def sbatch(script: Path, extra: list[str] | None = None) -> str:
    """Submit ``script``; returns the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: this machine has no Slurm client; use --dry-run to only render")
    out = _run(["sbatch", "--parsable", *(extra or []), str(script)])
    if out.returncode != 0:
        raise UserError(f"sbatch refused {script}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]
