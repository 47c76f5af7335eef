"""Slurm rendering and checks, sweeps (expand, local run, collect), the scaling model, Slurm env, preemption."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memtrain.cli import main
from memtrain.config import SlurmConfig, load_config
from memtrain.engine.preempt import Preemption
from memtrain.errors import UserError
from memtrain.launch import scaling, slurm
from memtrain.launch.env import adopt_slurm_env
from memtrain.launch.sweep import config_fields, expand, resource_groups

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = {
    "gpu": slurm.Partition("gpu", nodes=4, gpus_per_node=8, cpus_per_node=64),
    "cpu": slurm.Partition("cpu", nodes=2, gpus_per_node=0, cpus_per_node=2),
}


@pytest.fixture
def fake_cluster(monkeypatch):
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: CLUSTER)
    monkeypatch.setattr(slurm, "default_partition", lambda: "cpu")


@pytest.mark.slurm
def test_render_srun_script(tmp_path, fake_cluster, capsys):
    rc = main(
        [
            "submit",
            str(ROOT / "yaml/tiny.yaml"),
            "--partition",
            "gpu",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--time",
            "04:00:00",
            "--account",
            "lab",
            "--dry-run",
            "--workdir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",  # the partition reports its GPUs as gres
        "#SBATCH --cpus-per-task=8",  # 64 CPUs for 8 GPUs
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=04:00:00",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
    ):
        assert line in out
    assert "srun --kill-on-bad-exit=1" in out and "memtrain_finish $?" in out
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    frozen = load_config(job / "config.yaml")
    assert frozen.slurm.nodes == 2 and frozen.slurm.gpus_per_node == 8  # flags are frozen into the job's config
    script = (job / "job.sbatch").read_text()
    assert f"export MEMTRAIN_CONFIG={job / 'config.yaml'}" in script
    assert subprocess.run(["bash", "-n", str(job / "job.sbatch")]).returncode == 0  # valid bash


@pytest.mark.parametrize(
    "launcher,signal_name,needle",
    [
        ("torchrun", "USR1", "torch.distributed.run --nnodes"),
        ("deepspeed", "USR1", "deepspeed.launcher.runner --hostfile"),
    ],
)
@pytest.mark.slurm
def test_render_other_launchers(tmp_path, fake_cluster, capsys, launcher, signal_name, needle):
    assert (
        main(
            [
                "submit",
                str(ROOT / "yaml/tiny.yaml"),
                "--partition",
                "gpu",
                "--gpus-per-node",
                "4",
                "--launcher",
                launcher,
                "--dry-run",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"#SBATCH --signal={signal_name}@120" in out and needle in out
    assert "#SBATCH --ntasks-per-node=1" in out and "export MEMTRAIN_NPROC_PER_NODE=4" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--partition", "nope"], "slurm.partition: 'nope' does not exist on this cluster (partitions: cpu, gpu)"),
        (
            ["--partition", "gpu", "--gpus-per-node", "16"],
            "16 GPUs per node requested but the nodes of partition 'gpu' have 8",
        ),
        (["--partition", "cpu", "--nodes", "3"], "slurm.nodes: 3 nodes requested but partition 'cpu' has 2"),
        (["--partition", "cpu", "--gpus-per-node", "1"], "the nodes of partition 'cpu' have 0"),
        (["--time", "2h"], "slurm.time: '2h' is not a Slurm time limit"),
    ],
)
@pytest.mark.slurm
def test_submit_refuses_before_anything_is_written(tmp_path, fake_cluster, capsys, args, message):
    rc = main(["submit", str(ROOT / "yaml/tiny.yaml"), *args, "--dry-run", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "slurm-jobs").exists()


@pytest.mark.slurm
def test_submit_without_slurm_needs_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: None)
    assert main(["submit", str(ROOT / "yaml/tiny.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "use --dry-run" in capsys.readouterr().err
    assert main(["submit", str(ROOT / "yaml/tiny.yaml"), "--dry-run", "--workdir", str(tmp_path)]) == 0
    assert "resources not checked against a cluster (no Slurm client here)" in capsys.readouterr().err


def _unreachable_sinfo(tmp_path, monkeypatch) -> None:
    """A Slurm client on PATH whose controller cannot be reached: ``sinfo`` fails as it does on a laptop."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sinfo", "sbatch"):
        (bin_dir / tool).write_text(
            "#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\nexit 1\n"
        )
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slurm
def test_dry_run_renders_without_a_reachable_controller(tmp_path, monkeypatch, capsys):
    _unreachable_sinfo(tmp_path, monkeypatch)
    assert main(["submit", "tiny", "--dry-run", "--workdir", str(tmp_path)]) == 0  # a shipped config by name
    out, err = capsys.readouterr()
    assert "#SBATCH --nodes=1" in out and "#SBATCH --job-name=tiny" in out
    assert err == (
        "memtrain: warning: resources not checked against the cluster "
        "(sinfo failed: sinfo: fatal: Could not establish a configuration source)\n"
    )
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    assert (job / "job.sbatch").is_file()


@pytest.mark.slurm
def test_real_submission_needs_a_reachable_controller(tmp_path, monkeypatch, capsys):
    _unreachable_sinfo(tmp_path, monkeypatch)
    assert main(["submit", "tiny", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not establish a configuration source" in err
    assert "cannot be reached; use --dry-run to only render" in err
    assert not (tmp_path / "slurm-jobs").exists()
    p = write_grid(tmp_path, {"model.decoder.d_model": [32]})
    assert main(["sweep", str(p), "--workdir", str(tmp_path)]) == 2
    assert "use --local or --dry-run" in capsys.readouterr().err
    assert main(["sweep", str(p), "--dry-run", "--workdir", str(tmp_path)]) == 0
    assert "#SBATCH --array=0-0" in capsys.readouterr().out


def write_grid(tmp_path, grid, extra=""):
    p = tmp_path / "grid.yaml"
    p.write_text(
        f"name: g\nbase: {ROOT / 'yaml/tiny.yaml'}\nout_dir: {tmp_path / 'sweep'}\n{extra}grid:\n"
        + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in grid.items())
    )
    return p


def test_grid_expands_to_validated_points(tmp_path):
    p = write_grid(tmp_path, {"model.decoder.d_model": [32, 64], "slurm.nodes": [1, 2, 4]}, "set: {train.steps: 7}\n")
    grid, points = expand(p)
    assert len(points) == 6 and {pt.cfg.train.steps for pt in points} == {7}
    assert [(pt.cfg.model.decoder.d_model, pt.cfg.slurm.nodes) for pt in points][:3] == [(32, 1), (32, 2), (32, 4)]
    assert len({pt.run_dir for pt in points}) == 6 and all(pt.cfg.run.out_dir == str(pt.run_dir) for pt in points)
    assert sorted(len(g) for g in resource_groups(points).values()) == [2, 2, 2]


def test_grid_key_that_is_not_a_field(tmp_path):
    p = write_grid(tmp_path, {"model.decoder.d_modle": [32]})
    with pytest.raises(
        UserError,
        match=r"grid key 'model.decoder.d_modle' is not a config field; did you mean "
        r"'model.decoder.d_model'",
    ):
        expand(p)
    assert "slurm.gpus_per_node" in config_fields() and "model.encoder.kernel" in config_fields()


def test_grid_point_with_invalid_value_is_named(tmp_path):
    p = write_grid(tmp_path, {"model.decoder.n_layers": [1, 0]})
    with pytest.raises(UserError, match=r"point 1: n_layers=0.*model.decoder.n_layers"):
        expand(p)


@pytest.mark.slurm
def test_sweep_more_gpus_than_nodes_have_is_refused_before_submitting(tmp_path, fake_cluster, capsys):
    p = write_grid(tmp_path, {"slurm.gpus_per_node": [8, 16]}, "set: {slurm.partition: gpu}\n")
    assert main(["sweep", str(p), "--workdir", str(tmp_path)]) == 2
    assert "16 GPUs per node requested" in capsys.readouterr().err
    assert not (tmp_path / "slurm-jobs").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slurm
def test_sweep_dry_run_renders_one_array_per_resource_group(tmp_path, fake_cluster, capsys):
    p = write_grid(
        tmp_path, {"model.decoder.d_model": [32, 64], "slurm.tasks_per_node": [1, 2]}, "set: {slurm.partition: cpu}\n"
    )
    assert main(["sweep", str(p), "--dry-run", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --array=0-1") == 2
    assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --ntasks-per-node=2" in out
    listings = sorted((tmp_path / "slurm-jobs").glob("*/configs.txt"))
    assert len(listings) == 2 and all(len(f.read_text().splitlines()) == 2 for f in listings)


@pytest.mark.distributed
@pytest.mark.slow
def test_sweep_local_run_and_collect(tmp_path, tiny_data, capsys):
    extra = (
        f"set: {{data.shards: {tiny_data.shards}, train.steps: 6, train.eval_every: 0, train.ckpt_every: 0, "
        "train.log_every: 2, train.progress: false, train.threads: 1}\n"
    )
    p = write_grid(tmp_path, {"model.decoder.d_model": [16, 32], "slurm.tasks_per_node": [1, 2]}, extra)
    assert main(["sweep", str(p), "--local"]) == 0
    capsys.readouterr()
    assert main(["sweep", "collect", str(tmp_path / "sweep"), "--peak-tflops", "1.0"]) == 0
    root = tmp_path / "sweep"
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert len(rows) == 4
    assert sorted(int(r["ranks"]) for r in rows) == [1, 1, 2, 2]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["final_loss"]) > 0 and r["complete"] == "True" for r in rows)
    by_ranks = {r["run"]: int(r["ranks"]) for r in rows}
    assert {int(r["tokens"]) // by_ranks[r["run"]] for r in rows} == {6 * 4 * 32}  # steps x batch x row per rank
    assert all(0 < float(r["mfu"]) < 1 for r in rows)
    assert "| run | ranks |" in (root / "results.md").read_text()
    for png in ("scaling.png", "loss_vs_compute.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_empty_dir_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no runs found"):
        from memtrain.launch.collect import collect

        collect(tmp_path)


def test_scaling_model_by_hand():
    net = scaling.Network("n", intra_gbps=100.0, inter_gbps=50.0, latency_s=0.0)
    # one node of 4 GPUs, 1e9 params of 2 bytes: all-reduce moves 2 (n-1)/n * 2 GB over 100 GB/s = 0.03 s
    r = scaling.predict(1.0, 1e9, nodes=1, gpus_per_node=4, net=net)
    assert r["comm_s"] == pytest.approx(2 * 3 / 4 * 2e9 / 100e9)
    assert r["efficiency"] == pytest.approx(1.0 / (1.0 + r["comm_s"]))
    # ZeRO-3 moves 1.5x the all-reduce volume
    z3 = scaling.predict(1.0, 1e9, nodes=1, gpus_per_node=4, net=net, zero_stage=3)
    assert z3["comm_s"] == pytest.approx(1.5 * r["comm_s"])
    # more nodes add the inter-node term; efficiency falls monotonically
    effs = [scaling.predict(1.0, 1e9, nodes=n, gpus_per_node=4, net=net)["efficiency"] for n in (1, 2, 4, 8)]
    assert effs == sorted(effs, reverse=True)
    # a pipeline of 4 stages with 4 micro-batches has the (p-1)/m bubble
    pp = scaling.predict(1.0, 1e9, nodes=1, gpus_per_node=4, net=net, pipeline_stages=4, micro_batches=4)
    assert pp["compute_s"] == pytest.approx(0.25 * 7 / 4) and pp["comm_s"] == 0.0


def test_scale_cli(capsys):
    assert main(["scale", "--step-time", "0.1", "--params", "2e8", "--nodes", "1,2", "--tokens-per-step", "16384"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 3 and "tokens_per_s" in out
    assert main(["scale", "--nodes", "1"]) == 2


@pytest.mark.slurm
def test_adopt_slurm_env():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "nodeA",
    }
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"]
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert not adopt_slurm_env({"RANK": "0", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})  # torchrun's wins
    assert not adopt_slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})


def test_preemption_records_signals():
    p = Preemption()
    try:
        assert not p.should_stop(False, torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.should_stop(False, torch.device("cpu")) and p.requested == "SIGUSR1"
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_train_refused_before_start_restores_stop_signals(tmp_path, capsys):
    from memtrain.cli import main

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.slurm
def test_templates_are_valid_bash():
    for f in sorted((ROOT / "slurm").glob("*")):
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f
    assert SlurmConfig().launcher == "srun"
    assert subprocess.run([sys.executable, str(ROOT / "tools/local_slurm.py")], capture_output=True).returncode == 2
