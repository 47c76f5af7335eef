"""Config text never becomes shell: hostile names, partitions, accounts and #SBATCH options are refused with one
line naming the field, or render inert. Rendered scripts run under bash with fake srun / scontrol / python."""

from __future__ import annotations

import re

import pytest
from helpers import FAKE_PYTHON, fake_bin, job_env, run_job, tiny_cfg, use_python
from helpers import REPO as ROOT

from memtrain.cli import main
from memtrain.launch.sweep import expand

pytestmark = [pytest.mark.security, pytest.mark.slurm]

HOSTILE_NAMES = [
    'a"b',
    "it's",
    "x;touch PWNED",
    "x$(touch PWNED)",
    "x`touch PWNED`",
    "x && touch PWNED",
    "name with spaces",
    "../../escape",
    "$(touch${IFS}PWNED)",
]
SBATCH = [
    "--job-name=",
    "--nodes=1",
    "--ntasks-per-node=",
    "--cpus-per-task=8",  # the partition's 8 CPUs for its one rank
    "--time=01:00:00",
    "--open-mode=append",
    "--output=",
    "--partition=cpu",
    "--account=lab",
    "--signal=USR1@120",
    "--requeue",
    "--qos=high",
]


def _sbatch_lines(text: str) -> list[str]:
    """The #SBATCH options sbatch reads: those before the first line that is neither a comment nor blank."""
    out = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH "):
            out.append(line[len("#SBATCH ") :])
        elif line.strip() and not line.startswith("#"):
            break
    return out


@pytest.mark.parametrize("launcher", ["srun", "torchrun", "deepspeed"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_run_name_renders_inert(tmp_path, fake_cluster, monkeypatch, launcher, name):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run $(touch PWNED) `touch PWNED` ; x"
    cfg = tiny_cfg(tmp_path, run_dir, f"run.name={name}", "slurm.extra_sbatch=[--qos=high]")
    assert (
        main(
            [
                "submit",
                str(cfg),
                "--partition",
                "cpu",
                "--account",
                "lab",
                "--launcher",
                launcher,
                "--dry-run",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    assert job.parent == tmp_path / "slurm-jobs"  # the name cannot leave the jobs folder
    script = job / "job.sbatch"
    bin_dir = fake_bin(tmp_path, FAKE_PYTHON)
    use_python(script, bin_dir / "fakepython")
    out = run_job(script, job_env(tmp_path, bin_dir))
    assert not list(tmp_path.rglob("PWNED")), "an injected command ran"
    assert out.returncode == 0, out.stdout + out.stderr
    opts = _sbatch_lines(script.read_text())
    for want in SBATCH:
        assert any(o.startswith(want) for o in opts), (want, opts)
    assert re.fullmatch(r"--job-name=[A-Za-z0-9._+-]+", opts[0])
    argv = (tmp_path / "fakelog" / "python.argv").read_text().split("\0")
    assert str(job / "config.yaml") in argv  # the config path arrives as one argument, unchanged
    assert f"run dir {run_dir}" in out.stdout


@pytest.mark.parametrize(
    "field,value",
    [
        ("run.name", "ok\ntouch PWNED"),
        ("run.name", "ok\r#SBATCH --x"),
        ("run.out_dir", "runs/a\nb"),
        ("slurm.partition", "gpu\ntouch PWNED"),
        ("slurm.partition", "gpu;touch PWNED"),
        ("slurm.partition", "$(touch PWNED)"),
        ("slurm.account", "lab\n#SBATCH --qos=x"),
        ("slurm.account", "a b"),
        ("slurm.account", "`id`"),
        ("slurm.time", "01:00:00\ntouch PWNED"),
        ("slurm.extra_sbatch", ["--qos=high\ntouch PWNED"]),
        ("slurm.extra_sbatch", ["--qos=high; touch PWNED"]),
        ("slurm.extra_sbatch", ["touch PWNED"]),
        ("slurm.extra_sbatch", ["--comment=$(touch PWNED)x y"]),
    ],
)
def test_hostile_values_are_refused_naming_the_field(tmp_path, no_cluster, capsys, field, value):
    import yaml

    section, key = field.split(".")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({section: {key: value}}))
    assert main(["submit", str(p), "--dry-run", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{field}: " in err, err
    assert not (tmp_path / "slurm-jobs").exists()


@pytest.fixture
def no_cluster(monkeypatch):
    """No Slurm client: a dry run renders without checking partitions against a cluster."""
    from memtrain.launch import slurm

    monkeypatch.setattr(slurm, "cluster_partitions", lambda: None)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--partition", "cpu\ntouch PWNED"),
        ("--partition", "cpu;id"),
        ("--account", "x;id"),
        ("--account", "lab\n#SBATCH --x"),
    ],
)
def test_hostile_flags_are_refused(tmp_path, no_cluster, capsys, flag, value):
    assert main(["submit", str(ROOT / "yaml/tiny.yaml"), flag, value, "--dry-run", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"slurm.{flag[2:]}: " in err


def test_workdir_that_cannot_stand_in_an_sbatch_line_is_refused(tmp_path, no_cluster, capsys):
    bad = tmp_path / "my jobs"
    bad.mkdir()
    assert main(["submit", str(ROOT / "yaml/tiny.yaml"), "--dry-run", "--workdir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memtrain: error: --workdir: ")
    assert not (bad / "slurm-jobs").exists()


def test_sweep_with_hostile_names_renders_inert(tmp_path, fake_cluster, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"name: 'g$(touch PWNED);x'\nbase: {ROOT / 'yaml/tiny.yaml'}\n"
        f"out_dir: '{tmp_path / 'sw $(touch PWNED) #1'}'\n"
        "set: {slurm.partition: cpu}\ngrid:\n  model.decoder.d_model: [32, 64]\n"
    )
    _, points = expand(grid)
    assert len({p.cfg.run.out_dir for p in points}) == 2
    assert main(["sweep", str(grid), "--dry-run", "--workdir", str(tmp_path)]) == 0
    capsys.readouterr()
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    script = job / "job.sbatch"
    assert "#SBATCH --array=0-1" in _sbatch_lines(script.read_text()) or "--array=0-1" in _sbatch_lines(
        script.read_text()
    )
    bin_dir = fake_bin(tmp_path, FAKE_PYTHON)
    use_python(script, bin_dir / "fakepython")
    out = run_job(script, job_env(tmp_path, bin_dir, SLURM_ARRAY_TASK_ID=1, FAKE_RUN_DIR=tmp_path / "r"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list(tmp_path.rglob("PWNED"))
    argv = (tmp_path / "fakelog" / "python.argv").read_text().split("\0")
    assert any(a.endswith("g_touch_PWNED__x-001.yaml") or a.endswith("-001.yaml") for a in argv), argv
