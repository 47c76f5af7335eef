"""`memtrain repro --quick`: the whole reproduction pipeline end to end, a few steps per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.cli import main
from memtrain.engine.checkpoint import read_checkpoint


@pytest.mark.slow
def test_quick_reproduction_end_to_end_on_a_corpus(tiny_data, tmp_path, capsys):
    """`--corpus` on a small jsonl: tokenizer and shards made under OUT/data, every model trained as often as
    repro.yaml's seeds say, the E4 comparison, and the document with mean ± sd; then the document again from
    report.json alone."""
    out, doc = tmp_path / "repro", tmp_path / "docs" / "reproduction.md"
    argv = ["repro", "--quick", "--out", str(out), "--doc", str(doc), "--corpus", str(tiny_data.corpus)]
    argv += [
        "--vocab-size",
        "400",
        "--val-fraction",
        "0.1",
        "--set",
        "train.threads=1",
        "--set",
        "train.progress=false",
    ]
    assert main(argv) == 0
    data = out / "data"
    assert (data / "tokenizer.model").is_file() and (data / "shards" / "memtrain_shards.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] and set(report["steps"].values()) == {6}
    assert report["corpus"] == str(tiny_data.corpus) and "--corpus" in report["command"]
    seeds = report["seeds"]
    assert seeds["memory_causal"] == seeds["memory_none"] == seeds["mixer_clm"] == 2 and seeds["mixer_ae"] == 1
    for role, n in seeds.items():  # every model trained once per seed, with its own seed
        runs = [out / "models" / role / f"seed{k}" for k in range(n + 1)]
        assert [(r / "summary.json").is_file() for r in runs] == [True] * n + [False]
        assert [read_checkpoint(r)[1].run.seed for r in runs[:n]] == list(range(n))
    assert [p["label"] for p in report["probes"]] == [
        "mixer autoencoder",
        "mixer causal LM",
        "mixer untrained",
        "transformer autoencoder",
        "transformer causal LM",
        "transformer untrained",
    ]
    assert [len(p["seeds"]) for p in report["probes"]] == [1, 2, 1, 1, 1, 1]  # one probe per encoder seed
    clm = report["probes"][1]
    accs = [s["accuracy"] for s in clm["seeds"]]
    assert clm["vocab_size"] == 400 and clm["accuracy"] == pytest.approx(sum(accs) / 2)
    assert clm["accuracy_sd"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert report["probes"][0]["accuracy_sd"] is None  # one seed: no spread
    assert [p["trained"] for p in report["probes"]] == [True, True, False, True, True, False]
    assert [p["memory_position"] for p in report["probes"]] == [-1, -2, -1, -1, -2, -1]
    assert list(report["memory"]) == ["memory causal only", "memory causal+copy"]
    for per in report["memory"].values():
        assert "copy (memories shuffle)" in per and len(per["causal"]["per_chunk"]) == 4
    assert [len(r) for r in report["memory_seeds"].values()] == [2, 1]

    [e4] = report["e4"]  # the mixer E4: memory model, no-memory control, full-context causal LM
    assert e4["arch"] == "mixer" and e4["chunk_len"] == 8
    assert [m["label"] for m in e4["models"].values()] == ["memory causal only", "memory none", "mixer causal LM"]
    for m in e4["models"].values():
        assert len(m["seeds"]) == 2 and len(m["mean"]["per_chunk"]) == 4
        assert sum(c["tokens"] for c in m["seeds"][0]["per_chunk"]) == m["seeds"][0]["tokens"]
        assert m["throughput"]["tokens_per_s"][0] > 0 and m["throughput"]["flops_per_token"] > 0
    # the same targets for all three: token j of chunk c, except the row's first token
    tokens = {m["label"]: [c["tokens"] for c in m["seeds"][0]["per_chunk"]] for m in e4["models"].values()}
    assert len({tuple(t) for t in tokens.values()}) == 1
    assert tokens["memory none"][1] * 7 == tokens["memory none"][0] * 8  # rows x 8 targets vs rows x 7
    assert len(report["checks"]) == 7 and all(isinstance(c["holds"], bool) for c in report["checks"])
    assert [c["seeds"] for c in report["checks"]] == [2, 1, 1, 2, 2, 2, 1]  # the cost: one timing round
    assert [c["over"] for c in report["checks"]] == ["seed"] * 6 + ["timing round"]

    text = doc.read_text()
    assert "Quick run" in text and "memtrain repro --quick" in text and "Device:" in text
    assert str(tiny_data.corpus) in text and "400-token tokenizer" in text
    assert "| mixer autoencoder | yes | 1 |" in text and "| 1.528 |" in text  # measured next to the paper
    assert "## E4 (mixer): memory model vs no memory vs full context" in text and " ± " in text
    names = ["retention.png", "probe-curves.png", "memory-accuracy.png", "memory-per-chunk.png"]
    for name in names + ["e4-mixer-per-chunk.png", "e4-mixer-curves.png"]:
        assert (doc.parent / "reproduction" / name).stat().st_size > 5000
        assert f"reproduction/{name}" in text
    for sub in ("probes", "memory"):
        assert (out / sub / "report.md").is_file()
    assert "| memory causal+copy | " in text and "copy " in text.split("own task")[1].split("##")[0]
    assert "## Notes" in text and "## The transformer autoencoder's plateau" in text  # yaml/repro/repro.yaml
    assert "- In this reproduction, with the change: at 6 steps the transformer autoencoder" in text
    assert "(1 timing round): mixer: a memory model costs" in text

    doc.unlink()  # the document again from report.json, nothing run
    assert main(["repro", "--quick", "--out", str(out), "--doc", str(doc), "--rewrite-doc"]) == 0
    assert doc.read_text() == text

    capsys.readouterr()
    assert main(["repro", "--quick", "--out", str(out), "--configs", str(tmp_path)]) == 2
    assert "repro.yaml: config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("text", [None, "", '{"text": ""}\n'])
def test_repro_corpus_that_is_missing_or_empty_stops_with_one_message(tmp_path, capsys, text):
    corpus = tmp_path / "corpus.jsonl"
    if text is not None:
        corpus.write_text(text)
    assert main(["repro", "--quick", "--out", str(tmp_path / "out"), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "corpus.jsonl" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "models").exists()  # stopped before any training


def test_repro_refuses_bad_seeds_and_both_corpus_and_shards(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["repro", "--quick", "--out", out, "--seeds", "0"]) == 2
    assert "--seeds: expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert main(["repro", "--quick", "--out", out, "--corpus", "a.jsonl", "--shards", "s"]) == 2
    assert "--corpus and --shards: give one" in capsys.readouterr().err
    assert not (tmp_path / "out" / "models").exists()


def _memory(copy: float, shuffled: float, blank: float) -> dict:
    return {
        "copy": {"accuracy": copy},
        "copy (memories shuffle)": {"accuracy": shuffled},
        "blank_copy": {"accuracy": blank},
    }


PROBED = {  # the single-seed numbers of the reproduction of 2026-11-26
    "mixer autoencoder": [0.581],
    "mixer causal LM": [0.073],
    "mixer untrained": [0.069],
    "transformer autoencoder": [0.152],
    "transformer causal LM": [0.075],
    "transformer untrained": [0.076],
}


def test_claim_checks_on_single_seed_numbers():
    """With one seed the sign of each margin decides: the transformer ordering fails on the margins (0.152 is
    not above 2 x 0.076, nor 0.1 above it), and copy needs the memories read."""
    from memtrain.eval.claims import copy_claim, probe_claims

    checks = probe_claims(PROBED)
    assert [c["holds"] for c in checks] == [True, False, True]
    assert "0.581 (autoencoder) vs 0.073 (causal LM) and 0.069 (untrained)" in checks[0]["evidence"]
    failed = [c["what"] for c in checks[1]["conditions"] if not c["holds"]]
    assert failed == ["autoencoder - 2 x max(causal LM, untrained)", "autoencoder - max(causal LM, untrained) - 0.1"]
    assert checks[1]["conditions"][1]["margin"] == pytest.approx(0.152 - 0.076 - 0.1)
    assert checks[1]["conditions"][1]["sd"] is None and checks[1]["seeds"] == 1

    probes = {**PROBED, "transformer autoencoder": [0.20]}  # 0.1 above the causal LM: the ordering holds
    assert probe_claims(probes)[1]["holds"]
    probes["mixer autoencoder"] = [0.15]  # mixer clearly below the transformer (0.01 is tolerated)
    assert not probe_claims(probes)[2]["holds"]

    copy = copy_claim([_memory(0.231, 0.216, 0.045)], [_memory(0.622, 0.057, 0.210)])
    assert copy["holds"] and "costs 0.015 and 0.565" in copy["evidence"]
    # a combined model that copies without reading its memories (shuffling costs nothing) does not pass
    assert not copy_claim([_memory(0.231, 0.216, 0.045)], [_memory(0.622, 0.600, 0.210)])["holds"]


def test_a_claim_agrees_only_when_its_margin_exceeds_two_standard_deviations():
    from memtrain.eval.claims import condition, per_seed, pm, probe_claims

    assert condition("m", [0.30, 0.32, 0.31])["holds"]  # mean 0.31, sd 0.01
    wide = condition("m", [0.01, 0.09, 0.05])  # mean 0.05 > 0 but sd 0.04: 0.05 < 2 x 0.04
    assert not wide["holds"] and wide["margin"] == pytest.approx(0.05) and wide["sd"] == pytest.approx(0.04)
    assert not condition("m", [-0.1])["holds"] and condition("m", [0.001])["holds"]
    assert per_seed([1.0, 2.0], [5.0]) == [(1.0, 5.0), (2.0, 5.0)]  # a model trained once pairs with each seed
    assert pm([0.5, 0.7]) == "0.600 ± 0.141" and pm([0.5]) == "0.500"

    # the transformer autoencoder clears the 0.1 margin on average (0.192 - 0.076) but not by 2 sd
    probes = {**PROBED, "transformer autoencoder": [0.13, 0.25, 0.196], "transformer untrained": [0.076] * 3}
    c = probe_claims(probes)[1]["conditions"][1]
    assert c["margin"] == pytest.approx(0.192 - 0.076 - 0.1) and not c["holds"] and c["seeds"] == 3


def _chunks(ces: list[float]) -> dict:
    return {"ce": sum(ces) / len(ces), "per_chunk": [{"chunk": i, "ce": ce} for i, ce in enumerate(ces)]}


def test_e4_claims():
    """Memory < no memory on every chunk after the first; close to full context; about as cheap per token."""
    from memtrain.eval.claims import e4_claims

    group = {
        "arch": "mixer",
        "models": {
            "memory": {"seeds": [_chunks([4.2, 4.30, 4.30, 4.20]), _chunks([4.2, 4.32, 4.28, 4.22])]},
            "none": {"seeds": [_chunks([4.2, 4.60, 4.60, 4.50]), _chunks([4.2, 4.62, 4.58, 4.52])]},
            "full": {"seeds": [_chunks([4.2, 4.25, 4.20, 4.15]), _chunks([4.2, 4.26, 4.22, 4.14])]},
        },
        "throughput": {
            "memory": {"tokens_per_s": [3000.0, 3100.0, 2900.0], "flops_per_token": 6.4e6},
            "full": {"tokens_per_s": [4000.0, 4100.0, 3900.0], "flops_per_token": 5.0e6},
        },
    }
    helps, close, cost = e4_claims(group)
    assert helps["holds"] and [c["what"] for c in helps["conditions"]] == [
        "CE chunk 1: no memory - memory",
        "CE chunk 2: no memory - memory",
        "CE chunk 3: no memory - memory",
    ]
    assert helps["conditions"][0]["margin"] == pytest.approx(0.30)
    assert close["holds"] and cost["holds"] and "FLOPs per token 1.28x" in cost["evidence"]
    assert helps["over"] == "seed" and cost["over"] == "timing round" and cost["seeds"] == 3  # spread over rounds
    assert "0.75" in cost["evidence"]  # throughput ratio 3000 / 4000

    group["models"]["memory"]["seeds"][1] = _chunks([4.2, 4.62, 4.28, 4.22])  # chunk 1: no better on one seed
    helps, close, _ = e4_claims(group)
    assert not helps["holds"] and [c["holds"] for c in helps["conditions"]] == [False, True, True]
    group["models"]["full"]["seeds"] = [_chunks([4.0, 4.0, 4.0, 4.0])] * 2  # full context far ahead
    assert not e4_claims(group)[1]["holds"]
    group["throughput"]["memory"]["tokens_per_s"] = [2000.0, 2100.0, 1900.0]  # half the throughput
    assert not e4_claims(group)[2]["holds"]


def test_aggregate_over_seeds():
    from memtrain.eval.claims import aggregate

    runs = [
        {"label": "a", "ce": 2.0, "per_chunk": [{"chunk": 0, "ce": 1.0}], "ok": True},
        {"label": "a", "ce": 4.0, "per_chunk": [{"chunk": 0, "ce": 3.0}], "ok": True},
    ]
    mean = aggregate(runs)
    assert mean["label"] == "a" and mean["ok"] is True and "ok_sd" not in mean
    assert mean["ce"] == 3.0 and mean["ce_sd"] == pytest.approx(2**0.5)
    assert mean["per_chunk"] == [{"chunk": 0, "ce": 2.0, "ce_sd": pytest.approx(2**0.5)}]
    assert aggregate(runs[:1])["ce_sd"] is None


def test_plan_takes_the_transformer_e4_and_seeds_per_role(tmp_path):
    import shutil

    import yaml
    from memtrain.errors import UserError
    from memtrain.eval.repro import E4, read_manifest

    for f in (Path(__file__).parents[1] / "yaml" / "repro").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    plan = yaml.safe_load((tmp_path / "repro.yaml").read_text())
    assert read_manifest(tmp_path)["seeds"] == {
        "mixer_ae": 1,
        "transformer_ae": 1,
        "mixer_clm": 2,
        "transformer_clm": 1,
        "memory_causal": 2,
        "memory_combined": 1,
        "memory_none": 2,
    }
    plan["models"].update(
        transformer_memory_causal="transformer_memory_causal.yaml",
        transformer_memory_none="transformer_memory_none.yaml",
    )
    plan["seeds"] = 3
    (tmp_path / "repro.yaml").write_text(yaml.safe_dump(plan))
    read = read_manifest(tmp_path)
    arch, memory, none, full = E4[1]
    assert arch == "transformer" and {memory, none, full} <= set(read["models"])
    assert set(read["seeds"].values()) == {3}

    plan["seeds"] = {"default": 1, "memory_nothing": 2}
    (tmp_path / "repro.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(UserError, match="unknown role 'memory_nothing'"):
        read_manifest(tmp_path)
    plan["seeds"] = 1
    del plan["models"]["memory_none"]
    (tmp_path / "repro.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(UserError, match="'models' must name a run config for each of"):
        read_manifest(tmp_path)
