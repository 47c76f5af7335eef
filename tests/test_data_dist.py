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
from helpers import rank_env

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
        env = rank_env(rank, 2, port)
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


ORDER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from memtrain.data.loader import make_loader
    shards, out, ranks = sys.argv[1], sys.argv[2], [int(r) for r in sys.argv[3].split(",")]
    if len(ranks) == 1:  # one rank of this node, in the job's process group (from the environment)
        dist.init_process_group("gloo")
    else:  # every node of one rank in turn, as on separate machines: nothing is shared between them
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[4], rank=0, world_size=1)
    res = []
    for rank in ranks:
        os.environ["RANK"] = str(rank)
        orders = {}
        for nodes in (2, None):
            with make_loader(shards, "train", batch_size=4, shuffle=True, seed=3, num_canonical_nodes=nodes) as loader:
                it = iter(loader)
                batches = [next(it).tolist() for _ in range(len(loader))]
                it.close()
                orders[str(nodes)] = {"batches": batches, "state": loader.state_dict()["streaming"]}
            dist.barrier()
        res.append(orders)
    json.dump(res, open(out, "w"))
    dist.destroy_process_group()
""")


def _global_order(ranks: list[dict], key: str) -> list[list[int]]:
    """The rows of every global batch (rank 0's part, then rank 1's), batch after batch."""
    r0, r1 = (r[key]["batches"] for r in ranks)
    assert len(r0) == len(r1) > 0
    return [row for b0, b1 in zip(r0, r1) for row in b0 + b1]


def _run(cmds: list[tuple[list[str], dict]]) -> list[str]:
    """Run the commands at once; their outputs, or an AssertionError with the failed ones'."""
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c, e in cmds]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    failed = [o[-3000:] for p, o in zip(procs, outs) if p.returncode]
    if failed:
        raise AssertionError("\n".join(failed))
    return outs


@pytest.mark.slow
def test_fixed_num_canonical_nodes_gives_one_global_order_on_one_or_two_nodes(tiny_data, tmp_path):
    """Two ranks as one node of two ranks (two processes sharing the node's shared memory), and as two nodes of one
    rank each (run one after the other: nodes share nothing): with ``num_canonical_nodes`` fixed both read the same
    global sample order; with the default (the number of nodes) they do not."""
    base = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    script = [sys.executable, "-c", ORDER_SCRIPT, str(tiny_data.shards)]
    for attempt in range(2):  # once more if the start lost streaming's shared-memory race with another job
        port = str(_free_port())
        env = dict(base, LOCAL_WORLD_SIZE="2", MASTER_PORT=port)
        try:
            _run(
                [
                    (script + [str(tmp_path / f"one{r}.json"), str(r)], dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                    for r in range(2)
                ]
            )
            break
        except AssertionError as err:
            if attempt or "File exists" not in str(err) and "does not match local leader" not in str(err):
                raise
    env = dict(base, LOCAL_WORLD_SIZE="1", LOCAL_RANK="0", RANK="0")
    _run([(script + [str(tmp_path / "two.json"), "0,1", str(_free_port())], env)])
    one = [json.loads((tmp_path / f"one{r}.json").read_text())[0] for r in range(2)]
    two = json.loads((tmp_path / "two.json").read_text())
    assert [r["2"]["state"]["num_canonical_nodes"] for r in one + two] == [2, 2, 2, 2]
    assert _global_order(one, "2") == _global_order(two, "2")
    # left to its default, the order follows the number of nodes
    assert [r["None"]["state"]["num_canonical_nodes"] for r in one + two] == [1, 1, 2, 2]
    assert _global_order(one, "None") != _global_order(two, "None")
