"""``memtrain data bench``: how close ``memtrain data shards`` comes to the tokenizer's own speed.

Two numbers from one run on the same corpus and the same number of processes:

* **raw encode**: the documents, already read into memory, split into ``workers`` equal shares and encoded by
  SentencePiece in ``workers`` processes that are already running: the speed limit of tokenization;
* **ingest**: ``memtrain data shards`` from the files, everything included (process start, reading,
  tokenizing, packing, writing and compressing the shards, the merge).

Their ratio is what the rest of the pipeline costs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from memtrain.data import tokenize_units
from memtrain.data.documents import estimate_text_bytes, expand_sources, iter_document_pieces
from memtrain.errors import UserError


def raw_encode(texts: list[str], model_bytes: bytes, workers: int) -> tuple[int, float]:
    """(tokens, seconds) to encode ``texts`` in ``workers`` running processes (1: this process)."""
    if workers <= 1:
        tokenize_units.init_tokenizer(model_bytes)
        t0 = time.perf_counter()
        return tokenize_units.count_tokens(texts), time.perf_counter() - t0
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["memtrain.data.tokenize_units"])
    shares = [texts[i::workers] for i in range(workers)]
    with ctx.Pool(workers, initializer=tokenize_units.init_tokenizer, initargs=(model_bytes,)) as pool:
        pool.map(tokenize_units.ready, range(workers))  # every worker up and loaded before the clock starts
        t0 = time.perf_counter()
        tokens = sum(pool.map(tokenize_units.count_tokens, shares, chunksize=1))
        return tokens, time.perf_counter() - t0


def bench_ingest(
    sources: list[str],
    tokenizer: str | Path,
    row_len: int = 512,
    workers: int = 2,
    unit_size: str | None = None,
    work_dir: str | Path | None = None,
    repeat: int = 1,
) -> dict:
    """Measure raw encode and ingest once each; returns tokens, seconds, tokens/s and their ratio.

    ``unit_size`` default: the corpus's text divided into 4 units per worker, so that every process has
    work (the same cut a large corpus gets from the default 256mb). ``repeat``: measure on a parquet file
    holding the corpus's documents that many times (distinct ids), so that a small corpus takes long enough
    for process start to weigh as little as it does on a real one."""

    if workers < 1:
        raise UserError(f"--workers: expected >= 1, got {workers}")
    if repeat < 1:
        raise UserError(f"--repeat: expected >= 1, got {repeat}")
    tmp = Path(tempfile.mkdtemp(prefix="memtrain-bench-", dir=work_dir))
    try:
        if repeat > 1:
            sources = [str(_repeated(expand_sources(sources), repeat, tmp / "corpus.parquet"))]
        return _bench(sources, tokenizer, row_len, workers, unit_size, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _repeated(files: list, repeat: int, path: Path) -> Path:
    """A parquet file with every document of ``files`` ``repeat`` times (ids suffixed ``#copyK``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [(doc_id, text) for doc_id, text, last in iter_document_pieces(files) if last]
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())])) as writer:
        for k in range(repeat):
            ids = [f"{d}#copy{k}" for d, _ in docs]
            writer.write_table(pa.table({"id": ids, "text": [t for _, t in docs]}), row_group_size=256)
    return path


def _bench(sources: list[str], tokenizer, row_len: int, workers: int, unit_size: str | None, tmp: Path) -> dict:
    from memtrain.data.ingest import build_shards
    from memtrain.data.tokenizer import Tokenizer

    files = expand_sources(sources)
    tok = Tokenizer.load(tokenizer)
    text_bytes = estimate_text_bytes(files)
    unit = unit_size or str(max(1 << 16, text_bytes // (4 * workers)))
    pieces = list(iter_document_pieces(files))
    texts = [t for _, t, _ in pieces]
    raw_tokens, raw_s = raw_encode(texts, tok.path.read_bytes(), workers)
    raw_tokens += sum(last for _, _, last in pieces)  # the EOS after each document
    t0 = time.perf_counter()
    summary = build_shards(
        sources, tok.path, tmp / "shards", row_len, val_fraction=0.0, workers=workers, unit_size=unit, progress=False
    )
    ingest_s = time.perf_counter() - t0
    tokens = sum(c["rows"] * row_len + c["dropped_tail_tokens"] for c in summary["splits"].values())
    if tokens != raw_tokens:
        raise RuntimeError(f"ingest wrote {tokens} tokens, the raw encode counted {raw_tokens}")
    return {
        "text_mb": text_bytes / 1e6,
        "tokens": tokens,
        "workers": workers,
        "units": summary["units"],
        "row_len": row_len,
        "raw_s": raw_s,
        "raw_tokens_per_s": tokens / raw_s,
        "ingest_s": ingest_s,
        "ingest_tokens_per_s": tokens / ingest_s,
        "ratio": raw_s / ingest_s,
    }


def format_bench(r: dict) -> str:
    from memtrain.tables import markdown_table

    return "\n".join(
        [
            f"{r['tokens']:,} tokens ({r['text_mb']:.1f} MB of text), {r['workers']} processes, {r['units']} units, "
            f"rows of {r['row_len']}",
            markdown_table(
                ["path", "seconds", "tokens/s"],
                [
                    ["raw SentencePiece encode (text in memory)", f"{r['raw_s']:.2f}", f"{r['raw_tokens_per_s']:,.0f}"],
                    [
                        "memtrain data shards (read, tokenize, pack, write)",
                        f"{r['ingest_s']:.2f}",
                        f"{r['ingest_tokens_per_s']:,.0f}",
                    ],
                ],
            ),
            f"ingest / raw encode: {r['ratio']:.2f}",
        ]
    )
