"""The loader partitions each epoch across torch.distributed ranks (2 local processes, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from memtrain.data import demo_corpus_path
from memtrain.data.ingest import build_shards
from memtrain.data.loader import make_loader
from memtrain.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.distributed

RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from memtrain.data.loader import make_loader
    shards, out = sys.argv[1], sys.argv[2]
    loader = make_loader(shards, "train", batch_size=4, shuffle=True, seed=3)
    it = iter(loader)
    rows = [r.tolist() for _ in range(len(loader)) for r in next(it)]
    json.dump({"rows": rows, "len": len(loader), "state": loader.state_dict()}, open(out, "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_get_disjoint_halves_of_each_epoch(tmp_path):
    docs = pq.read_table(demo_corpus_path(), columns=["text"]).slice(0, 60).column("text").to_pylist()
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in docs))
    tok = train_tokenizer([str(tmp_path / "c.jsonl")], tmp_path / "tok", vocab_size=400)
    summary = build_shards(
        [str(tmp_path / "c.jsonl")], tok, tmp_path / "sh", row_len=32, val_fraction=0, workers=1, progress=False
    )
    n_rows = summary["splits"]["train"]["rows"]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(tmp_path / "sh"), str(tmp_path / f"rank{rank}.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    r0, r1 = (json.loads(Path(tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["len"] == r1["len"] == n_rows // 2 // 4
    assert len(r0["rows"]) == len(r1["rows"]) > 0
    with make_loader(str(tmp_path / "sh"), "train", batch_size=1, shuffle=False, seed=0) as loader:
        every = Counter(tuple(r) for r in torch.cat(list(loader.epoch())).tolist())
    both = Counter(tuple(r) for r in r0["rows"]) + Counter(tuple(r) for r in r1["rows"])
    assert not both - every  # disjoint halves: no stored row is served twice in the epoch
    assert sum(both.values()) >= n_rows - 2 * 4  # and together they cover the epoch (drop_last per rank)
    # the checkpointable position counts the samples of both ranks
    assert r0["state"]["streaming"]["sample_in_epoch"] == 2 * len(r0["rows"])
