"""What a training run reports: the batch-log line, throughput/FLOPs/MFU arithmetic, the W&B and MLflow sinks
(real local backends, read back and compared with metrics.jsonl, across a resume), profiler traces and the
sweep table's commit and MFU columns."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import records, tiny_config, tiny_raw, write_yaml

from memtrain.engine.trainer import train
from memtrain.errors import UserError


def _cfg(data, out, *overrides):
    return tiny_config(
        data.shards, out, "train.steps=20", "train.log_every=5", "train.ckpt_every=10", "train.eval_every=0", *overrides
    )


# ---------------------------------------------------------------------------------------------------------
# The plain log line and its numbers


def test_batch_log_has_one_plain_line_per_log_every(tiny_data, tmp_path):
    """stderr to a file (a Slurm batch log) with train.progress on: no bar, one line per logged step with
    tokens/s, TFLOP/s and (a peak given) MFU."""
    cfg = write_yaml(
        tmp_path / "c.yaml",
        tiny_raw(
            tiny_data.shards,
            tmp_path / "run",
            ["train.steps=12", "train.log_every=4", "train.progress=true", "train.peak_tflops=0.5"],
        ),
    )
    with open(tmp_path / "err", "w") as err:
        out = subprocess.run(
            [sys.executable, "-m", "memtrain", "train", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
    assert out.returncode == 0, (tmp_path / "err").read_text()
    assert "\r" not in (tmp_path / "err").read_text() + out.stdout  # no carriage-return bar
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("step ") and "tok/s" in ln]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 4/12", "step 8/12", "step 12/12"]
    for ln in lines:
        assert "loss " in ln and "(causal " in ln and "copy " in ln and "lr " in ln and "gnorm " in ln
        assert "/rank)" in ln and "TFLOP/s/rank" in ln and "MFU " in ln and "rss " in ln and "s/step" in ln
        assert "ETA " in ln
    logged = records(tmp_path / "run")
    assert logged[12]["mfu"] == pytest.approx(logged[12]["model_tflops_per_rank"] / 0.5)


def test_no_mfu_on_cpu_without_a_peak_and_meta_records_the_count(tiny_data, tmp_path, capsys):
    from memtrain.flops import stage_flops_per_token

    cfg = _cfg(tiny_data, tmp_path / "run")
    train(cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ") and "tok/s" in ln]
    assert len(lines) == 4 and not any("MFU" in ln for ln in lines)
    rec = records(tmp_path / "run")[20]
    assert "mfu" not in rec and rec["model_tflops_per_rank"] > 0
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*20/meta.json")).read_text())
    assert meta["flops_per_token"] == stage_flops_per_token(cfg, meta["vocab_size"]) and meta["peak_tflops"] is None
    assert rec["model_tflops_per_rank"] == pytest.approx(meta["flops_per_token"][0] * rec["tokens_per_s"] / 1e12)


def test_window_arithmetic_on_a_hand_example(monkeypatch, tiny_data, tmp_path):
    """1000 tokens per step, 10 steps in 2 s of which 0.5 s evaluating, 6 GFLOP per token, 2 ranks, 100
    TFLOP/s peak: 10000/1.5 tokens/s, 20 TFLOP/s per rank, MFU 0.2."""
    import memtrain.engine.rates as rates_mod
    from memtrain.engine.distributed import DistInfo

    clock = iter([0.0, 0.0, 0.2, 0.7, 2.0])
    monkeypatch.setattr(rates_mod.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(rates_mod, "stage_flops_per_token", lambda cfg, vocab: [6e9])
    import torch

    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    cfg = _cfg(tiny_data, tmp_path / "r", "train.peak_tflops=100")
    rates = rates_mod.Rates(cfg, 400, info, tokens_per_step=1000)
    rates.start()
    with rates.paused():
        pass  # 0.2 -> 0.7
    rates.steps = 10
    got = rates.window(step=15, stage=0)
    assert got["tokens_per_s"] == pytest.approx(10 * 1000 / 1.5)
    assert got["tokens_per_s_per_rank"] == pytest.approx(10 * 1000 / 1.5 / 2)
    assert got["step_time_s"] == pytest.approx(0.15) and got["eta_s"] == pytest.approx(5 * 0.15)
    assert got["model_tflops_per_rank"] == pytest.approx(6e9 * 10000 / 1.5 / 2 / 1e12)
    assert got["mfu"] == pytest.approx(got["model_tflops_per_rank"] / 100)


def test_format_line():
    from memtrain.engine.tracking import format_line

    v = {
        "loss/total": 3.25,
        "loss/causal": 3.0,
        "loss/copy": 0.5,
        "accuracy/causal": 0.1,
        "lr": 1.2e-3,
        "grad_norm": 0.84,
        "tokens_per_s": 45210.0,
        "tokens_per_s_per_rank": 22605.0,
        "model_tflops_per_rank": 123.4,
        "mfu": 0.1234,
        "memory/peak_alloc_gib": 12.5,
        "memory/peak_rss_gib": 3.0,
        "step_time_s": 0.35,
        "eta_s": 662.4,
    }
    assert format_line(120, 2000, v, {"causal": 1.0, "copy": 0.5}) == (
        "step 120/2000 | loss 3.2500 (causal 3.0000, copy 0.5000) | lr 1.20e-03 | gnorm 0.84 | "
        "45,210 tok/s (22,605/rank) | 123 TFLOP/s/rank | MFU 12.3% | mem 12.50 GiB | 0.350 s/step | ETA 0:11:02"
    )
    del v["memory/peak_alloc_gib"], v["mfu"], v["loss/copy"]
    assert "| rss 3.00 GiB |" in format_line(1, 2, v, {"causal": 1.0}) and "(causal" not in format_line(
        1, 2, v, {"causal": 1.0}
    )


# ---------------------------------------------------------------------------------------------------------
# Sinks


def test_missing_logger_stops_with_the_install_command(tiny_data, tmp_path, monkeypatch):
    import importlib.util

    from memtrain.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = write_yaml(
        tmp_path / "c.yaml", tiny_raw(tiny_data.shards, tmp_path / "run", ["train.loggers=[jsonl, wandb]"])
    )
    assert main(["train", str(cfg)]) == 2
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    with pytest.raises(UserError, match=r"train.loggers: wandb is not installed .*pip install wandb"):
        from memtrain.engine.tracking import check_loggers

        check_loggers(["jsonl", "wandb"])


def test_damaged_trackers_json_is_refused(tmp_path):
    from memtrain.engine.tracking import _read_ids

    (tmp_path / "trackers.json").write_text('{"wandb_id": "../../etc"}')
    with pytest.raises(UserError, match="trackers.json: expected"):
        _read_ids(tmp_path)
    (tmp_path / "trackers.json").write_text("{not json")
    with pytest.raises(UserError, match="trackers.json: unreadable"):
        _read_ids(tmp_path)


def _train_twice(cfg) -> None:
    """10 steps, stop (checkpoint), then resume to the end: two attempts of one run."""
    assert not train(cfg, stop_after=10)["complete"]
    assert train(cfg, resume=True)["complete"]


def _jsonl_values(run_dir: Path) -> dict[tuple[str, int], float]:
    out = {}
    for kind in ("train", "eval"):
        for step, rec in records(run_dir, kind).items():
            out.update({(k, step): float(v) for k, v in rec.items() if k not in ("kind", "step", "time")})
    return out


def test_mlflow_file_store_round_trip_with_resume(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is in requirements.txt; `make venv` installs it")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(
        tiny_data,
        tmp_path / "run",
        "train.loggers=[jsonl, mlflow]",
        f"train.mlflow.tracking_uri={uri}",
        "train.mlflow.experiment=obs",
        "train.eval_every=10",
    )
    _train_twice(cfg)
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("obs")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resume continued the same run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "memory" and run.data.params["train.steps"] == "20"
    expected = _jsonl_values(tmp_path / "run")
    logged = {}
    for key in {k for k, _ in expected}:
        for m in client.get_metric_history(run_id, key):
            logged.setdefault((key, m.step), set()).add(m.value)
    assert set(logged) == set(expected)
    assert all(vals == {expected[k]} for k, vals in logged.items())


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log: 7-byte header, 32 KiB blocks of
    records with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_round_trip_with_resume(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in requirements.txt; `make venv` installs it")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(
        tiny_data, tmp_path / "run", "train.loggers=[jsonl, wandb]", "train.wandb.project=obs", "train.eval_every=10"
    )
    _train_twice(cfg)
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb_id"]
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one run, two attempts
    logged, config = {}, {}
    for f in files:
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                assert rec.run.run_id == run_id and rec.run.project == "obs"
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = row.pop("trainer/step")
                for k, v in row.items():
                    if not k.startswith("_"):
                        logged.setdefault((k, step), set()).add(float(v))
    assert config["model"]["kind"] == "memory" and config["train"]["steps"] == 20
    expected = _jsonl_values(tmp_path / "run")
    assert set(logged) == set(expected)
    assert all(vals == {expected[k]} for k, vals in logged.items())


# ---------------------------------------------------------------------------------------------------------
# Profiling


def test_profile_writes_a_trace_and_training_continues(tiny_data, tmp_path, capsys):
    cfg = _cfg(tiny_data, tmp_path / "run", "train.profile={start: 3, steps: 2}")
    assert not train(cfg, stop_after=10)["complete"]
    prof = tmp_path / "run" / "profile"
    trace = prof / "trace-rank0-steps3-4.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)
    assert "Self CPU" in (prof / "ops-rank0-steps3-4.txt").read_text()
    assert sorted(p.name for p in prof.iterdir()) == ["ops-rank0-steps3-4.txt", "trace-rank0-steps3-4.json"]
    assert "profile: steps 3-4 of rank 0 written" in capsys.readouterr().out
    assert max(records(tmp_path / "run")) == 10
    assert train(cfg, resume=True)["complete"]  # resumed past the window: not profiled again
    assert len(list(prof.iterdir())) == 2


# ---------------------------------------------------------------------------------------------------------
# sweep collect


def test_collect_shows_commit_and_logged_mfu(tiny_data, tmp_path):
    from memtrain.launch.collect import run_record

    train(_cfg(tiny_data, tmp_path / "run", "train.peak_tflops=0.25"))
    rec = run_record(tmp_path / "run")
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*20/meta.json")).read_text())
    prov = meta["provenance"]
    assert rec["commit"] == (None if prov["commit"] is None else prov["commit"] + ("-dirty" if prov["dirty"] else ""))
    assert rec["flops_per_token"] == meta["flops_per_token"][0]
    assert 0 < rec["mfu"] < 1 and rec["tokens_per_s_per_rank"] == rec["tokens_per_s"]
    assert run_record(tmp_path / "run", peak_tflops=0.5)["mfu"] == pytest.approx(rec["model_tflops_per_rank"] / 0.5)
