"""Frozen-encoder memory precomputation: what the shards hold, resumable and parallel jobs that write the same
bytes as one uninterrupted job, and every bad input stopped with one line before anything trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import records, tiny_config

from memtrain.cli import main
from memtrain.data import memory_manifest as mf
from memtrain.data.ingest import build_shards
from memtrain.data.loader import make_loader, read_shard_info
from memtrain.data.memories import MemoryBatch, open_memories, split_memories
from memtrain.data.tokenizer import file_sha256
from memtrain.data.units import resolve_slice
from memtrain.engine.trainer import build_for_run, train
from memtrain.errors import UserError
from memtrain.objectives import compute_losses, make_task, special_tokens
from memtrain.precompute import job as pj

TASKS = ("causal", "copy", "blank_copy")


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by relative path (hidden leftovers included)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokens(tiny_data, tmp_path_factory) -> Path:
    """The tiny corpus as token shards of ~4 kB: about 50 train and 3 val shards (units), rows of 4 x 8."""
    out = tmp_path_factory.mktemp("tokens") / "shards"
    build_shards(
        [str(tiny_data.corpus)],
        tiny_data.tokenizer,
        out,
        row_len=32,
        val_fraction=0.05,
        workers=1,
        shard_size="4kb",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def encoder_run(tokens, tmp_path_factory) -> Path:
    """A tiny memory model trained for 3 steps: its encoder is the frozen encoder of these tests."""
    run = tmp_path_factory.mktemp("encoder") / "run"
    train(tiny_config(tokens, run, "train.steps=3", "train.eval_every=0", "optim.lr=0.05"))
    return run


@pytest.fixture(scope="module")
def mem_fp32(tokens, encoder_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mem") / "fp32"
    pj.run_precompute(encoder_run, tokens, out, dtype="fp32", batch_size=16, threads=1, progress=False)
    return out


def run_cfg(tokens: Path, out: Path, encoder_run: Path, memories: Path | None, *overrides: str):
    extra = [f"model.frozen_encoder.checkpoint={encoder_run}"] + ([f"data.memories={memories}"] if memories else [])
    return tiny_config(tokens, out, *extra, *overrides)


# ----------------------------------------------------------------------------------------------------
# What is stored


def test_memories_are_the_frozen_encoders_for_every_task(tokens, encoder_run, mem_fp32, tmp_path):
    man = mf.read_manifest(mem_fp32)
    info = read_shard_info(tokens)
    assert man["tokenizer_sha256"] == info.tokenizer_sha256
    assert (man["chunk_len"], man["n_chunks"], man["row_len"], man["dtype"]) == (8, 4, 32, "fp32")
    assert man["tasks"] == {
        "blank_copy": {"column": "blank_copy", "chunks": [2]},
        "causal": {"column": "mem", "chunks": [0, 1, 2]},
        "copy": {"column": "copy", "chunks": [2]},
    }
    assert man["special_tokens"] == {"pad_id": 0, "delimiter_id": 4, "n_delimiters": 1, "filler_id": 5}
    for split in ("train", "val"):
        token_index = json.loads((tokens / split / "index.json").read_text())
        assert man["tokens"]["splits"][split]["shards"] == len(token_index["shards"]) > 1
        assert [u["samples"] for u in man["splits"][split]["units"]] == [s["samples"] for s in token_index["shards"]]
        assert man["splits"][split]["samples"] == info.rows(split)
    assert len(man["splits"]["train"]["units"]) >= 20

    # the training model's encoder (loaded through frozen_encoder) computes exactly what was stored
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, mem_fp32)
    model, _ = build_for_run(cfg, torch.device("cpu"), info.vocab_size)
    model.freeze(["encoder"])
    mems = open_memories(cfg, info)
    mems.check_encoder(model)
    special = special_tokens(cfg.objective, info.special_ids)
    loader = make_loader(tokens, "train", batch_size=5, shuffle=True, seed=3, memories=mems)
    try:
        for _, batch in zip(range(3), loader):
            assert isinstance(batch, MemoryBatch)
            ids, memories = split_memories(batch)
            assert set(memories) == set(TASKS)
            for task in TASKS:
                inputs, _ = make_task(task, ids, special, 4)
                with torch.no_grad():
                    want = model.encode(inputs)  # [B, 3, 32]
                assert memories[task].shape == want.shape == (5, 3, 32)
                torch.testing.assert_close(memories[task], want, rtol=1e-5, atol=1e-5)
            assert not torch.equal(memories["copy"], memories["blank_copy"])
            assert torch.equal(memories["copy"][:, :2], memories["causal"][:, :2])
    finally:
        loader.close()
    # idx: each memory sample names its token sample
    shards = open_memories(cfg, info, split="val")
    assert [int(shards.get(i)["idx"]) for i in range(len(shards))] == list(range(info.rows("val")))


def test_an_autoencoders_encoder_gives_the_memories(tiny_data, tokens, tmp_path):
    """An autoencoder of one 8-token chunk, trained on its own shards: its encoder makes the memories of
    chunks 0..2 of the 4 x 8 rows."""
    from safetensors.torch import load_file

    from memtrain.config import load_config
    from memtrain.data.memories import MemoryShards
    from memtrain.engine.checkpoint import latest_checkpoint
    from memtrain.models import build_model

    ae_tokens = tmp_path / "ae_tokens"
    build_shards(
        [str(tiny_data.corpus)], tiny_data.tokenizer, ae_tokens, row_len=8, val_fraction=0.05, workers=1, progress=False
    )
    run = tmp_path / "ae"
    train(
        tiny_config(
            ae_tokens,
            run,
            "model.kind=autoencoder",
            "model.n_chunks=1",
            "train.steps=1",
            "train.eval_every=0",
            "objective.weights={reconstruction: 1.0}",
        )
    )
    out = tmp_path / "mem"
    summary = pj.run_precompute(
        run, tokens, out, splits=["val"], dtype="fp32", tasks=["causal"], batch_size=32, threads=1, progress=False
    )
    man = mf.read_manifest(out)
    assert summary["merged"] and man["encoder"]["source_kind"] == "autoencoder" and man["n_chunks"] == 4
    assert list(man["tasks"]) == ["causal"] and man["splits"]["val"]["samples"] == read_shard_info(tokens).rows("val")
    ckpt = latest_checkpoint(run).path
    ae = build_model(load_config(ckpt / "config.yaml").model, 400)
    ae.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    loader = make_loader(tokens, "val", batch_size=6, shuffle=False, seed=0, max_batches=1)
    ids = next(iter(loader))
    loader.close()
    shards = MemoryShards(out, "val", man)
    stored = torch.from_numpy(np.stack([shards.get(i)["mem"] for i in range(6)]))  # [6, 3 * 32]
    with torch.no_grad():
        want = ae.encode(ids[:, :24].reshape(18, 8)).reshape(6, 3 * 32)
    torch.testing.assert_close(stored, want, rtol=1e-5, atol=1e-5)


def test_bf16_and_fp16_storage_round_trip(tokens, encoder_run, mem_fp32, tmp_path):
    info = read_shard_info(tokens)
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, mem_fp32)
    ref = open_memories(cfg, info, split="val")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / dtype
        summary = pj.run_precompute(
            encoder_run, tokens, out, splits=["val"], dtype=dtype, batch_size=16, threads=1, progress=False
        )
        assert summary["merged"] and summary["memories"] == info.rows("val") * 5  # 3 plain + 1 per copy task
        got = open_memories(run_cfg(tokens, tmp_path / "r", encoder_run, out), info, split="val")
        samples = [got.get(i) for i in range(4)]
        batch = got.collate([dict(s, input_ids=np.zeros(32, np.uint16), memories=s) for s in samples])
        want = ref.collate(
            [dict(s, input_ids=np.zeros(32, np.uint16), memories=s) for s in (ref.get(i) for i in range(4))]
        )
        for task in TASKS:
            assert batch.memories[task].dtype == torch_dtype
            assert torch.equal(batch.memories[task], want.memories[task].to(torch_dtype))


# ----------------------------------------------------------------------------------------------------
# Resumable and parallel jobs


def test_crash_mid_unit_then_resume_writes_the_same_bytes(tokens, encoder_run, mem_fp32, tmp_path, monkeypatch):
    out = tmp_path / "mem"
    real = pj.encode_rows
    calls = {"n": 0}

    def crash_on_the_20th_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # as if killed while unit 6 is half-written
        return real(*args, **kwargs)

    monkeypatch.setattr(pj, "encode_rows", crash_on_the_20th_batch)
    with pytest.raises(KeyboardInterrupt):
        pj.run_precompute(encoder_run, tokens, out, dtype="fp32", batch_size=16, threads=1, progress=False)
    done = sorted(p.name for p in (out / "train").iterdir())
    assert done and all(n.startswith("unit_") for n in done)  # nothing half-written under a final name
    assert not (out / mf.MANIFEST_FILE).exists() and not (out / "train" / "index.json").exists()
    with pytest.raises(UserError, match="not finished"):
        mf.read_manifest(out)
    monkeypatch.setattr(pj, "encode_rows", real)
    summary = pj.run_precompute(encoder_run, tokens, out, dtype="fp32", batch_size=16, threads=1, progress=False)
    assert summary["skipped"] == len(done) and summary["computed"] == summary["units"] - len(done)
    assert tree_bytes(out) == tree_bytes(mem_fp32)


def test_sigkill_and_resume_writes_the_same_bytes(tokens, encoder_run, mem_fp32, tmp_path):
    """A real `memtrain precompute` process killed mid-job, then run again: the same bytes as one
    uninterrupted job (``mem_fp32``: same dtype, batch size and thread count)."""
    args = ["--dtype", "fp32", "--batch-size", "16", "--threads", "1", "--no-progress"]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "memtrain",
        "precompute",
        str(encoder_run),
        "--shards",
        str(tokens),
        "--out",
        str(killed),
        *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(list((killed / "train").glob("unit_*"))) >= 3 if (killed / "train").is_dir() else False:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (killed / mf.MANIFEST_FILE).exists()
    resumed = pj.run_precompute(encoder_run, tokens, killed, dtype="fp32", batch_size=16, threads=1, progress=False)
    assert resumed["skipped"] >= 3 and resumed["computed"] >= 1 and resumed["merged"]  # killed mid-job
    assert tree_bytes(killed) == tree_bytes(mem_fp32)
    assert main(["precompute", "--verify", str(killed)]) == 0


def test_slices_merge_into_one_index(tokens, encoder_run, mem_fp32, tmp_path, capsys):
    out = tmp_path / "mem"
    first = pj.run_precompute(
        encoder_run, tokens, out, dtype="fp32", batch_size=16, rank=2, world=3, threads=1, progress=False
    )
    second = pj.run_precompute(
        encoder_run, tokens, out, dtype="fp32", batch_size=16, rank=0, world=3, threads=1, progress=False
    )
    assert not first["merged"] and not second["merged"]
    assert main(["precompute", "--merge", str(out)]) == 2
    assert "unit(s) not done yet" in capsys.readouterr().err
    units = first["units"] + second["units"]
    env = {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_slice(None, None, env) == (1, 3)
    assert resolve_slice(None, None, {"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert resolve_slice(None, None, {}) == (0, 1)
    with pytest.raises(UserError, match="0 <= rank < world"):
        resolve_slice(3, 3, {})
    last = pj.run_precompute(
        encoder_run, tokens, out, dtype="fp32", batch_size=16, rank=1, world=3, threads=1, progress=False
    )
    assert last["merged"] and units + last["units"] == len(mf.read_manifest(out)["splits"]["train"]["units"]) + len(
        mf.read_manifest(out)["splits"]["val"]["units"]
    )
    assert tree_bytes(out) == tree_bytes(mem_fp32)
    assert main(["precompute", "--merge", str(out)]) == 0  # merging again changes nothing
    assert tree_bytes(out) == tree_bytes(mem_fp32)


def test_a_job_resumed_with_other_settings_is_refused(tokens, encoder_run, mem_fp32, tmp_path, capsys):
    out = tmp_path / "mem"
    shutil.copytree(mem_fp32, out)
    assert main(["precompute", str(encoder_run), "--shards", str(tokens), "--out", str(out), "--dtype", "bf16"]) == 2
    assert 'started with dtype = "fp32", this job has "bf16"' in capsys.readouterr().err
    assert (
        main(
            [
                "precompute",
                str(encoder_run),
                "--shards",
                str(tokens),
                "--out",
                str(out),
                "--dtype",
                "fp32",
                "--tasks",
                "causal",
            ]
        )
        == 2
    )
    assert "started with tasks" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert main(["precompute", str(encoder_run), "--shards", str(tokens), "--out", str(tmp_path / "other")]) == 2
    assert "not a memory-shard directory" in capsys.readouterr().err


def test_precompute_input_errors_are_one_line(tokens, encoder_run, other_data, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "nope"), "--shards", str(tokens)], "checkpoint not found"),
        ([str(encoder_run), "--shards", str(other_data.shards)], "tokenizer"),
        ([str(encoder_run), "--shards", str(tokens), "--tasks", "causal,mirror"], "--tasks mirror: unknown"),
        ([str(encoder_run), "--shards", str(tokens), "--split", "test"], "--split test"),
        ([str(encoder_run), "--shards", str(tokens), "--n-delimiters", "16"], "n_delimiters"),
    ]
    for args, needle in cases:
        assert main(["precompute", *args, "--out", str(tmp_path / "m")]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


# ----------------------------------------------------------------------------------------------------
# Bad memory directories and runs that do not fit them: stopped before anything trains


def _open(cfg, tokens: Path):
    info = read_shard_info(tokens)
    m = open_memories(cfg, info)
    loader = make_loader(tokens, "train", batch_size=4, shuffle=True, seed=0, memories=m)
    try:
        return next(iter(loader))
    finally:
        loader.close()


def test_bad_memory_directories_are_refused(tokens, encoder_run, mem_fp32, tmp_path):
    # a truncated shard
    bad = tmp_path / "truncated"
    shutil.copytree(mem_fp32, bad)
    shard = bad / "train" / "unit_00003" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"unit_00003/shard.00000.mds: memory shard truncated"):
        _open(run_cfg(tokens, tmp_path / "r", encoder_run, bad), tokens)
    with pytest.raises(UserError, match="truncated"):
        pj.verify_memories(bad)
    summary = pj.run_precompute(encoder_run, tokens, bad, dtype="fp32", batch_size=16, threads=1, progress=False)
    assert summary["computed"] == 1 and summary["merged"]  # the damaged unit, and only it, is made again
    assert tree_bytes(bad) == tree_bytes(mem_fp32)
    # a manifest edited by hand
    bad = tmp_path / "edited"
    shutil.copytree(mem_fp32, bad)
    man = json.loads((bad / mf.MANIFEST_FILE).read_text())
    man["dtype"] = "bf16"
    (bad / mf.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(UserError, match="checksum does not match its contents"):
        _open(run_cfg(tokens, tmp_path / "r", encoder_run, bad), tokens)
    # an index replaced by hand
    bad = tmp_path / "index"
    shutil.copytree(mem_fp32, bad)
    (bad / "train" / "index.json").write_text((bad / "val" / "index.json").read_text())
    with pytest.raises(UserError, match="differs from the index the manifest records"):
        _open(run_cfg(tokens, tmp_path / "r", encoder_run, bad), tokens)


def test_misaligned_memory_samples_stop_the_loader(tokens, encoder_run, mem_fp32, tmp_path):
    """Shards whose idx column is shifted by one (a consistent manifest written by --merge): the first
    misaligned sample stops the loader, no batch with it is yielded."""
    from memtrain.data.streaming_compat import import_streaming

    streaming = import_streaming()
    bad = tmp_path / "shifted"
    shutil.copytree(mem_fp32, bad)
    (bad / mf.MANIFEST_FILE).unlink()
    unit = bad / "train" / "unit_00000"
    shards = open_memories(run_cfg(tokens, tmp_path / "r", encoder_run, mem_fp32), read_shard_info(tokens))
    n = json.loads((unit / mf.UNIT_FILE).read_text())["samples"]
    samples = [dict(shards.get(i), idx=i + 1) for i in range(n)]
    shutil.rmtree(unit)
    tmp = bad / "train" / "tmp"
    columns = json.loads((mem_fp32 / "train" / "unit_00000" / "index.json").read_text())["shards"][0]
    writer = streaming.MDSWriter(
        out=str(tmp),
        columns=dict(zip(columns["column_names"], columns["column_encodings"])),
        compression=None,
        size_limit=None,
        progress_bar=False,
    )
    for s in samples:
        writer.write(s)
    writer.finish()
    f = tmp / "shard.00000.mds"
    rec = {
        "unit": "unit_00000",
        "token_shard": "shard.00000.mds",
        "first_sample": 0,
        "samples": n,
        "shard": "shard.00000.mds",
        "bytes": f.stat().st_size,
        "sha256": file_sha256(f),
    }
    (tmp / mf.UNIT_FILE).write_text(json.dumps(rec))
    tmp.rename(unit)
    assert main(["precompute", "--merge", str(bad)]) == 0
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, bad)
    loader = make_loader(
        tokens, "train", batch_size=n, shuffle=False, seed=0, memories=open_memories(cfg, read_shard_info(tokens))
    )
    try:
        with pytest.raises(UserError, match="memory sample 0 of split 'train' is stored for token sample 1"):
            next(iter(loader))
    finally:
        loader.close()


def test_runs_that_do_not_fit_the_memories_are_refused(tokens, encoder_run, mem_fp32, tiny_data, other_data, tmp_path):
    info = read_shard_info(tokens)

    def refused(match: str, *overrides: str, memories: Path = mem_fp32, shards: Path = tokens) -> None:
        cfg = run_cfg(shards, tmp_path / "r", encoder_run, memories, *overrides)
        with pytest.raises(UserError, match=match):
            open_memories(cfg, read_shard_info(shards))

    refused("made from token shards of tokenizer", shards=other_data.shards)
    refused("model.chunk_len is 16", "model.chunk_len=16", "model.n_chunks=2")
    refused(r"model.encoder.n_layers is 2, but the encoder of the memories .* has 1", "model.encoder.n_layers=2")
    refused("model.memory_position is -2", "model.memory_position=-2")
    refused("for a frozen encoder; set model.frozen_encoder.checkpoint", "model.frozen_encoder=null")
    refused(
        r"objective.n_delimiters is 2, but the copy memories .* made with 1; precompute with --n-delimiters 2",
        "objective.n_delimiters=2",
    )
    # token shards of the same tokenizer and corpus, cut into other shards: another index
    other = tmp_path / "other_tokens"
    build_shards(
        [str(tiny_data.corpus)],
        tiny_data.tokenizer,
        other,
        row_len=32,
        val_fraction=0.05,
        workers=1,
        shard_size="8kb",
        progress=False,
    )
    with pytest.raises(UserError, match="made from other token shards"):
        _open(run_cfg(other, tmp_path / "r", encoder_run, mem_fp32), other)
    # memories without the copy task's, for a run that trains copy
    causal_only = tmp_path / "causal"
    pj.run_precompute(
        encoder_run,
        tokens,
        causal_only,
        splits=["train"],
        dtype="bf16",
        tasks=["causal"],
        batch_size=64,
        threads=1,
        progress=False,
    )
    refused(
        r"objective.weights: objective copy has no precomputed memories .* --tasks causal,copy", memories=causal_only
    )
    refused(
        r"curriculum stage 'blank': objective blank_copy has no precomputed memories",
        "curriculum=[{name: plain, steps: 2, weights: {causal: 1.0}}, "
        "{name: blank, steps: 2, weights: {blank_copy: 1.0}}]",
        "train.steps=4",
        memories=causal_only,
    )
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, causal_only, "objective.weights={causal: 1.0}")
    open_memories(cfg, info)  # a causal-only run fits
    # another encoder: the same config, other weights
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, mem_fp32)
    shards = open_memories(cfg, info)
    model, _ = build_for_run(cfg, torch.device("cpu"), info.vocab_size)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1e-3)
    with pytest.raises(UserError, match="its encoder weights are not those the memories"):
        shards.check_encoder(model)


def test_compute_losses_with_per_objective_memories(tokens, encoder_run, mem_fp32, tmp_path):
    cfg = run_cfg(tokens, tmp_path / "r", encoder_run, mem_fp32)
    info = read_shard_info(tokens)
    model, _ = build_for_run(cfg, torch.device("cpu"), info.vocab_size)
    model.freeze(["encoder"])
    special = special_tokens(cfg.objective, info.special_ids)
    batch = _open(cfg, tokens)
    ids, memories = split_memories(batch)
    weights = {"causal": 1.0, "copy": 0.5, "blank_copy": 0.25}
    total, parts = compute_losses(model, ids, weights, special)
    total_m, parts_m = compute_losses(model, ids, weights, special, memories=memories)
    assert total_m.item() == pytest.approx(total.item(), abs=1e-5)
    for name in weights:
        assert parts_m[name].loss.item() == pytest.approx(parts[name].loss.item(), abs=1e-5)
    with pytest.raises(ValueError, match="no precomputed memories for the blank_copy objective"):
        compute_losses(model, ids, weights, special, memories={"causal": memories["causal"], "copy": memories["copy"]})
    with pytest.raises(ValueError, match="feeds the encoder different inputs"):
        compute_losses(model, ids, weights, special, memories=memories["causal"])


# ----------------------------------------------------------------------------------------------------
# Training from precomputed memories


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from memtrain.engine.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir).path / "model.safetensors"))


def test_training_from_memories_equals_the_encoder_in_the_loop(tokens, encoder_run, mem_fp32, tmp_path):
    """Same config, steps and data order: the decoder's losses and weights from precomputed fp32 memories are
    those of training with the frozen encoder in the loop (bf16 memories: within bf16 rounding)."""
    common = [
        "train.steps=8",
        "train.log_every=1",
        "train.eval_every=4",
        "train.ckpt_every=0",
        "objective.weights={causal: 1.0, copy: 0.5, blank_copy: 0.5}",
    ]
    train(run_cfg(tokens, tmp_path / "loop", encoder_run, None, *common))
    train(run_cfg(tokens, tmp_path / "mem", encoder_run, mem_fp32, *common))
    loop, mem = records(tmp_path / "loop"), records(tmp_path / "mem")
    assert sorted(loop) == sorted(mem) == list(range(1, 9))
    for s in range(1, 9):
        for key in ("loss/total", "loss/causal", "loss/copy", "loss/blank_copy"):
            assert mem[s][key] == pytest.approx(loop[s][key], abs=2e-5), (s, key)
    assert loop[8]["loss/total"] < loop[1]["loss/total"]  # it trains
    eval_loop, eval_mem = records(tmp_path / "loop", "eval"), records(tmp_path / "mem", "eval")
    assert eval_mem[4]["eval/copy/ce"] == pytest.approx(eval_loop[4]["eval/copy/ce"], abs=2e-5)
    wl, wm = final_weights(tmp_path / "loop"), final_weights(tmp_path / "mem")
    assert sorted(wl) == sorted(wm)
    for k in wl:
        if k.startswith("encoder."):
            assert torch.equal(wl[k], wm[k]), k  # frozen in both
        else:
            torch.testing.assert_close(wm[k], wl[k], rtol=1e-4, atol=1e-5, msg=k)

    bf16 = tmp_path / "bf16"
    pj.run_precompute(
        encoder_run, tokens, bf16, splits=["train"], dtype="bf16", batch_size=64, threads=1, progress=False
    )
    train(run_cfg(tokens, tmp_path / "mem-bf16", encoder_run, bf16, *common, "train.steps=4", "train.eval_every=0"))
    low = records(tmp_path / "mem-bf16")
    for s in range(1, 5):
        assert low[s]["loss/total"] == pytest.approx(loop[s]["loss/total"], rel=5e-3), s


CURRICULUM = (
    "curriculum=[{name: blank_copy, steps: 4, weights: {blank_copy: 1.0}}, "
    "{name: copy, steps: 4, weights: {copy: 1.0}}, "
    "{name: causal_copy, steps: 4, weights: {causal: 1.0, copy: 0.5}}]"
)


def test_frozen_encoder_curriculum_from_memories_resumes_mid_stage(
    tokens, encoder_run, mem_fp32, tmp_path, monkeypatch
):
    """Blank copy -> copy -> causal + copy in one run from one config, trained from precomputed memories; a
    run that crashes in the middle of the copy stage and is resumed continues with the same losses as the
    uninterrupted run, which are those of the encoder in the loop."""
    import memtrain.engine.engines as engines

    args = [CURRICULUM, "train.steps=12", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=3"]
    train(run_cfg(tokens, tmp_path / "whole", encoder_run, mem_fp32, *args))
    train(run_cfg(tokens, tmp_path / "loop", encoder_run, None, *args))
    crashed = run_cfg(tokens, tmp_path / "crashed", encoder_run, mem_fp32, *args)
    real, calls = engines.compute_losses, {"n": 0}

    def crash_in_step_7(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # one loss computation per step (no accumulation): step 7, in stage 'copy'
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engines, "compute_losses", crash_in_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    monkeypatch.setattr(engines, "compute_losses", real)
    train(crashed, resume=True)  # from the checkpoint of step 6

    whole, loop, resumed = (records(tmp_path / n) for n in ("whole", "loop", "crashed"))
    assert [whole[s]["stage"] for s in range(1, 13)] == [0] * 4 + [1] * 4 + [2] * 4
    assert set(k for k in whole[2] if k.startswith("loss/")) == {"loss/blank_copy", "loss/total"}
    assert set(k for k in whole[6] if k.startswith("loss/")) == {"loss/copy", "loss/total"}
    assert set(k for k in whole[10] if k.startswith("loss/")) == {"loss/causal", "loss/copy", "loss/total"}
    for s in range(1, 13):
        for key in [k for k in whole[s] if k.startswith("loss/")]:
            assert resumed[s][key] == pytest.approx(whole[s][key], rel=0, abs=1e-6), (s, key)
            assert loop[s][key] == pytest.approx(whole[s][key], abs=2e-5), (s, key)
