"""The `memtrain` command line: `eval` output, and bad input of every kind ending in one line, exit code 2,
with nothing already written changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_YAML, tiny_config, tiny_raw, tree_hash, write_yaml

import yaml
from memtrain.cli import main
from memtrain.config import dump_config
from memtrain.engine.trainer import train


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A finished tiny run (8 steps, checkpoints at steps 4 and 8)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_data.shards, run, "train.steps=8", "train.ckpt_every=4", "train.eval_every=0"))
    return run


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit code 2 and exactly one stderr line naming every needle; returns it."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("memtrain: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train_args(tiny_data, out_dir: Path, *sets: str) -> list[str]:
    argv = [
        "train",
        str(TINY_YAML),
        "--set",
        f"data.shards={tiny_data.shards}",
        "--set",
        f"run.out_dir={out_dir}",
        "--set",
        "train.threads=1",
        "--set",
        "train.device=cpu",
    ]
    for s in sets:
        argv += ["--set", s]
    return argv


# ----------------------------------------------------------------------------------------------------
# eval


def test_eval_prints_the_table_and_writes_json(trained, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    capsys.readouterr()
    assert main(["eval", str(trained), "--batches", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| model | objective | CE (nats) |")
    for name in ("causal", "copy", "blank_copy"):
        assert f"| tiny | {name} |" in table
    res = json.loads(out.read_text())
    assert list(res) == ["tiny"] and list(res["tiny"]) == ["causal", "copy", "blank_copy"]
    for name, r in res["tiny"].items():
        assert 0 < r["ce"] < 10 and 0 <= r["accuracy"] <= 1
        assert r["exact_match_mode"] == ("greedy" if name == "blank_copy" else "teacher_forced")
    # the newest checkpoint of a run directory is its last one
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(trained / "checkpoints" / "step_0000008"),
                "--batches",
                "2",
                "--json",
                str(tmp_path / "ck.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ck.json").read_text()) == res


def test_eval_greedy_and_objective_choice(trained, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "eval",
                str(trained),
                "--batches",
                "1",
                "--batch-size",
                "2",
                "--greedy",
                "--objectives",
                "causal,copy",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["tiny"]
    assert list(res) == ["causal", "copy"]
    for r in res.values():
        assert r["exact_match_mode"] == "greedy"
        assert 0 <= r["greedy_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1
    assert "(tf)" not in capsys.readouterr().out


def test_eval_two_checkpoints_get_their_own_rows(trained, capsys):
    assert (
        main(
            [
                "eval",
                str(trained / "checkpoints" / "step_0000004"),
                str(trained),
                "--batches",
                "1",
                "--objectives",
                "causal",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.count("| causal |") == 2 and f"| tiny ({trained}) | causal |" in table


# ----------------------------------------------------------------------------------------------------
# bad configs


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {chunk_len: 8\ntrain: {steps: 3}\n")
    fails(capsys, ["train", bad], str(bad), "malformed YAML", "line")


def test_unknown_key_suggests_the_closest(tiny_data, tmp_path, capsys):
    raw = tiny_raw(tiny_data.shards, tmp_path / "run")
    raw["train"]["stepz"] = 5
    path = write_yaml(tmp_path / "typo.yaml", raw)
    fails(capsys, ["train", path], str(path), "unknown config key 'train.stepz'", "did you mean 'steps'")
    fails(capsys, train_args(tiny_data, tmp_path / "run", "optim.lrr=1e-3"), "'optim.lrr'", "did you mean 'lr'")
    assert not (tmp_path / "run").exists()


def test_wrong_type_and_out_of_range(tiny_data, tmp_path, capsys):
    fails(capsys, train_args(tiny_data, tmp_path / "run", "train.steps=many"), "train.steps", "'many'")
    fails(capsys, train_args(tiny_data, tmp_path / "run", "optim.lr=-1"), "optim.lr", "greater than 0")
    fails(capsys, train_args(tiny_data, tmp_path / "run", "model.encoder.arch=lstm"), "model.encoder.arch")
    fails(capsys, train_args(tiny_data, tmp_path / "run", "train.steps=5") + ["--stop-after", "0"], "--stop-after")
    assert not (tmp_path / "run").exists()


def test_row_length_must_match_the_shards(tiny_data, tmp_path, capsys):
    fails(
        capsys,
        train_args(tiny_data, tmp_path / "run", "model.chunk_len=16"),
        "data.shards",
        str(tiny_data.shards),
        "rows hold 32 tokens",
        "model.chunk_len x model.n_chunks = 16 x 4",
    )
    assert not (tmp_path / "run").exists()


def test_missing_shard_directory(tiny_data, tmp_path, capsys):
    missing = tmp_path / "no" / "shards"
    fails(capsys, train_args(tiny_data, tmp_path / "run", f"data.shards={missing}"), str(missing))
    assert not (tmp_path / "run").exists()


def test_validation_split_too_small_for_a_batch_stops_before_training(tiny_data, tmp_path, capsys):
    fails(
        capsys,
        train_args(tiny_data, tmp_path / "run", "data.batch_size=400"),
        str(tiny_data.shards),
        "split 'val'",
        "fewer than one batch of 400",
    )
    assert not (tmp_path / "run").exists()


def test_missing_or_empty_corpus_for_data_shards(tiny_data, tmp_path, capsys):
    out = tmp_path / "shards"
    missing = tmp_path / "missing.jsonl"
    fails(
        capsys,
        [
            "data",
            "shards",
            "--input",
            missing,
            "--tokenizer",
            tiny_data.tokenizer,
            "--out",
            out,
            "--row-len",
            "32",
            "--no-progress",
        ],
        str(missing),
        "not found",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(
        capsys,
        [
            "data",
            "shards",
            "--input",
            empty,
            "--tokenizer",
            tiny_data.tokenizer,
            "--out",
            out,
            "--row-len",
            "32",
            "--no-progress",
            "--workers",
            "1",
        ],
        str(empty),
        "no documents",
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no temporary build left either


# ----------------------------------------------------------------------------------------------------
# mismatched checkpoints and shards


def test_eval_against_shards_of_another_tokenizer(trained, other_data, capsys):
    fails(
        capsys, ["eval", trained, "--shards", other_data.shards, "--batches", "1"], str(other_data.shards), "tokenizer"
    )


def test_eval_checkpoint_whose_config_has_other_shapes(trained, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(trained / "checkpoints" / "step_0000008", ck)
    text = (ck / "config.yaml").read_text()
    assert text.count("d_model: 32") == 2
    (ck / "config.yaml").write_text(text.replace("d_model: 32", "d_model: 64"))
    fails(capsys, ["eval", ck, "--batches", "1"], str(ck / "model.safetensors"), "do not fit this model config")


def test_damaged_checkpoint_files(trained, tiny_data, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(trained / "checkpoints" / "step_0000008", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:1000])
    fails(capsys, ["eval", ck], str(ck / "model.safetensors"), "damaged")
    # a run whose newest checkpoint has a damaged trainer state resumes from the previous complete one
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "config.yaml").write_text(
        dump_config(tiny_config(tiny_data.shards, run, "train.steps=8", "train.ckpt_every=4", "train.eval_every=0"))
    )
    (run / "checkpoints" / "step_0000008" / "trainer.pt").write_bytes(b"not a torch file")
    good = tree_hash(run / "checkpoints" / "step_0000004")
    assert (
        main(
            train_args(
                tiny_data, run, "train.steps=8", "train.ckpt_every=4", "train.eval_every=0", "train.progress=false"
            )
            + ["--resume"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "step_0000008" in err and "damaged" in err and err.count("\n") == 1
    assert "step_0000004" in out
    assert tree_hash(run / "checkpoints" / "step_0000004") == good  # the good checkpoint is never touched
    assert torch.load(run / "checkpoints" / "step_0000008" / "trainer.pt", weights_only=True)  # written anew


def test_resume_from_a_checkpoint_of_another_model_config(trained, tiny_data, tmp_path, capsys):
    """The run directory's config matches, but its checkpoint has other shapes (copied in from elsewhere)."""
    run = tmp_path / "run"
    sets = (
        "train.steps=8",
        "train.ckpt_every=4",
        "train.eval_every=0",
        "train.progress=false",
        "model.encoder.d_model=64",
        "model.decoder.d_model=64",
    )
    shutil.copytree(trained, run)
    (run / "config.yaml").write_text(dump_config(tiny_config(tiny_data.shards, run, *sets)))
    before = tree_hash(run)
    fails(
        capsys,
        train_args(tiny_data, run, *sets) + ["--resume"],
        str(run / "checkpoints" / "step_0000008" / "model.safetensors"),
        "do not fit this model config",
    )
    assert tree_hash(run) == before


def test_out_dir_holding_another_run_is_left_alone(trained, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    same = ("train.steps=8", "train.ckpt_every=4", "train.eval_every=0", "train.progress=false")
    (run / "config.yaml").write_text(dump_config(tiny_config(tiny_data.shards, run, *same)))
    before = tree_hash(run)
    fails(
        capsys, train_args(tiny_data, run, *same, "optim.lr=1e-3"), "run.out_dir", str(run), "different run", "optim.lr"
    )
    fails(capsys, train_args(tiny_data, run, *same, "optim.lr=1e-3") + ["--resume"], "different run", "optim.lr")
    # the same run again without --resume
    fails(capsys, train_args(tiny_data, run, *same), "run.out_dir", "up to step 8", "--resume")
    assert tree_hash(run) == before
    # a directory that is not a run at all
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me\n")
    fails(capsys, train_args(tiny_data, other, *same), "run.out_dir", str(other), "not a memtrain run directory")
    assert (other / "todo.txt").read_text() == "keep me\n" and len(list(other.iterdir())) == 1


def test_error_in_a_real_process_is_one_line_without_traceback(tiny_data, tmp_path):
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "memtrain", *train_args(tiny_data, tmp_path / "run", f"data.shards={missing}")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrain: error: ") and str(missing) in lines[0]
    assert done.stdout == "" and not (tmp_path / "run").exists()


def test_train_cli_runs_and_stops_for_resume(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    sets = ("train.steps=6", "train.ckpt_every=0", "train.eval_every=0", "train.progress=false")
    assert main(train_args(tiny_data, run, *sets) + ["--stop-after", "2"]) == 0
    out = capsys.readouterr().out
    assert "stopped after step 2 of 6; continue with --resume" in out and "| tiny |" not in out
    assert main(train_args(tiny_data, run, *sets) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "at step 2;" in out and "| tiny | causal |" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    # resuming the finished run changes nothing and shows its results again
    before = tree_hash(run)
    assert main(train_args(tiny_data, run, *sets) + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "is complete at step 6; nothing to do" in again
    assert again.splitlines()[-4:] == out.splitlines()[-4:] and "| tiny | causal |" in again
    assert tree_hash(run) == before


def test_version_names_the_package_and_the_checkout_commit(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    from memtrain import __version__

    assert out.startswith(f"memtrain {__version__}")
    if (Path(__file__).resolve().parents[1] / ".git").exists() and shutil.which("git"):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
        assert out == f"memtrain {__version__} (commit {head})"


def test_shipped_configs_by_name(tmp_path, monkeypatch, capsys):
    from memtrain.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").run.name == load_config(TINY_YAML).run.name == "tiny"
    assert load_config("yaml/tiny.yaml") == load_config("tiny.yaml") == load_config(TINY_YAML)
    assert load_config("paper/memory_mixer_e512_d512").model.encoder.kernel == 4
    (tmp_path / "tiny.yaml").write_text(TINY_YAML.read_text().replace("name: tiny", "name: mine"))
    assert load_config("tiny.yaml").run.name == "mine"  # a file of the user's always wins over a shipped name
    assert main(["train", "no_such_config"]) == 2
    assert (
        "no_such_config: config file not found (shipped configs by name: memtrain configs list)"
        in capsys.readouterr().err
    )

    assert main(["configs", "list"]) == 0
    listing = capsys.readouterr().out
    assert "\ntiny " in listing and "paper/memory_mixer_e512_d512 " in listing and "repro/probe " in listing
    assert main(["configs", "show", "tiny"]) == 0
    assert capsys.readouterr().out == TINY_YAML.read_text()
    assert main(["configs", "copy", "tiny", "paper/repro", "--to", "mine"]) == 0
    assert (tmp_path / "mine" / "tiny.yaml").read_text() == TINY_YAML.read_text()
    assert (tmp_path / "mine" / "paper" / "repro.yaml").is_file()
    before = (tmp_path / "mine" / "tiny.yaml").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["configs", "copy", "quickstart", "tiny", "--to", "mine"]) == 2  # nothing written, nothing replaced
    assert capsys.readouterr().err.strip().endswith("tiny.yaml: already exists (use --force to overwrite)")
    assert not (tmp_path / "mine" / "quickstart.yaml").exists()
    assert (tmp_path / "mine" / "tiny.yaml").stat().st_mtime_ns == before
    assert main(["configs", "copy", "nope", "--to", "mine"]) == 2
    assert "nope: no shipped config of that name" in capsys.readouterr().err


def test_readme_lists_every_subcommand():
    import argparse

    from memtrain.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        name
        for name in sub.choices
        if f"memtrain {name}" not in readme and f"| {name} " not in readme and f" {name} |" not in readme
    ]
    assert not missing, f"README.md's command list lacks: {', '.join(missing)}"


def test_output_piped_into_head_ends_quietly(tmp_path):
    out = subprocess.run(
        f"'{sys.executable}' -m memtrain configs list | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stderr == "" and out.stdout.startswith("# shipped configs")


@pytest.mark.faults
def test_preemption_signal_during_the_first_imports_of_train_is_honoured(tiny_data, tmp_path):
    """USR1 while `memtrain train` is still importing torch: remembered, the run stops before its first step
    with the marker and exit code 75 (requeue), instead of dying by the signal's default action."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrain", *train_args(tiny_data, tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    from memtrain.launch.node import catches_usr1

    # as soon as the handler is in (first thing `memtrain train` does; the parser's imports of torch take a few
    # seconds more): an earlier signal would meet the default action, as it does for any program
    deadline = time.monotonic() + 60
    while not catches_usr1(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-2000:]
    assert (tmp_path / "run" / "PREEMPTED").is_file()


def test_run_metadata_names_the_code_libraries_devices_and_launcher(trained, capsys):
    """meta.json of every checkpoint and summary.json record what produced the run; eval shows the commit."""
    from memtrain import __version__
    from memtrain.version import git_commit, launcher, library_versions

    for ck in sorted((trained / "checkpoints").iterdir()):
        p = json.loads((ck / "meta.json").read_text())["provenance"]
        assert p["memtrain"] == __version__ and p["commit"] == git_commit() and p["world_size"] == 1
        assert p["launcher"] == "single process" and p["devices"] and p["host"]
        assert p["versions"] == library_versions()
        assert set(p["versions"]) >= {"python", "torch", "deepspeed", "mosaicml-streaming", "triton"}
        if git_commit() is not None and "MEMTRAIN_COMMIT" not in os.environ:
            assert isinstance(p["dirty"], bool)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["provenance"]["commit"] == git_commit()
    capsys.readouterr()
    assert main(["eval", str(trained), "--batches", "1"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("# ")]
    assert len(line) == 1 and line[0].endswith(
        f"step_0000008: trained by memtrain {__version__}, commit "
        f"{git_commit() or 'unknown commit'}" + (" (dirty)" if p["dirty"] else "")
    )
    assert launcher({"TORCHELASTIC_RUN_ID": "x", "RANK": "0"}) == "torchrun"
    assert launcher({"CROSS_RANK": "0", "LOCAL_SIZE": "2", "RANK": "0"}) == "deepspeed"
    assert launcher({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "RANK": "1"}) == "srun"
