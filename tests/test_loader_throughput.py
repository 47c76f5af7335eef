"""The loader's fast paths read exactly what streaming reads, and tools/bench_loader.py runs and prints its table.

Throughput itself is measured by the tool (``python tools/bench_loader.py``), never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memtrain.data.loader import collate_rows, collate_stored_rows

REPO = Path(__file__).resolve().parents[1]


def _write(out: Path, columns: dict[str, str], samples: list[dict]) -> None:
    from memtrain.data.streaming_compat import import_streaming

    streaming = import_streaming()
    with streaming.MDSWriter(out=str(out), columns=columns, compression="zstd", size_limit=600) as writer:
        for sample in samples:
            writer.write(sample)


def _read_all(shards: Path) -> tuple[list[dict], list[dict], list]:
    """Every sample through CheckedDataset.get_item and through streaming's own shard readers, and what the
    dataset kept open per shard."""
    from memtrain.data.checked_stream import CheckedDataset, CheckedStream
    from memtrain.data.streaming_compat import closing_prefix_probes, release_dataset

    with closing_prefix_probes() as probes:
        ds = CheckedDataset(streams=[CheckedStream(local=str(shards), where=str(shards))], batch_size=1)
        probes.release(keep=ds._locals_shm)
    try:
        fast = [ds.get_item(i) for i in range(ds.num_samples)]
        plain = [ds.shards[s][j] for s, j in (ds.spanner[i] for i in range(ds.num_samples))]
        kept = list(ds.__dict__.get("_memtrain_open", {}).values())
    finally:
        ds.memtrain_close()
        release_dataset(ds)
    return fast, plain, kept


@pytest.mark.parametrize("fixed", [True, False])
def test_checked_dataset_reads_every_sample_as_streaming_does(tmp_path, fixed):
    rng = np.random.default_rng(0)
    if fixed:  # several fixed-size columns: read straight from the file
        columns = {"input_ids": "ndarray:uint16:3,4", "mask": "ndarray:uint8:3,2", "ids": "ndarray:int32:5"}
        samples = [
            {
                "input_ids": rng.integers(0, 60000, (3, 4), dtype=np.uint16),
                "mask": rng.integers(0, 2, (3, 2), dtype=np.uint8),
                "ids": rng.integers(-(2**31), 2**31 - 1, 5, dtype=np.int32),
            }
            for _ in range(90)
        ]
    else:  # a column of varying shape: streaming's reader
        columns = {"input_ids": "ndarray:uint16"}
        samples = [{"input_ids": rng.integers(0, 60000, 1 + i % 7, dtype=np.uint16)} for i in range(90)]
    _write(tmp_path / "d", columns, samples)
    fast, plain, kept = _read_all(tmp_path / "d")
    assert len(fast) == len(plain) == len(samples)
    for a, b, want in zip(fast, plain, samples):
        assert a.keys() == b.keys() == want.keys()
        for key in want:
            assert a[key].dtype == b[key].dtype == want[key].dtype
            assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], want[key])
    assert len(kept) > 1  # several shards
    assert all(k is not None for k in kept) if fixed else all(k is None for k in kept)


def test_a_shard_that_does_not_match_its_index_is_read_by_streaming(tmp_path):
    """A raw shard whose size disagrees with its fixed-size columns is not read with the fast path."""
    from memtrain.data.checked_stream import _fixed_columns, _FixedRows

    _write(tmp_path / "d", {"input_ids": "ndarray:uint16:4"}, [{"input_ids": np.arange(4, dtype=np.uint16)}] * 8)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    from streaming.base.format import reader_from_json

    reader = reader_from_json(str(tmp_path / "d"), None, index["shards"][0])
    columns = _fixed_columns(reader)
    assert columns == [("input_ids", np.dtype("uint16"), (4,), 8)]
    raw = tmp_path / "raw.mds"
    from memtrain.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.compression import decompress

    good = decompress("zstd", (tmp_path / "d" / index["shards"][0]["zip_data"]["basename"]).read_bytes())
    raw.write_bytes(good)
    rows = _FixedRows(str(raw), reader, columns)
    assert np.array_equal(rows.sample(7)["input_ids"], np.arange(4))
    rows.close()
    raw.write_bytes(good + b"\0")  # one byte too many
    with pytest.raises(ValueError, match="not a shard of 8 samples"):
        _FixedRows(str(raw), reader, columns)
    reader.column_sizes = [6]  # the index's size disagrees with the encoding
    assert _fixed_columns(reader) is None


def test_worker_batches_cross_as_stored_rows_and_widen_to_long():
    samples = [{"input_ids": np.arange(i, i + 6, dtype=np.uint16)} for i in range(4)]
    stored = collate_stored_rows(samples)
    assert stored["input_ids"].dtype == np.uint16 and len(stored) == 1
    batch = stored.tensor()
    assert batch.dtype == torch.long and torch.equal(batch, collate_rows(samples))
    assert collate_rows(samples).shape == (4, 6)


def test_bench_loader_tool_prints_its_table(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "bench_loader.py"),
        "--shards",
        str(tiny_data.shards),
        "--batch-size",
        "4",
        "--workers",
        "0,1",
        "--seconds",
        "0.3",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("|")]
    assert lines[0] == "| row length | batch | workers | first batch (s) | tokens/s | rows/s | training process CPU |"
    assert [ln.split("|")[1:4] for ln in lines[2:]] == [[" 32 ", " 4 ", " 0 "], [" 32 ", " 4 ", " 1 "]]
    assert "CPU cores" in done.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["workers"] for r in results] == [0, 1] and all(r["tokens_per_s"] > 0 for r in results)
