"""memtrain's data pipeline: tokenizer training, ingestion to MDS shards, and the streaming loader.

    text (parquet | jsonl | txt) --train_tokenizer--> tokenizer.model
    text --build_shards--> OUT/{train,val}/ MDS shards + tokenizer.model + memtrain_shards.json
    OUT --make_loader--> torch.long [batch, row_len] batches, deterministic, exactly resumable

The heavy modules (torch, streaming, sentencepiece) load only when one of the names below is used.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

_EXPORTS = {
    "Tokenizer": "memtrain.data.tokenizer",
    "train_tokenizer": "memtrain.data.tokenizer",
    "iter_documents": "memtrain.data.ingest",
    "expand_sources": "memtrain.data.ingest",
    "build_shards": "memtrain.data.ingest",
    "ShardInfo": "memtrain.data.loader",
    "ShardLoader": "memtrain.data.loader",
    "read_shard_info": "memtrain.data.loader",
    "make_loader": "memtrain.data.loader",
    "check_compatible": "memtrain.data.loader",
    "import_streaming": "memtrain.data.streaming_compat",
}

__all__ = sorted(_EXPORTS) + ["demo_corpus_path"]

DEMO_CORPUS_FILE = "demo-corpus.parquet"


def demo_corpus_path() -> Path:
    """Path of the bundled demo corpus (FineWeb-schema parquet; see ``demo/ATTRIBUTION.md``)."""
    return Path(__file__).resolve().parent / "demo" / DEMO_CORPUS_FILE


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memtrain.data' has no attribute {name!r}")
