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


def safe_job_name(name: str) -> str:
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
        ("slurm.time", s.time or ""),
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
    """One partition as ``sinfo`` reports it. Node groups of different sizes: ``gpus_per_node`` and
    ``cpus_per_node`` are the largest node (what a request may ask for), ``cpus_min`` the smallest node's CPUs
    (what a default may take: the job may land on any node), ``max_time`` the limit (None = unlimited)."""

    name: str
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    cpus_min: int = 0
    max_time: str | None = None

    @property
    def default_cpus(self) -> int:
        return self.cpus_min or self.cpus_per_node


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
    out = _run(["sinfo", "-h", "-o", "%P|%D|%G|%c|%l"], timeout=SINFO_TIMEOUT)
    if out.returncode != 0:
        said = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}").splitlines()
        raise UserError(f"sinfo failed: {said[-1]}")  # its last line says why (the lines before are its steps)
    parts: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        name, nodes, gres, cpus, limit = (line.split("|") + ["", "", "", "", ""])[:5]
        name = name.rstrip("*")
        gpus = max((int(m) for m in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres)), default=0)
        p = parts.get(name)
        n = int(nodes or 0)
        c = int(re.sub(r"\D", "", cpus) or 0)
        max_time = limit if _TIME.match(limit) else None  # "infinite", "UNLIMITED", "n/a": no limit
        if p is None:
            parts[name] = Partition(name, n, gpus, c, c, max_time)
        else:  # several node groups in one partition: count nodes, keep the largest and the smallest node
            parts[name] = Partition(
                name,
                p.nodes + n,
                max(p.gpus_per_node, gpus),
                max(p.cpus_per_node, c),
                min(p.cpus_min, c) if p.cpus_min and c else p.cpus_min or c,
                p.max_time or max_time,
            )
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


#: the time limit of a job whose config gives none, allowed for runs of at most TIME_REQUIRED_ABOVE_STEPS steps
DEFAULT_TIME = "01:00:00"
TIME_REQUIRED_ABOVE_STEPS = 10_000
#: CPUs per GPU when the cluster cannot be asked (a dry run without a reachable controller)
FALLBACK_CPUS_PER_GPU = 8


def time_seconds(limit: str) -> int:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in seconds."""
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # after a day count: hours, then minutes, then seconds
        h, m, sec = (parts + [0, 0])[:3]
    else:  # without: minutes, minutes:seconds or hours:minutes:seconds
        h, m, sec = [0, *parts, 0][:3] if len(parts) < 3 else parts
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def chosen_partition(s: SlurmConfig, partitions: dict[str, Partition] | None) -> Partition | None:
    """The partition a request goes to (its own or the cluster's default), or None when the cluster is not
    known; refuses a partition the cluster does not have."""
    if partitions is None:
        return None
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
    return partitions[name]


def default_cpus_per_task(s: SlurmConfig, p: Partition | None) -> int:
    """CPUs per Slurm task when the config gives none: with GPUs the node's CPUs per GPU for each GPU of the
    task (one rank with ``srun``, the node's ranks with ``torchrun``/``deepspeed``); without GPUs the node's
    CPUs shared by its ranks; unknown cluster: FALLBACK_CPUS_PER_GPU per GPU or 1 per CPU rank."""
    ranks_per_task = 1 if s.launcher == "srun" else s.ranks_per_node
    if p is None or not p.default_cpus:
        return (FALLBACK_CPUS_PER_GPU if s.gpus_per_node else 1) * ranks_per_task
    if s.gpus_per_node:
        per_rank = p.default_cpus // max(p.gpus_per_node, s.gpus_per_node)
    else:
        per_rank = p.default_cpus // s.ranks_per_node
    return max(1, per_rank) * ranks_per_task


def resolve(cfg: Config, partitions: dict[str, Partition] | None, dry_run: bool = False) -> Config:
    """``cfg`` with every ``slurm`` default that depends on the cluster or the run filled in (CPUs per task,
    the time limit, how GPUs are asked for), checked against the partition. What is rendered and frozen into
    the job folder is this config.

    A run of more than TIME_REQUIRED_ABOVE_STEPS steps without a time limit is refused, or in a dry run
    rendered with DEFAULT_TIME and a warning."""
    s = cfg.slurm
    if s.time is not None and not _TIME.match(s.time):
        raise UserError(f"slurm.time: {s.time!r} is not a Slurm time limit (e.g. 01:00:00 or 2-00:00:00)")
    if s.time is None and cfg.train.steps > TIME_REQUIRED_ABOVE_STEPS:
        need = (
            f"slurm.time: required for a run of {cfg.train.steps:,} steps (more than "
            f"{TIME_REQUIRED_ABOVE_STEPS:,}): give --time or slurm.time, e.g. 2-00:00:00, up to the partition's "
            "limit; a run that outlives it checkpoints and requeues itself"
        )
        if not dry_run:
            raise UserError(need)
        print(f"memtrain: warning: {need} (this dry run renders {DEFAULT_TIME})", file=sys.stderr)
    p = chosen_partition(s, partitions)
    update = {
        "time": s.time or DEFAULT_TIME,
        "cpus_per_task": s.cpus_per_task or default_cpus_per_task(s, p),
        "gpu_flag": s.gpu_flag if s.gpu_flag != "auto" else ("gres" if p is not None else "gpus-per-node"),
    }
    resolved = cfg.model_copy(update={"slurm": s.model_copy(update=update)})
    check_resources(resolved.slurm, p)
    return resolved


def check_resources(s: SlurmConfig, p: Partition | None) -> None:
    """Refuse a request the partition ``p`` cannot run (None: the cluster is not known), before anything is
    submitted. ``s`` is resolved (:func:`resolve`)."""
    if s.launcher == "srun" and s.gpus_per_node and s.tasks_per_node not in (1, s.gpus_per_node):
        raise UserError("slurm.tasks_per_node: with the srun launcher there is one task per GPU; leave it at 1")
    if p is None:
        return
    name = p.name
    if s.nodes > p.nodes:
        raise UserError(f"slurm.nodes: {s.nodes} nodes requested but partition '{name}' has {p.nodes}")
    if s.gpus_per_node > p.gpus_per_node:
        raise UserError(
            f"slurm.gpus_per_node: {s.gpus_per_node} GPUs per node requested but the nodes of "
            f"partition '{name}' have {p.gpus_per_node}"
        )
    cpus = (s.cpus_per_task or 1) * (1 if s.launcher != "srun" else s.ranks_per_node)
    if p.cpus_per_node and cpus > p.cpus_per_node:
        raise UserError(
            f"slurm.cpus_per_task: {cpus} CPUs per node requested but the nodes of partition "
            f"'{name}' have {p.cpus_per_node}"
        )
    if s.time and p.max_time and time_seconds(s.time) > time_seconds(p.max_time):
        raise UserError(f"slurm.time: {s.time} is longer than partition '{name}' allows ({p.max_time})")


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
    if cfg.slurm.cpus_per_task is None or cfg.slurm.time is None or cfg.slurm.gpu_flag == "auto":
        cfg = resolve(cfg, None)  # not resolved against a cluster: the defaults for an unknown one
    s = cfg.slurm
    tasks = s.ranks_per_node if s.launcher == "srun" else 1
    raw_name = job_name if job_name is not None else cfg.run.name
    _check_script_values(cfg, raw_name)
    try:
        SlurmConfig.model_validate(s.model_dump())
    except ValidationError as err:
        raise UserError(format_validation_error(err, "slurm").replace("slurm: ", "slurm.", 1)) from None
    _check_path(job_dir, "--workdir")
    name = safe_job_name(raw_name)
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
        head.append(
            f"#SBATCH --gres=gpu:{s.gpus_per_node}"
            if s.gpu_flag == "gres"
            else f"#SBATCH --gpus-per-node={s.gpus_per_node}"
        )
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
        "MEMTRAIN_JOB_DIR": str(job_dir),
        "MEMTRAIN_PYTHON": s.python or ("python" if s.container else sys.executable),
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
    body = _with_container(_body((d / TEMPLATES[s.launcher]).read_text()), s, workdir)
    return (
        "\n".join(
            head
            + [""]
            + exports
            + _setup_lines(s, workdir)
            + ["", "# --- slurm/_common.sh ---"]
            + common
            + ["", f"# --- slurm/{TEMPLATES[s.launcher]} ---"]
            + body
        )
        + "\n"
    )


def _setup_lines(s: SlurmConfig, workdir: Path) -> list[str]:
    """``slurm.setup`` as written, run in the job's working directory; the first line that fails stops the job
    with a log line naming it."""
    if not s.setup:
        return []
    return [
        "",
        "# --- slurm.setup ---",
        f"cd {shlex.quote(str(workdir))} || exit 1",
        "trap 'echo \"memtrain: slurm.setup failed (exit $?) at: $BASH_COMMAND\" >&2' ERR",
        "set -e",
        *s.setup,
        "set +e",
        "trap - ERR",
    ]


#: where the templates' launch lines take the container's arguments
_SRUN = "srun --kill-on-bad-exit=1"
_TASK = '"$PY" -m memtrain.launch.node'


def _with_container(body: list[str], s: SlurmConfig, workdir: Path) -> list[str]:
    """The launch line of ``body`` with ``slurm.container``: pyxis flags on srun, or ``apptainer exec`` in front
    of each task. The job's working directory is mounted at the same path, and is the container's."""
    if s.container is None:
        return body
    if any(c in str(workdir) for c in ",:"):
        raise UserError(f"--workdir: {workdir} cannot be mounted into a container (it has ',' or ':')")
    mounts = [str(workdir), *s.container_mounts]
    if s.container_runtime == "pyxis":
        binds = ",".join(m if ":" in m else f"{m}:{m}" for m in mounts)
        srun_args = [
            f"--container-image={s.container}",
            f"--container-mounts={binds}",
            f"--container-workdir={workdir}",
        ]
        old, new = _SRUN, " ".join([_SRUN, *map(shlex.quote, srun_args)])
    else:
        prefix = ["apptainer", "exec", *(["--nv"] if s.gpus_per_node else []), "--bind", ",".join(mounts)]
        prefix += ["--pwd", str(workdir), s.container]
        old, new = _TASK, " ".join([*map(shlex.quote, prefix), _TASK])
    text = "\n".join(body)
    if text.count(old) != 1:
        raise UserError(f"slurm.container: the launch template does not have exactly one '{old}' line")
    return text.replace(old, new).splitlines()


def new_job_dir(workdir: Path, name: str) -> Path:
    """A fresh ``<workdir>/slurm-jobs/<name>-<time>`` folder with a logs/ subfolder."""
    base = (workdir / "slurm-jobs" / f"{safe_job_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
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
