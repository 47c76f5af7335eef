"""Shared fixtures: small tokenizer + shard pairs cut from the bundled demo corpus, and tiny run configs.

Built once per test session. ``tiny_data`` matches ``yaml/tiny.yaml`` (rows of 4 x 8 = 32 tokens);
``other_data`` is made from a different slice of the corpus with another vocabulary (so another tokenizer,
same row length) for mismatch tests.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memtrain.config import Config, apply_overrides, config_from_dict, read_yaml
from memtrain.data import demo_corpus_path
from memtrain.data.ingest import build_shards
from memtrain.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "yaml" / "tiny.yaml"
ROW_LEN = 32  # yaml/tiny.yaml: chunk_len 8 x n_chunks 4


@dataclass(frozen=True)
class ShardSet:
    """A tokenizer and the shard directory made with it (rows of ROW_LEN tokens, train and val splits)."""

    corpus: Path
    tokenizer: Path
    shards: Path


def _build(root: Path, offset: int, n_docs: int, vocab_size: int) -> ShardSet:
    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).slice(offset, n_docs)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps({"id": row["id"], "text": row["text"][:2500]}) + "\n")
    tok = train_tokenizer([str(corpus)], root / "tok", vocab_size=vocab_size, threads=1)
    build_shards([str(corpus)], tok, root / "shards", row_len=ROW_LEN, val_fraction=0.05, workers=1,
                 progress=False)
    return ShardSet(corpus=corpus, tokenizer=tok, shards=root / "shards")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> ShardSet:
    """Tokenizer (vocab 400) + shards of the first 150 demo documents, rows of 32 tokens."""
    return _build(tmp_path_factory.mktemp("tiny_data"), offset=0, n_docs=150, vocab_size=400)


@pytest.fixture(scope="session")
def other_data(tmp_path_factory) -> ShardSet:
    """Another tokenizer (vocab 420, documents 600..720) + its shards, also rows of 32 tokens."""
    return _build(tmp_path_factory.mktemp("other_data"), offset=600, n_docs=120, vocab_size=420)


def tiny_raw(shards: Path, out_dir: Path, overrides: list[str] = ()) -> dict:
    """yaml/tiny.yaml as a dict pointed at ``shards`` and ``out_dir``: fp32, one thread, no progress bar,
    then ``overrides`` (``a.b=value`` strings, as for ``--set``)."""
    raw = read_yaml(TINY_YAML)
    base = [f"data.shards={shards}", f"run.out_dir={out_dir}", "train.precision=fp32", "train.progress=false",
            "train.threads=1", "train.device=cpu"]
    return apply_overrides(raw, base + list(overrides))


def tiny_config(shards: Path, out_dir: Path, *overrides: str) -> Config:
    """A validated tiny :class:`Config` (see :func:`tiny_raw`)."""
    return config_from_dict(tiny_raw(shards, out_dir, overrides), source="tiny test config")


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """A run's metrics.jsonl records of one kind by step (a later record of a step replaces an earlier one)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def write_yaml(path: Path, raw: dict) -> Path:
    """Write a config dict as YAML; returns ``path``."""
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tree_hash(root: Path) -> str:
    """Hash of every path and file content under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
