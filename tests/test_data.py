"""Data pipeline: tokenizer, ingestion to MDS shards, streaming loader, errors, demo corpus."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memtrain.data import demo_corpus_path
from memtrain.data.documents import expand_sources, is_val_document, iter_documents, stable_fraction
from memtrain.data.ingest import INFO_FILE, build_shards, merge_shards, partial_dir
from memtrain.data.loader import check_compatible, make_loader, read_shard_info
from memtrain.data.mds_rows import row_writer
from memtrain.data.tokenizer import Tokenizer, train_tokenizer
from memtrain.errors import UserError

FINEWEB_COLUMNS = ["text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count"]
ROW_LEN = 64
VOCAB = 500


# ----------------------------------------------------------------------------------------------------
# fixtures: a small corpus cut from the demo corpus, in all three formats


def _demo_docs(n: int, offset: int = 0, max_chars: int = 1200) -> list[dict]:
    table = pq.read_table(demo_corpus_path(), columns=["text", "id"])
    rows = table.slice(offset, n).to_pylist()
    return [{"id": r["id"], "text": r["text"][:max_chars]} for r in rows]


def _write_parquet(path: Path, docs: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=32)


def _write_jsonl(path: Path, docs: list[dict], with_id: bool = True) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d if with_id else {"text": d["text"]}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """parquet (160 docs, with ids), jsonl (80 docs, no ids), txt (40 paragraphs) under one directory."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    (src / "nested").mkdir(parents=True)
    _write_parquet(src / "part0.parquet", _demo_docs(160, 0))
    _write_jsonl(src / "nested" / "more.jsonl", _demo_docs(80, 900), with_id=False)
    paras = [p for d in _demo_docs(40, 1500, max_chars=400) for p in d["text"].split("\n\n")[:1]]
    (src / "notes.txt").write_text("\n\n".join(paras) + "\n")
    return {"root": root, "src": src, "n_docs": 160 + 80 + len(paras), "n_txt": len(paras)}


@pytest.fixture(scope="module")
def tokenizer_path(corpus) -> Path:
    return train_tokenizer([str(corpus["src"])], corpus["root"] / "tok", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def shards(corpus, tokenizer_path) -> Path:
    out = corpus["root"] / "shards"
    build_shards(
        [str(corpus["src"])], tokenizer_path, out, row_len=ROW_LEN, val_fraction=0.1, workers=2, progress=False
    )
    return out


def _tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by relative path, without the uncompressed copies the loader leaves."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".mds")
    }


def _rows(shards_dir: Path, split: str) -> np.ndarray:
    """All rows of a split in stored order: [rows, row_len]."""
    with make_loader(str(shards_dir), split, batch_size=1, shuffle=False, seed=0, drop_last=False) as loader:
        return torch.cat(list(loader.epoch())).numpy()


# ----------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_ids_roundtrip_and_sha(corpus, tokenizer_path, tmp_path):
    tok = Tokenizer.load(tokenizer_path)
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.blank_id) == (0, 1, 2, 3, 4, 5)
    assert [tok.id_to_piece(i) for i in range(6)] == ["<pad>", "<unk>", "<s>", "</s>", "<sep>", "<blank>"]
    texts = [
        "The planner chooses a query plan.",
        "  two  spaces\nand a newline\tand a tab ",
        "Ünïcödé — “quotes”, emoji 😀 and 中文 via byte fallback",
        "",
    ]
    ids = tok.encode(texts)
    assert all(isinstance(i, int) for seq in ids for i in seq)
    assert all(0 <= i < tok.vocab_size for seq in ids for i in seq)
    assert [tok.decode(seq) for seq in ids] == texts
    assert tok.decode(torch.tensor(ids[0])) == texts[0]
    assert tok.sha256 == hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    # deterministic: the same corpus and settings give the same bytes
    again = train_tokenizer([str(corpus["src"])], tmp_path / "again", vocab_size=VOCAB)
    assert Tokenizer.load(again).sha256 == tok.sha256
    assert Tokenizer.load(tmp_path / "again").sha256 == tok.sha256  # a directory works too


def test_tokenizer_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer([str(corpus["src"])], tmp_path / "t", vocab_size=100)
    with pytest.raises(UserError, match="model-type"):
        train_tokenizer([str(corpus["src"])], tmp_path / "t", vocab_size=VOCAB, model_type="wordpiece")
    with pytest.raises(UserError, match="too large for this corpus"):
        train_tokenizer([str(corpus["src"] / "notes.txt")], tmp_path / "t", vocab_size=60000)
    with pytest.raises(UserError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(UserError, match="bad.model"):
        Tokenizer.load(bad)
    assert not (tmp_path / "t" / "tokenizer.model").exists()


# ----------------------------------------------------------------------------------------------------
# ingestion


def test_sources_all_formats_dirs_and_globs(corpus):
    src = corpus["src"]
    files = expand_sources([str(src)])
    assert [(f.kind, f.name) for f in files] == [
        ("jsonl", "nested/more.jsonl"),
        ("txt", "notes.txt"),
        ("parquet", "part0.parquet"),
    ]
    docs = list(iter_documents([str(src)]))
    assert len(docs) == corpus["n_docs"]
    ids = [d for d, _ in docs]
    assert ids[0] == "nested/more.jsonl:1" and ids[80] == "notes.txt#0"
    assert ids[80 + corpus["n_txt"]] == _demo_docs(1)[0]["id"]  # parquet ids come from the id column
    assert all(text.strip() for _, text in docs)
    assert len(list(iter_documents([str(src / "*.parquet")]))) == 160
    assert len(list(iter_documents([str(src / "**" / "*.jsonl")]))) == 80
    assert list(iter_documents([str(src / "notes.txt")]))[0][0] == "notes.txt#0"


def test_packing_is_exact_for_a_known_corpus(tmp_path, tokenizer_path):
    texts = [
        "First document, short.",
        "The second document is a little longer than the first one.",
        "Third.",
        "A fourth document closes the corpus with some more words to pack.",
    ]
    _write_jsonl(tmp_path / "tiny.jsonl", [{"text": t} for t in texts], with_id=False)
    out = tmp_path / "sh"
    summary = build_shards(
        [str(tmp_path / "tiny.jsonl")], tokenizer_path, out, row_len=8, val_fraction=0.0, workers=1, progress=False
    )
    tok = Tokenizer.load(tokenizer_path)
    stream = [i for ids in tok.encode(texts) for i in ids + [tok.eos_id]]
    n_rows = len(stream) // 8
    rows = _rows(out, "train")
    assert rows.shape == (n_rows, 8)
    assert rows.reshape(-1).tolist() == stream[: n_rows * 8]
    assert summary["splits"]["train"] == {
        "rows": n_rows,
        "tokens": n_rows * 8,
        "documents": 4,
        "dropped_tail_tokens": len(stream) - n_rows * 8,
    }
    assert not (out / "val").exists() and "val" not in summary["splits"]
    info = json.loads((out / INFO_FILE).read_text())
    assert info["row_len"] == 8 and info["tokenizer_sha256"] == tok.sha256 and info["vocab_size"] == VOCAB
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "sep": 4, "blank": 5}
    assert (out / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()


def _unit_stream_rows(units_docs: list[list[tuple[str, str]]], tok, split: str) -> tuple[list[int], int]:
    """The tokens a split's rows hold, in order, when each unit packs its own documents and the units' tails
    fill the last rows: (tokens of the rows, dropped tail tokens)."""
    full: list[int] = []
    tails: list[int] = []
    for docs in units_docs:
        chosen = [t for d, t in docs if is_val_document(d, 0.1) == (split == "val")]
        stream = [i for ids in tok.encode(chosen) for i in ids + [tok.eos_id]]
        cut = len(stream) // ROW_LEN * ROW_LEN
        full += stream[:cut]
        tails += stream[cut:]
    cut = len(tails) // ROW_LEN * ROW_LEN
    return full + tails[:cut], len(tails) - cut


def test_shards_hold_the_tokenized_stream_of_each_split(corpus, tokenizer_path, shards):
    tok = Tokenizer.load(tokenizer_path)
    docs = list(iter_documents([str(corpus["src"])]))
    # three units, one per file (each far below the default unit size)
    units_docs = [list(iter_documents([f])) for f in expand_sources([str(corpus["src"])])]
    assert len(units_docs) == 3 and sum(map(len, units_docs)) == len(docs)
    info = read_shard_info(str(shards))
    assert info.row_len == ROW_LEN and info.eos_id == 3 and info.tokenizer_sha256 == tok.sha256
    for split in ("train", "val"):
        chosen = [t for d, t in docs if is_val_document(d, 0.1) == (split == "val")]
        expected, dropped = _unit_stream_rows(units_docs, tok, split)
        rows = _rows(shards, split)
        assert rows.shape[1] == ROW_LEN and rows.dtype == np.int64
        assert rows.reshape(-1).tolist() == expected
        assert dropped < ROW_LEN
        counts = info.splits[split]
        assert counts["rows"] == len(rows) and counts["documents"] == len(chosen)
        assert counts["dropped_tail_tokens"] == dropped
    assert 0 < info.splits["val"]["documents"] < info.splits["train"]["documents"]
    # train and val partition the corpus by document
    assert info.splits["train"]["documents"] + info.splits["val"]["documents"] == corpus["n_docs"]


def test_output_independent_of_workers_and_split_independent_of_order(corpus, tokenizer_path, shards, tmp_path):
    one = tmp_path / "w1"
    build_shards(
        [str(corpus["src"])], tokenizer_path, one, row_len=ROW_LEN, val_fraction=0.1, workers=1, progress=False
    )
    assert _tree(one) == _tree(shards)  # every index, record and zstd shard, byte for byte
    # split membership depends on the id only: reversing the document order keeps every document's side
    docs = list(iter_documents([str(corpus["src"])]))
    _write_jsonl(tmp_path / "rev.jsonl", [{"id": d, "text": t} for d, t in reversed(docs)])
    rev = build_shards(
        [str(tmp_path / "rev.jsonl")],
        tokenizer_path,
        tmp_path / "rev",
        row_len=ROW_LEN,
        val_fraction=0.1,
        workers=2,
        progress=False,
    )
    info = read_shard_info(str(shards))
    for split in ("train", "val"):
        assert rev["splits"][split]["documents"] == info.splits[split]["documents"]
        assert (
            rev["splits"][split]["rows"] * ROW_LEN + rev["splits"][split]["dropped_tail_tokens"]
            == info.splits[split]["rows"] * ROW_LEN + info.splits[split]["dropped_tail_tokens"]
        )
    assert stable_fraction("doc-1") == stable_fraction("doc-1") != stable_fraction("doc-1", seed=1)


@pytest.mark.parametrize("size_limit", [None, 1000, 300, 100, 40])
def test_row_writer_fast_path_writes_what_the_plain_writer_writes(tmp_path, size_limit):
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 60000, size=(n, 16), dtype=np.uint16) for n in (1, 7, 0, 33, 2)]
    plain = row_writer(tmp_path / "plain", 16, "uint16", size_limit)
    fast = row_writer(tmp_path / "fast", 16, "uint16", size_limit)
    for block in blocks:
        for row in block:
            plain.write({"input_ids": row})
        fast.write_rows(block)
    plain.finish()
    fast.finish()
    assert _tree(tmp_path / "fast") == _tree(tmp_path / "plain")
    assert len(json.loads((tmp_path / "fast" / "index.json").read_text())["shards"]) >= (1 if size_limit else 0)
    with pytest.raises(ValueError, match=r"\[n, 16\] uint16"):
        fast.write_rows(np.zeros((2, 8), np.uint16))


def test_sliced_build_killed_and_resumed_is_byte_identical(corpus, tokenizer_path, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = corpus["src"] / "part0.parquet"  # 160 documents in row groups of 32, cut into units of ~20 kB
    common = dict(row_len=ROW_LEN, val_fraction=0.1, progress=False, unit_size="20kb")
    single = build_shards([str(src)], tokenizer_path, tmp_path / "single", workers=1, **common)
    n = single["units"]
    assert n >= 6 and single["merged"]
    out = tmp_path / "sliced"
    job = partial_dir(out)
    first = build_shards([str(src)], tokenizer_path, out, workers=1, rank=2, world=3, **common)
    assert not first["merged"] and first["written"] == len(range(2, n, 3)) and first["missing"] == n - first["written"]
    # slice 0 is killed (SIGKILL) once it has written a unit
    cmd = [
        sys.executable,
        "-m",
        "memtrain",
        "data",
        "shards",
        "--input",
        str(src),
        "--tokenizer",
        str(tokenizer_path),
        "--out",
        str(out),
        "--row-len",
        str(ROW_LEN),
        "--val-fraction",
        "0.1",
        "--unit-size",
        "20kb",
        "--workers",
        "1",
        "--rank",
        "0",
        "--world",
        "3",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (job / "val" / "unit_00000").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what a kill in the middle of a unit leaves behind
    (job / "val" / ".unit_00003.tmp-99999").mkdir(parents=True, exist_ok=True)
    (job / "val" / ".unit_00003.tmp-99999" / "shard.00000.mds.zstd").write_bytes(b"half")
    # and beside a unit that is finished (a kill between two of its temporary folders), which no start cleans
    (job / "val" / ".unit_00000.tmp-99998").mkdir(parents=True, exist_ok=True)
    second = build_shards([str(src)], tokenizer_path, out, workers=1, rank=1, world=3, merge=False, **common)
    assert second["written"] == len(range(1, n, 3)) and not second["merged"]
    # a finished unit damaged afterwards (slice 2's unit 5) is found and written again
    rec = json.loads((job / "train" / "unit_00005" / "memtrain_unit.json").read_text())
    with open(job / "train" / "unit_00005" / rec["shards"][0]["shard"], "ab") as f:
        f.write(b"x")
    assert merge_shards(out) is None
    resumed = build_shards([str(src)], tokenizer_path, out, workers=1, rank=0, world=3, **common)
    assert not resumed["merged"] and resumed["missing"] == 1 and not list(job.rglob(".unit_*"))
    last = build_shards([str(src)], tokenizer_path, out, workers=1, rank=2, world=3, **common)
    assert last["merged"] and last["written"] == 1 and not job.exists()
    assert _tree(out) == _tree(tmp_path / "single")
    for split in ("train", "val"):
        assert _rows(out, split).tolist() == _rows(tmp_path / "single", split).tolist()


def test_sliced_build_refuses_different_settings(corpus, tokenizer_path, tmp_path):
    src = corpus["src"] / "part0.parquet"
    out = tmp_path / "out"
    build_shards(
        [str(src)],
        tokenizer_path,
        out,
        row_len=ROW_LEN,
        val_fraction=0.1,
        workers=1,
        progress=False,
        unit_size="20kb",
        rank=0,
        world=3,
    )
    with pytest.raises(
        UserError,
        match=r"out.partial: this partial shard build was started with row_len = 64, "
        r"this job has 32; use another --out",
    ):
        build_shards(
            [str(src)],
            tokenizer_path,
            out,
            row_len=32,
            val_fraction=0.1,
            workers=1,
            progress=False,
            unit_size="20kb",
            rank=1,
            world=3,
        )
    assert (partial_dir(out) / "train" / "unit_00000").is_dir()  # a refusal never touches the build


# ----------------------------------------------------------------------------------------------------
# loader


def test_loader_batches_cover_each_row_once_per_epoch(shards, open_loader):
    all_rows = _rows(shards, "train")
    loader = open_loader(str(shards), "train", batch_size=8, shuffle=True, seed=1)
    assert len(loader) == len(all_rows) // 8
    it = iter(loader)
    epochs = []
    for _ in range(2):
        batches = [next(it) for _ in range(len(loader))]
        assert all(b.shape == (8, ROW_LEN) and b.dtype == torch.long for b in batches)
        epochs.append(torch.cat(batches).numpy())
    every = Counter(r.tobytes() for r in all_rows)
    for ep in epochs:  # drop_last: each stored row at most once (rows may repeat in the text itself)
        assert not Counter(r.tobytes() for r in ep) - every
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert not np.array_equal(epochs[0], all_rows[: len(epochs[0])])  # shuffled at all
    full = open_loader(str(shards), "train", batch_size=8, shuffle=True, seed=1, drop_last=False)
    got = torch.cat(list(full.epoch())).numpy()
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in all_rows)


@pytest.mark.parametrize("k,workers", [(0, 0), (5, 0), ("epoch", 0), ("epoch+3", 0), (5, 2)])
def test_loader_exact_mid_epoch_resume(shards, open_loader, k, workers):
    def loader(num_workers=workers):
        return open_loader(str(shards), "train", batch_size=8, shuffle=True, seed=7, num_workers=num_workers)

    per_epoch = len(loader())
    k = {"epoch": per_epoch, "epoch+3": per_epoch + 3}.get(k, k)
    total = per_epoch + 6
    it = iter(loader(0))  # the reference always reads in-process: worker count does not change the order
    reference = [next(it) for _ in range(total)]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint metadata)
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(total - k)]
    assert len(head + tail) == len(reference)
    for i, (a, b) in enumerate(zip(head + tail, reference)):
        assert torch.equal(a, b), f"batch {i} differs after resuming at {k}"


def test_val_loader_fixed_batches_and_two_loaders(shards, open_loader):
    val = open_loader(str(shards), "val", batch_size=4, shuffle=False, seed=0, max_batches=3)
    train = open_loader(str(shards), "train", batch_size=4, shuffle=True, seed=0)
    a, b = list(val), list(val)
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.cat(a), torch.from_numpy(_rows(shards, "val")[:12]))
    assert next(iter(train)).shape == (4, ROW_LEN)
    with pytest.raises(UserError, match="loader state: saved for split 'train'"):
        val.load_state_dict(train.state_dict())


def test_remote_file_url_reads_through_cache(shards, open_loader, tmp_path):
    url = "file://" + str(shards.resolve())
    info = read_shard_info(url, cache_dir=tmp_path / "cache")
    assert info.remote == str(shards.resolve()) and info.local_dir.is_relative_to(tmp_path / "cache")
    assert Tokenizer.load(info.tokenizer_path).sha256 == info.tokenizer_sha256
    remote = open_loader(url, "val", batch_size=4, shuffle=False, seed=0, cache_dir=tmp_path / "cache", max_batches=2)
    local = open_loader(str(shards), "val", batch_size=4, shuffle=False, seed=0, max_batches=2)
    assert all(torch.equal(x, y) for x, y in zip(remote, local))
    with pytest.raises(UserError, match="not a memtrain shard directory"):
        read_shard_info("file://" + str(tmp_path), cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------
# errors


def test_bad_inputs_raise_user_errors(tmp_path, tokenizer_path):
    def build(src, out="out", **kw):
        kw.setdefault("row_len", 8)
        return build_shards([str(src)], tokenizer_path, tmp_path / out, workers=1, progress=False, **kw)

    with pytest.raises(UserError, match="missing.jsonl: input not found"):
        build(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="matches no files"):
        build(tmp_path / "*.parquet")
    (tmp_path / "empty.jsonl").write_text('\n{"text": "   "}\n\n')
    with pytest.raises(UserError, match="empty.jsonl: no documents found"):
        build(tmp_path / "empty.jsonl")
    pq.write_table(pa.table({"content": ["some text here"], "id": ["a"]}), tmp_path / "notext.parquet")
    with pytest.raises(UserError, match=r"notext.parquet: parquet file has no 'text' column \(columns: content, id\)"):
        build(tmp_path / "notext.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        build(tmp_path / "bad.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"notext.jsonl:1: field 'text' is missing"):
        build(tmp_path / "notext.jsonl")
    (tmp_path / "doc.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="doc.csv: unsupported file type"):
        build(tmp_path / "doc.csv")
    good = tmp_path / "good.jsonl"
    _write_jsonl(good, _demo_docs(12, 300))
    with pytest.raises(UserError, match="--row-len"):
        build(good, row_len=1)
    with pytest.raises(UserError, match=r"validation split would be empty: \d+ of 12 documents.*--val-fraction"):
        build(good, val_fraction=0.001)
    # nothing half-written is left behind by any of the failures above
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name == "out"]


def test_existing_output_is_left_untouched(tmp_path, tokenizer_path):
    src = tmp_path / "good.jsonl"
    _write_jsonl(src, _demo_docs(12, 300))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="out: output directory exists and is not empty"):
        build_shards([str(src)], tokenizer_path, out, row_len=8, val_fraction=0, workers=1, progress=False)
    with pytest.raises(UserError, match="not a memtrain shard directory"):
        build_shards(
            [str(src)], tokenizer_path, out, row_len=8, val_fraction=0, workers=1, progress=False, overwrite=True
        )
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "out"]
    # an earlier shard directory can be replaced with overwrite=True
    sh = tmp_path / "sh"
    build_shards([str(src)], tokenizer_path, sh, row_len=8, val_fraction=0, workers=1, progress=False)
    build_shards([str(src)], tokenizer_path, sh, row_len=16, val_fraction=0, workers=1, progress=False, overwrite=True)
    assert read_shard_info(str(sh)).row_len == 16


def test_shard_dir_and_compatibility_errors(shards, tmp_path):
    with pytest.raises(UserError, match="nowhere: shard directory not found"):
        read_shard_info(str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(
        UserError,
        match=r"plain: no memtrain_shards.json: not a memtrain shard directory; "
        r"make one with `memtrain data shards`",
    ):
        read_shard_info(str(tmp_path / "plain"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / INFO_FILE).write_text('{"format_version": 1, "row_len": "long"}')
    with pytest.raises(UserError, match="memtrain_shards.json: field 'tokenizer_sha256'"):
        read_shard_info(str(tmp_path / "broken"))
    (tmp_path / "broken" / INFO_FILE).write_text("{not json")
    with pytest.raises(UserError, match="malformed memtrain_shards.json"):
        read_shard_info(str(tmp_path / "broken"))
    with pytest.raises(UserError, match="unsupported remote scheme 'ftp://'"):
        read_shard_info("ftp://host/shards")

    info = read_shard_info(str(shards))
    check_compatible(info, row_len=ROW_LEN, tokenizer_sha256=info.tokenizer_sha256, vocab_size=VOCAB)
    with pytest.raises(
        UserError,
        match=r"data.shards \(.*\): rows hold 64 tokens but "
        r"model.chunk_len x model.n_chunks = 4 x 32 = 128",
    ):
        check_compatible(info, row_len=128, row_len_source="model.chunk_len x model.n_chunks = 4 x 32")
    other = "cd34" + "0" * 60
    with pytest.raises(
        UserError,
        match=rf"shards were made with tokenizer sha256 {info.tokenizer_sha256[:12]}… "
        rf"but the checkpoint's tokenizer is cd3400000000…",
    ):
        check_compatible(info, tokenizer_sha256=other)
    with pytest.raises(UserError, match="has 500 ids but model.vocab_size is 8000"):
        check_compatible(info, vocab_size=8000)
    with pytest.raises(UserError, match="has no 'test' split"):
        make_loader(str(shards), "test", batch_size=2, shuffle=False, seed=0)
    with pytest.raises(UserError, match="fewer than one batch of 100000"):
        make_loader(str(shards), "val", batch_size=100000, shuffle=False, seed=0)


# ----------------------------------------------------------------------------------------------------
# CLI and demo corpus


def _data_cli(argv: list[str]) -> int:
    from memtrain.data.cli import register

    parser = argparse.ArgumentParser(prog="memtrain data")
    register(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_tokenizer_and_shards(corpus, tmp_path, capsys):
    src = str(corpus["src"] / "part0.parquet")
    assert _data_cli(["tokenizer", "--input", src, "--out", str(tmp_path / "tok"), "--vocab-size", "400"]) == 0
    assert (
        _data_cli(
            [
                "shards",
                "--input",
                src,
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "sh"),
                "--chunk-len",
                "8",
                "--chunks",
                "4",
                "--val-fraction",
                "0.1",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "vocab 400" in out and "rows of 32 tokens" in out and "train" in out and "val" in out
    assert read_shard_info(str(tmp_path / "sh")).row_len == 32
    with pytest.raises(UserError, match="--row-len N, or --chunk-len L together with --chunks C"):
        _data_cli(
            [
                "shards",
                "--input",
                src,
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "x"),
                "--chunk-len",
                "8",
            ]
        )


def test_prepare_demo_is_idempotent(tmp_path, capsys):
    argv = [
        "prepare-demo",
        "--out",
        str(tmp_path / "demo"),
        "--vocab-size",
        "1024",
        "--row-len",
        "128",
        "--no-progress",
    ]
    assert _data_cli(argv) == 0
    info = read_shard_info(str(tmp_path / "demo" / "shards"))
    assert info.row_len == 128 and info.vocab_size == 1024 and info.rows("val") >= 100
    assert info.tokenizer_sha256 == Tokenizer.load(tmp_path / "demo" / "tokenizer.model").sha256
    mtime = (tmp_path / "demo" / "shards" / INFO_FILE).stat().st_mtime_ns
    capsys.readouterr()
    assert _data_cli(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "demo" / "shards" / INFO_FILE).stat().st_mtime_ns == mtime


def test_bundled_demo_corpus():
    path = demo_corpus_path()
    assert path.is_file() and path.stat().st_size <= 4 * 1024 * 1024
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.names == FINEWEB_COLUMNS
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    table = pf.read()
    assert table.num_rows > 1000
    assert table.schema.field("language_score").type == pa.float64()
    assert table.schema.field("token_count").type == pa.int64()
    assert set(table.column("dump").to_pylist()) == {"python-3.11-docs", "postgresql-15-docs"}
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    text_mb = sum(len(t.encode()) for t in table.column("text").to_pylist()) / 1e6
    assert 8 <= text_mb <= 14
    attribution = (path.parent / "ATTRIBUTION.md").read_text()
    assert "PSF License Agreement" in attribution and "PostgreSQL" in attribution
    assert os.path.getsize(path.parent / "ATTRIBUTION.md") > 1000


def test_stale_shared_memory_cleanup_spares_live_segments(tmp_path):
    from multiprocessing import shared_memory

    from memtrain.data.streaming_compat import clean_stale_shared_memory_safely

    live = shared_memory.SharedMemory(name="999990_barrier", create=True, size=8)  # mapped by this process
    stale = Path("/dev/shm/999991_barrier")
    stale.write_bytes(b"\0" * 8)  # as left behind by a killed process: nobody maps it
    os.utime(stale, (0, 0))
    try:
        assert clean_stale_shared_memory_safely().startswith("stale-only")
        assert not stale.exists()
        assert Path("/dev/shm/999990_barrier").exists()
    finally:
        live.close()
        live.unlink()
        stale.unlink(missing_ok=True)


def test_stale_lock_file_cleanup_spares_live_and_held_ones(tmp_path):
    import fcntl
    from multiprocessing import shared_memory

    from memtrain.data.streaming_compat import remove_stale_lock_files

    live = shared_memory.SharedMemory(name="999980_locals", create=True, size=8)  # a dataset that exists
    for prefix in ("999980", "999981", "999982"):
        (tmp_path / f"{prefix}_barrier_filelock").touch()
        (tmp_path / f"{prefix}_cache_filelock").touch()
    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "999983_cache_filelock").symlink_to(target)  # never followed, never removed
    held = os.open(tmp_path / "999982_cache_filelock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a process inside the lock right now
    try:
        assert remove_stale_lock_files(directory=tmp_path) == 3
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [
            "999980_barrier_filelock",
            "999980_cache_filelock",
            "999982_cache_filelock",
            "999983_cache_filelock",
            "precious",
        ]
        assert target.read_text() == "keep"
    finally:
        os.close(held)
        live.close()
        live.unlink()


def test_closed_loader_leaves_no_lock_files(tiny_data):
    import tempfile

    loader = make_loader(tiny_data.shards, "train", batch_size=2, shuffle=False, seed=0)
    next(iter(loader))
    prefix = loader.dataset._shm_prefix_int
    files = [Path(tempfile.gettempdir()) / f"{prefix:06d}_{kind}_filelock" for kind in ("barrier", "cache")]
    assert any(f.exists() for f in files)
    loader.close()
    assert not any(f.exists() for f in files)


def test_a_leader_registers_its_shared_memory_under_the_node_lock(tiny_data, monkeypatch):
    """A job's local leader picks and registers its /dev/shm prefix under one node-wide lock: while another
    job's leader holds it, the loader waits; other ranks never take it; a lock held too long is not waited for."""
    import fcntl
    import tempfile
    import threading

    from memtrain.data import loader as loader_module

    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd = os.open(os.path.join(folder, loader_module.PREFIX_LOCK), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another job's leader, registering its prefix
    opened = threading.Event()

    def build() -> None:
        with make_loader(str(tiny_data.shards), "train", batch_size=2, shuffle=False, seed=0):
            opened.set()

    try:
        monkeypatch.setenv("LOCAL_RANK", "0")
        waiting = threading.Thread(target=build)
        waiting.start()
        assert not opened.wait(1.5)  # waits for the other leader
        os.close(fd)  # the other job's prefix is registered
        fd = -1
        waiting.join(60)
        assert opened.is_set()

        fd = os.open(os.path.join(folder, loader_module.PREFIX_LOCK), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        monkeypatch.setenv("LOCAL_RANK", "1")  # not a leader: its leader holds the lock for it
        opened.clear()
        build()
        assert opened.is_set()
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setattr(loader_module, "PREFIX_LOCK_WAIT_S", 0.3)  # a stuck holder is not waited for
        opened.clear()
        build()
        assert opened.is_set()
    finally:
        if fd >= 0:
            os.close(fd)
