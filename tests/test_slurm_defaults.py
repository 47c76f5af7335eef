"""``memtrain submit`` / ``sweep`` defaults fit for GPU nodes: CPUs per task by launcher and partition, each
rank's OpenMP share, the time limit, ``slurm.setup``, ``slurm.container`` (pyxis and apptainer), ``--gres`` or
``--gpus-per-node``, and the sweep's resource flags."""

import os
import re
import textwrap
from pathlib import Path

import pytest
from helpers import FAKE_PYTHON, fake_bin, job_env, run_job, use_python

import yaml
from memtrain.cli import main
from memtrain.config import load_config
from memtrain.launch import slurm

ROOT = Path(__file__).resolve().parents[1]
PAPER = str(ROOT / "yaml/paper/memory_mixer_e512_d1024.yaml")  # 200,000 steps
CLUSTER = {
    "gpu": slurm.Partition("gpu", nodes=4, gpus_per_node=8, cpus_per_node=64, cpus_min=64, max_time="2-00:00:00"),
    "cpu": slurm.Partition("cpu", nodes=2, gpus_per_node=0, cpus_per_node=2, cpus_min=2),
}

pytestmark = pytest.mark.slurm


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: CLUSTER)
    monkeypatch.setattr(slurm, "default_partition", lambda: "gpu")


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: None)


def _submit(tmp_path, capsys, *argv, config="tiny", rc=0):
    code = main(["submit", config, *argv, "--dry-run", "--workdir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == rc, err
    return out, err


def _sbatch(text: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(?m)^#SBATCH --([a-z-]+)=?(\S*)$", text))


@pytest.mark.parametrize(
    "argv,cpus",
    [
        (["--gpus-per-node", "8"], 8),  # srun: a task per GPU gets the node's CPUs per GPU
        (["--gpus-per-node", "2"], 8),  # fewer GPUs than the node has: still its CPUs per GPU
        (["--gpus-per-node", "8", "--launcher", "torchrun"], 64),  # one task per node: all of them
        (["--gpus-per-node", "4", "--launcher", "deepspeed"], 32),
        (["--partition", "cpu", "--tasks-per-node", "2"], 1),  # CPU ranks share the node's CPUs
        (["--partition", "cpu", "--tasks-per-node", "2", "--launcher", "torchrun"], 2),
        (["--gpus-per-node", "8", "--cpus-per-task", "5"], 5),  # given: kept
    ],
)
def test_cpus_per_task_follow_the_launcher_and_the_partition(tmp_path, capsys, cluster, argv, cpus):
    out, _ = _submit(tmp_path, capsys, *argv)
    assert _sbatch(out)["cpus-per-task"] == str(cpus)
    (job,) = (tmp_path / "slurm-jobs").iterdir()
    assert load_config(job / "config.yaml").slurm.cpus_per_task == cpus  # frozen as rendered


def test_unknown_cluster_defaults_and_the_paper_dry_run(tmp_path, capsys, no_cluster):
    """The 8-GPU torchrun dry run of a 200,000-step paper config on a machine without Slurm: 8 CPUs per GPU,
    --gpus-per-node, and a warning (not an error) that the time limit must be given."""
    out, err = _submit(tmp_path, capsys, "--nodes", "2", "--gpus-per-node", "8", "--launcher", "torchrun", config=PAPER)
    opts = _sbatch(out)
    assert opts["cpus-per-task"] == "64" and opts["gpus-per-node"] == "8" and "gres" not in opts
    assert opts["time"] == "01:00:00" and opts["ntasks-per-node"] == "1"
    assert "slurm.time: required for a run of 200,000 steps" in err and "this dry run renders 01:00:00" in err
    out, _ = _submit(tmp_path / "b", capsys, "--gpus-per-node", "8", "--time", "3-00:00:00")
    assert _sbatch(out)["cpus-per-task"] == "8"  # srun: one task per GPU
    out, _ = _submit(tmp_path / "c", capsys, "--tasks-per-node", "2")
    assert _sbatch(out)["cpus-per-task"] == "1"


def test_time_limit_required_for_long_runs_and_checked_against_the_partition(tmp_path, capsys, cluster):
    code = main(["submit", PAPER, "--gpus-per-node", "8", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "slurm.time: required for a run of 200,000 steps (more than 10,000): give --time" in err
    assert not (tmp_path / "slurm-jobs").exists()
    _, err = _submit(tmp_path, capsys, "--time", "3-00:00:00", rc=2)
    assert "slurm.time: 3-00:00:00 is longer than partition 'gpu' allows (2-00:00:00)" in err
    out, _ = _submit(tmp_path, capsys, "--gpus-per-node", "8", "--time", "2-00:00:00", config=PAPER)
    assert _sbatch(out)["time"] == "2-00:00:00" and _sbatch(out)["gres"] == "gpu:8"
    out, _ = _submit(tmp_path / "b", capsys, "--gpus-per-node", "8", "--set", "slurm.gpu_flag=gpus-per-node")
    assert _sbatch(out)["gpus-per-node"] == "8" and "gres" not in _sbatch(out)


@pytest.mark.parametrize(
    "limit,seconds",
    [("30", 1800), ("30:15", 1815), ("01:00:00", 3600), ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:01", 86401)],
)
def test_slurm_time_formats(limit, seconds):
    assert slurm.time_seconds(limit) == seconds


def test_sinfo_node_groups_and_limits(tmp_path, monkeypatch):
    """Two node groups in one partition: nodes add up, requests may ask for the largest node, defaults take
    the smallest; 'infinite' is no limit."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "sinfo").write_text(
        "#!/bin/sh\n"
        "printf 'gpu*|2|gpu:h100:8(S:0-1)|112|2-00:00:00\\ngpu*|3|gpu:h100:8|96|2-00:00:00\\n"
        "cpu|5|(null)|32+|infinite\\n'\n"
    )
    (b / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")
    parts = slurm.cluster_partitions()
    assert parts["gpu"] == slurm.Partition("gpu", 5, 8, 112, 96, "2-00:00:00")
    assert parts["cpu"] == slurm.Partition("cpu", 5, 0, 32, 32, None)
    cfg = load_config("tiny", ["slurm.gpus_per_node=8", "slurm.launcher=torchrun", "slurm.partition=gpu"])
    assert slurm.resolve(cfg, parts).slurm.cpus_per_task == 96  # fits every node of the partition


# ------------------------------------------------------------------------------------------------------
# setup lines and containers, run for real under fake srun / python / apptainer

FAKE_APPTAINER = textwrap.dedent("""\
    #!/bin/bash
    printf '%s\\0' "$@" > "$FAKE_LOG/apptainer.argv"
    while [ "$1" != "$FAKE_IMAGE" ]; do shift; done
    shift
    exec "$@"
    """)


def _job(tmp_path, capsys, *argv):
    run_dir = tmp_path / "run"
    _submit(tmp_path, capsys, "--partition", "cpu", "--set", f"run.out_dir={run_dir}", *argv)
    (job,) = (tmp_path / "slurm-jobs").iterdir()
    bin_dir = fake_bin(tmp_path, FAKE_PYTHON)
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    use_python(job / "job.sbatch", bin_dir / "fakepython")
    return job / "job.sbatch", bin_dir


def _argv(tmp_path, name):
    return (tmp_path / "fakelog" / f"{name}.argv").read_text().split("\0")[:-1]


def test_setup_lines_run_first_and_a_pyxis_image_is_on_the_srun_line(tmp_path, capsys, cluster):
    setup = ['echo setup-ran > "$FAKE_LOG/setup"', 'export FROM_SETUP="a b"', "cd / # a comment"]
    script, bin_dir = _job(
        tmp_path,
        capsys,
        "--launcher",
        "torchrun",
        "--tasks-per-node",
        "2",
        "--set",
        f"slurm.setup={yaml.safe_dump(setup, default_flow_style=True).strip()}",
        "--set",
        "slurm.container=nvcr.io#nvidia/pytorch:24.08-py3",
        "--set",
        "slurm.container_mounts=[/data, /scratch/cache:/cache:ro]",
    )
    text = script.read_text()
    assert text.index("# --- slurm.setup ---") < text.index("# --- slurm/_common.sh ---") < text.index("\nsrun ")
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_CPUS_PER_TASK="2"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "fakelog" / "setup").read_text() == "setup-ran\n"
    srun = _argv(tmp_path, "srun")
    assert "--container-image=nvcr.io#nvidia/pytorch:24.08-py3" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path},/data:/data,/scratch/cache:/cache:ro" in srun
    assert f"--container-workdir={tmp_path}" in srun
    assert "2 CPU(s) per task, 2 rank(s) per task: OMP_NUM_THREADS=1" in out.stdout


def test_python_in_a_container_and_by_config(tmp_path, capsys, cluster):
    out, _ = _submit(tmp_path, capsys, "--set", "slurm.container=/images/memtrain.sqsh")
    assert "export MEMTRAIN_PYTHON=python\n" in out  # the image's own Python, not this machine's path
    out, _ = _submit(tmp_path / "b", capsys, "--set", "slurm.python=/opt/env/bin/python")
    assert "export MEMTRAIN_PYTHON=/opt/env/bin/python\n" in out


def test_a_failing_setup_line_stops_the_job_and_is_named(tmp_path, capsys, cluster):
    script, bin_dir = _job(tmp_path, capsys, "--set", "slurm.setup=['true', 'module-that-is-not-there load x', 'true']")
    out = run_job(script, job_env(tmp_path, bin_dir))
    assert out.returncode != 0
    assert "memtrain: slurm.setup failed (exit 127) at: module-that-is-not-there load x" in out.stderr
    assert not (tmp_path / "fakelog" / "python.argv").exists()  # training never started


def test_apptainer_wraps_each_task(tmp_path, capsys, cluster):
    script, bin_dir = _job(
        tmp_path,
        capsys,
        "--tasks-per-node",
        "2",
        "--set",
        "slurm.container=/images/memtrain.sif",
        "--set",
        "slurm.container_runtime=apptainer",
    )
    out = run_job(script, job_env(tmp_path, bin_dir, FAKE_IMAGE="/images/memtrain.sif", SLURM_CPUS_PER_TASK="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert _argv(tmp_path, "apptainer")[:6] == [
        "exec",
        "--bind",
        str(tmp_path),
        "--pwd",
        str(tmp_path),
        "/images/memtrain.sif",
    ]
    assert _argv(tmp_path, "python")[1:3] == ["memtrain.launch.node", str(bin_dir / "fakepython")]
    assert not any(a.startswith("--container") for a in _argv(tmp_path, "srun"))
    assert "1 CPU(s) per task, 1 rank(s) per task: OMP_NUM_THREADS=1" in out.stdout


@pytest.mark.parametrize(
    "setting,message",
    [
        ('slurm.setup=["module load x\\ntouch PWNED"]', "slurm.setup: item 0: expected one non-empty line"),
        ("slurm.setup=['  ']", "item 0: expected one non-empty line of shell"),
        ("slurm.container=my image", "slurm.container: expected an image name or path"),
        ("slurm.container_mounts=[data]", "'data': expected SRC, SRC:DST or SRC:DST:ro with absolute paths"),
        ("slurm.container_mounts=['/a,/b']", "'/a,/b': expected SRC, SRC:DST or SRC:DST:ro"),
        ("slurm.container_runtime=docker", "slurm.container_runtime"),
        ("slurm.gpu_flag=gpus", "slurm.gpu_flag"),
    ],
)
def test_bad_launch_settings_are_refused_with_one_line(tmp_path, capsys, cluster, setting, message):
    _, err = _submit(tmp_path, capsys, "--set", setting, rc=2)
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "slurm-jobs").exists()


def test_sweep_takes_the_resource_flags_of_submit(tmp_path, capsys, cluster):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: g\nbase: {ROOT / 'yaml/tiny.yaml'}\nout_dir: {tmp_path / 'sweep'}\n"
        "grid:\n  model.decoder.d_model: [32, 64]\n"
    )
    flags = ["--nodes", "2", "--gpus-per-node", "8", "--launcher", "torchrun", "--time", "12:00:00"]
    flags += ["--partition", "gpu", "--account", "lab", "--set", "slurm.setup=['module load cuda']"]
    assert main(["sweep", str(grid), *flags, "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --array=0-1") == 1  # both points share one array
    opts = _sbatch(out)
    assert (opts["nodes"], opts["gres"], opts["cpus-per-task"], opts["time"]) == ("2", "gpu:8", "64", "12:00:00")
    assert (opts["partition"], opts["account"]) == ("gpu", "lab") and "\nmodule load cuda\n" in out
    frozen = [load_config(p) for p in sorted((tmp_path / "sweep" / "configs").iterdir())]
    assert [c.slurm.nodes for c in frozen] == [2, 2] and [c.model.decoder.d_model for c in frozen] == [32, 64]
