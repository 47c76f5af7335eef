"""`memtrain repro --quick`: the whole reproduction pipeline end to end, a few steps per stage."""
from __future__ import annotations

import json

from memtrain.cli import main


def test_quick_reproduction_end_to_end(tiny_data, tmp_path, capsys):
    out, doc = tmp_path / "repro", tmp_path / "docs" / "reproduction.md"
    assert main(["repro", "--quick", "--out", str(out), "--doc", str(doc), "--shards", str(tiny_data.shards),
                 "--set", "train.threads=1", "--set", "train.progress=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] and set(report["steps"].values()) == {6}
    assert [p["label"] for p in report["probes"]] == [
        "mixer autoencoder", "mixer causal LM", "mixer untrained",
        "transformer autoencoder", "transformer causal LM", "transformer untrained"]
    assert [p["trained"] for p in report["probes"]] == [True, True, False, True, True, False]
    assert [p["memory_position"] for p in report["probes"]] == [-1, -2, -1, -1, -2, -1]
    assert list(report["memory"]) == ["memory causal only", "memory causal+copy"]
    for per in report["memory"].values():
        assert "copy (memories shuffle)" in per and len(per["causal"]["per_chunk"]) == 4
    assert len(report["checks"]) == 4 and all(isinstance(c["holds"], bool) for c in report["checks"])

    text = doc.read_text()
    assert "Quick run" in text and "memtrain repro --quick" in text and "Device:" in text
    assert "| mixer autoencoder | yes |" in text and "| 1.528 |" in text  # measured next to the paper
    for name in ("retention.png", "probe-curves.png", "memory-accuracy.png", "memory-per-chunk.png"):
        assert (doc.parent / "reproduction" / name).stat().st_size > 5000
        assert f"reproduction/{name}" in text
    for sub in ("probes", "memory"):
        assert (out / sub / "report.md").is_file()

    assert "| memory causal+copy | " in text and "copy " in text.split("own task")[1].split("##")[0]
    assert "## Notes" in text and "token-frequency plateau" in text  # yaml/repro/repro.yaml's notes

    doc.unlink()  # the document again from report.json, nothing run
    assert main(["repro", "--quick", "--out", str(out), "--doc", str(doc), "--rewrite-doc"]) == 0
    assert doc.read_text() == text

    capsys.readouterr()
    assert main(["repro", "--quick", "--out", str(out), "--configs", str(tmp_path)]) == 2
    assert "repro.yaml: config file not found" in capsys.readouterr().err
