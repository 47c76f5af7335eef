"""`memtrain capacity`: one autoencoder per chunk length on the re-packed corpus, a report with plots."""

from __future__ import annotations

import json

from memtrain.cli import main
from memtrain.data.loader import read_shard_info


def test_capacity_curve(tiny_data, tmp_path, capsys):
    out = tmp_path / "capacity"
    argv = [
        "capacity",
        "--d-model",
        "16",
        "--lengths",
        "8,4",
        "--layers",
        "1",
        "--heads",
        "2",
        "--steps",
        "4",
        "--shards",
        str(tiny_data.shards),
        "--out",
        str(out),
        "--set",
        "train.threads=1",
        "--set",
        "train.progress=false",
        "--set",
        "train.eval_batches=2",
        "--set",
        "data.batch_size=8",
    ]
    assert main(argv) == 0
    assert "| 4 |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [p["length"] for p in report["points"]] == [4, 8]
    assert report["encoder"]["d_model"] == 16 and report["encoder"]["n_heads"] == 2
    for p in report["points"]:
        cfg = (out / f"L{p['length']}" / "config.yaml").read_text()
        assert f"chunk_len: {p['length']}" in cfg
        shards = next(line.split(": ", 1)[1] for line in cfg.splitlines() if line.strip().startswith("shards:"))
        assert read_shard_info(shards).row_len == p["length"]  # the same corpus re-packed into rows of L
        assert p["tokens_regenerated"] == p["accuracy"] * p["length"] and 0 <= p["exact_match"] <= 1
    for png in ("capacity.png", "bits.png", "curves.png"):
        assert (out / png).stat().st_size > 5000
    assert "![capacity](capacity.png)" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(argv[:4] + ["4,x"] + argv[5:]) == 2
    assert "--lengths: expected comma-separated whole numbers" in capsys.readouterr().err
