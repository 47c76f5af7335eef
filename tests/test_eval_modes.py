"""`memtrain eval --per-chunk --memories normal,zero,shuffle --out`: per-chunk metrics, altered memories, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from memtrain.cli import main
from memtrain.engine.trainer import train
from memtrain.evaluation import altered_memories


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_modes")
    memory = root / "memory"
    train(
        tiny_config(
            tiny_data.shards,
            memory,
            "train.steps=20",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "objective.weights={causal: 1, blank_copy: 1}",
            "optim.lr=1e-2",
        )
    )
    clm = root / "clm"
    train(
        tiny_config(
            tiny_data.shards,
            clm,
            "run.name=clm",
            "model.kind=clm",
            "objective.weights={causal: 1}",
            "train.steps=2",
            "train.eval_every=0",
            "train.ckpt_every=0",
        )
    )
    return {"memory": memory, "clm": clm}


def test_altered_memories():
    m = torch.randn(5, 3, 4)
    assert torch.equal(altered_memories(m, "normal"), m)
    assert torch.equal(altered_memories(m, "zero"), torch.zeros_like(m))
    s = altered_memories(m, "shuffle")
    assert torch.equal(s[1:], m[:-1]) and torch.equal(s[0], m[-1])  # every row gets another row's memories
    with pytest.raises(ValueError, match="at least 2 rows"):
        altered_memories(m[:1], "shuffle")


def test_per_chunk_and_memory_modes(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(
            [
                "eval",
                str(runs["memory"]),
                "--objectives",
                "causal,blank_copy",
                "--per-chunk",
                "--memories",
                "normal,zero,shuffle",
                "--batches",
                "2",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| tiny | blank_copy (memories shuffle) |" in printed and "by chunk position" in printed
    results = json.loads((out / "report.json").read_text())["results"]["tiny"]
    assert list(results) == [
        "causal",
        "causal (memories zero)",
        "causal (memories shuffle)",
        "blank_copy",
        "blank_copy (memories zero)",
        "blank_copy (memories shuffle)",
    ]
    for _key, r in results.items():
        assert [c["chunk"] for c in r["per_chunk"]] == [0, 1, 2, 3]
        assert sum(c["tokens"] for c in r["per_chunk"]) == r["tokens"]
        pooled = sum(c["ce"] * c["tokens"] for c in r["per_chunk"] if c["tokens"]) / r["tokens"]
        assert pooled == pytest.approx(r["ce"], rel=1e-5)
    # chunk 0 reads no memory: identical whatever the memories are; later chunks do read them
    causal = [results[k]["per_chunk"] for k in ("causal", "causal (memories zero)", "causal (memories shuffle)")]
    assert causal[0][0]["ce"] == causal[1][0]["ce"] == causal[2][0]["ce"]
    assert causal[0][3]["ce"] != causal[1][3]["ce"] and causal[0][3]["ce"] != causal[2][3]["ce"]
    # blank copy scores only the second half: its first two chunks have no tokens
    blank = results["blank_copy"]["per_chunk"]
    assert blank[0]["tokens"] == blank[1]["tokens"] == 0 and blank[0]["ce"] is None  # NaN is null in JSON
    assert results["blank_copy (memories zero)"]["memories"] == "zero"
    assert results["blank_copy"]["exact_match_mode"] == "greedy"
    assert results["causal (memories shuffle)"]["exact_match_mode"] == "teacher_forced"
    md = (out / "report.md").read_text()
    assert "| tiny | causal | " in md and "chunk 3" in md
    for png in ("accuracy.png", "per_chunk.png"):
        assert (out / png).stat().st_size > 5000


def test_memory_modes_need_an_encoder(runs, capsys):
    def fails(argv, needle):
        capsys.readouterr()
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines

    fails(["eval", str(runs["clm"]), "--memories", "zero"], "is a causal LM; only models with an encoder")
    fails(["eval", str(runs["memory"]), "--memories", "normal,swap"], "--memories: unknown mode 'swap'")
    fails(
        ["eval", str(runs["memory"]), "--memories", "shuffle", "--batch-size", "1", "--batches", "1"],
        "batches of one row cannot swap memories",
    )


def test_accuracy_chart_groups_memory_variants_side_by_side():
    import math

    from memtrain.eval.report import accuracy_groups

    results = {
        "m": {
            "causal": {"accuracy": 0.2},
            "causal (memories zero)": {"accuracy": 0.1},
            "copy": {"accuracy": 0.6},
            "copy (memories shuffle)": {"accuracy": 0.05},
        },
        "ctl": {"copy": {"accuracy": 0.3}},
    }
    groups, series = accuracy_groups(results)
    assert groups == ["m: causal", "m: copy", "ctl: copy"]
    assert list(series) == ["memories normal", "memories zero", "memories shuffle"]
    assert series["memories normal"] == [0.2, 0.6, 0.3]
    assert series["memories zero"][0] == 0.1 and all(math.isnan(v) for v in series["memories zero"][1:])
    assert series["memories shuffle"][1] == 0.05
    # without altered memories: one series, one bar per (model, objective)
    groups, series = accuracy_groups({"m": {"causal": {"accuracy": 0.2}, "copy": {"accuracy": 0.6}}})
    assert groups == ["m: causal", "m: copy"] and series == {"token accuracy": [0.2, 0.6]}


def test_per_chunk_follows_the_dual_row_layout_of_an_hf_decoder(tmp_path_factory, tmp_path):
    """An HF-decoder memory model's rows hold C*(L + L_dec) positions: per-chunk metrics cover chunk c's L
    encoder ids and L_dec decoder slots (not L-position slices), and pool back to the whole-row metrics."""
    from helpers import L_DEC, C, L, dual_shards, first_rows, hf_config, tiny_llm

    from memtrain.evaluation import evaluate
    from memtrain.models import build_model
    from memtrain.objectives import SpecialTokens, make_task, task_chunks

    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=1, filler_id=5)
    cfg = hf_config(dual_shards(tmp_path_factory), tiny_llm(tmp_path_factory), tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(cfg.model, 420).eval()
    rows = first_rows(tmp_path_factory, "llama", 2)
    assert rows.shape[1] == C * (L + L_DEC)
    results = evaluate(model, [rows], ["causal", "copy"], special, torch.device("cpu"), per_chunk=True)
    for name, r in results.items():
        per = r["per_chunk"]
        assert [c["chunk"] for c in per] == list(range(C)), name
        _, targets = make_task(name, rows, special, task_chunks(model))
        labels = model.align_labels(targets).view(rows.shape[0], C, L + L_DEC)
        assert [c["tokens"] for c in per] == [int((labels[:, c] != -100).sum()) for c in range(C)], name
        assert sum(c["tokens"] for c in per) == r["tokens"]
        pooled = sum(c["ce"] * c["tokens"] for c in per if c["tokens"]) / r["tokens"]
        assert pooled == pytest.approx(r["ce"], rel=1e-5)
        hits = sum(c["accuracy"] * c["tokens"] for c in per if c["tokens"]) / r["tokens"]
        assert hits == pytest.approx(r["accuracy"], rel=1e-5)
    assert results["copy"]["per_chunk"][0]["tokens"] == 0 < results["copy"]["per_chunk"][C - 1]["tokens"]
