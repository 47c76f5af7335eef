"""Writing token rows as MDS shards, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memtrain.data.streaming_compat import import_streaming


def row_writer(out: Path, row_len: int, dtype: str, shard_size: int | str | None, compression: str | None = "zstd"):
    """An ``MDSWriter`` of token rows (one column ``input_ids``: ``ndarray:<dtype>:<row_len>``) with a fast
    ``write_rows(rows [n, row_len])``: the same files, byte for byte, as ``write({"input_ids": row})`` for each
    row (for a fixed-shape array column a sample's bytes are the array's bytes), without encoding each row in
    Python. ``tests/test_data.py`` holds it to the plain writer."""

    streaming = import_streaming()

    class RowWriter(streaming.MDSWriter):
        def write_rows(self, rows: np.ndarray) -> None:
            if self.event.is_set():  # as write(): an upload thread failed
                self.cancel_future_jobs()
                raise RuntimeError("One of the threads failed. Check other traceback for more details.")
            if rows.ndim != 2 or rows.shape[1] != row_len or rows.dtype != np.dtype(dtype):
                raise ValueError(f"rows must be [n, {row_len}] {dtype}, got {list(rows.shape)} {rows.dtype}")
            blob = np.ascontiguousarray(rows).tobytes()
            size = row_len * rows.dtype.itemsize
            per = size + self.extra_bytes_per_sample
            i, n = 0, rows.shape[0]
            while i < n:
                room = n - i
                if self.size_limit:
                    room = (self.size_limit - self.new_shard_size) // per
                    if room <= 0:  # as write(): flush before a sample that does not fit, then take it
                        self.flush_shard()
                        self._reset_cache()
                        room = max(1, (self.size_limit - self.new_shard_size) // per)
                k = min(room, n - i)
                self.new_samples.extend(blob[j * size : (j + 1) * size] for j in range(i, i + k))
                self.new_shard_size += k * per
                i += k

    return RowWriter(
        out=str(out),
        columns={"input_ids": f"ndarray:{dtype}:{row_len}"},
        compression=compression,
        size_limit=shard_size,
        progress_bar=False,
        exist_ok=False,
    )
