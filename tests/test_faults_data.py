"""Faults on the data path: SIGTERM with loader workers, concurrent remote starts, huge documents, fd leaks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import records, tiny_raw, write_yaml

from memtrain.data import documents
from memtrain.data.documents import iter_documents
from memtrain.data.ingest import build_shards
from memtrain.data.loader import read_shard_info

pytestmark = pytest.mark.faults

MEMTRAIN = [sys.executable, "-m", "memtrain"]


# ----------------------------------------------------------------------------------------------------
# R2: SIGTERM to the whole process group with DataLoader workers


def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _train_steps(run: Path) -> list[int]:
    try:
        return sorted(records(run))
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_sigterm_to_process_group_with_loader_workers_checkpoints(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_yaml(
        tmp_path / "run.yaml",
        tiny_raw(
            tiny_data.shards,
            run,
            [
                "data.num_workers=2",
                "train.steps=100000",
                "train.log_every=1",
                "train.ckpt_every=100000",
                "train.eval_every=0",
            ],
        ),
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        MEMTRAIN + ["train", str(cfg)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: len(_train_steps(run)) >= 3 or proc.poll() is not None, 120, "training steps")
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # what torchrun / the DeepSpeed launcher do: the whole group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, out[-3000:]
    assert (run / "PREEMPTED").is_file()
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts and not any(".tmp" in p.name for p in ckpts), ckpts
    assert (ckpts[-1] / "model.safetensors").is_file() and (ckpts[-1] / "trainer.pt").is_file()
    stopped = int(ckpts[-1].name.split("_")[1])
    # --resume continues from that checkpoint
    res = subprocess.run(
        MEMTRAIN + ["train", str(cfg), "--resume", "--stop-after", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode in (0, 75), res.stderr[-3000:]
    assert max(_train_steps(run)) >= stopped + 1


# ----------------------------------------------------------------------------------------------------
# R5: concurrent starts against one remote


def _start(remote: str, cache: str, barrier, q) -> None:
    try:
        barrier.wait(30)
        info = read_shard_info(remote, cache)
        q.put(("ok", str(info.local_dir)))
    except BaseException as err:  # noqa: BLE001 (report everything to the parent)
        q.put(("error", f"{type(err).__name__}: {err}"))


def test_concurrent_starts_against_file_remote(tiny_data, tmp_path):
    remote = f"file://{tiny_data.shards}"
    ctx = mp.get_context("fork")
    n, rounds = 8, 6
    results = []
    for r in range(rounds):
        cache = tmp_path / f"cache{r}"
        barrier, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_start, args=(remote, str(cache), barrier, q)) for _ in range(n)]
        for p in procs:
            p.start()
        results += [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        # nothing temporary left behind, and the cached manifest is complete
        leftovers = [p for p in cache.rglob("*") if p.name.endswith((".part", ".latest", ".tmp", ".fetch"))]
        assert not leftovers, leftovers
    errors = [r for r in results if r[0] != "ok"]
    assert not errors, errors[:3]
    assert len({r[1] for r in results if r[0] == "ok"}) <= rounds


# ----------------------------------------------------------------------------------------------------
# R9: huge documents are read in bounded pieces


def test_single_line_txt_document_is_read_in_bounded_pieces(tiny_data, tmp_path):
    from memtrain.data.documents import iter_document_pieces

    words = (tiny_data.corpus.read_text().replace("\n", " ").replace('"', " ") + " ") * 1
    text = (words * (1 + 3_300_000 // len(words)))[:3_300_000].strip()  # one line, 3.3M characters
    src = tmp_path / "one.txt"
    src.write_text(text)
    pieces = list(iter_document_pieces([str(src)]))
    assert len(pieces) >= 4
    assert all(len(p[1]) <= documents.MAX_PIECE_CHARS for p in pieces)
    assert [p[2] for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len({p[0] for p in pieces}) == 1  # one document, one id (hence one split)
    assert "".join(p[1] for p in pieces) == text
    assert all(len(t) <= documents.MAX_PIECE_CHARS for _, t in iter_documents([str(src)]))
    # jsonl and a document with blank lines around
    src2 = tmp_path / "two.txt"
    src2.write_text("short doc\n\n" + text[:2_500_000] + "\n\nlast doc\n")
    docs = list(iter_document_pieces([str(src2)]))
    assert docs[0] == ("two.txt#0", "short doc", True) and docs[-1] == ("two.txt#2", "last doc", True)
    assert "".join(t for i, t, _ in docs if i == "two.txt#1") == text[:2_500_000]
    # shards still build, and the document counts once
    summary = build_shards(
        [str(src)], tiny_data.tokenizer, tmp_path / "shards", row_len=32, val_fraction=0, workers=1, progress=False
    )
    assert summary["splits"]["train"]["documents"] == 1
    assert summary["splits"]["train"]["rows"] > 1000


def test_huge_jsonl_line_refused_not_read_whole(tmp_path, monkeypatch):
    from memtrain.errors import UserError

    monkeypatch.setattr(documents, "MAX_JSONL_LINE_CHARS", 1000)
    src = tmp_path / "big.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "x " * 2000}) + "\n")
    with pytest.raises(UserError, match=r"big.jsonl:1: line longer than 1000"):
        list(iter_documents([str(src)]))


# ----------------------------------------------------------------------------------------------------
# R10: loaders release their file descriptors


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_evaluating_many_times_does_not_leak_file_descriptors(tiny_data):
    from memtrain.data.loader import make_loader
    from memtrain.evaluation import take_batches

    # other datasets alive meanwhile (a training loader, other tests' loaders) must not make each one leak
    held = [make_loader(tiny_data.shards, "val", 2, False, 0, max_batches=1) for _ in range(5)]
    try:
        take_batches(str(tiny_data.shards), "val", 2, 1)
        before = _fds()
        for _ in range(25):
            assert len(take_batches(str(tiny_data.shards), "val", 2, 1)) == 1
        assert _fds() <= before + 2
    finally:
        for loader in held:
            loader.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_closed_loader_releases_its_descriptors_and_cache_claim(tiny_data, tmp_path):
    from memtrain.data.loader import _live_locals, make_loader

    remote = f"file://{tiny_data.shards}"
    before = _fds()
    for _ in range(5):
        with make_loader(remote, "val", 2, False, 0, cache_dir=tmp_path / "c", max_batches=1) as loader:
            assert len(list(loader)) == 1
        with pytest.raises(RuntimeError, match="closed"):
            iter(loader)
    assert _fds() <= before + 2
    assert not [k for k in _live_locals if str(tmp_path) in k[0]]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_resumed_and_refused_loaders_keep_no_descriptors(tiny_data):
    """A resumed loader reads its resume state at every epoch start and every ``state_dict()`` (each checkpoint);
    a loader refused after its dataset opened (a batch larger than the split) is never returned to be closed.
    Neither keeps shared memory or descriptors."""
    from memtrain.data.loader import make_loader
    from memtrain.errors import UserError

    with make_loader(tiny_data.shards, "train", 2, True, 0) as first:
        it = iter(first)
        next(it)
        state = first.state_dict()
        it.close()
    before = _fds()
    for _ in range(5):
        with make_loader(tiny_data.shards, "train", 2, True, 0) as loader:
            loader.load_state_dict(state)
            it = iter(loader)
            next(it)
            for _ in range(3):
                loader.state_dict()
            it.close()
        with pytest.raises(UserError, match="fewer than one batch"):
            make_loader(tiny_data.shards, "val", 10**6, False, 0)
    assert _fds() <= before + 2


def test_two_processes_decompressing_one_shard_at_once_do_not_collide(tmp_path):
    """Ranks of several nodes sharing a cache directory may decompress the same compressed shard together:
    each through a temporary file of its own, never a half-written shard, never a lost rename; a compressed
    file another process already decompressed and removed is no error."""
    import threading

    from streaming.base.compression import compress

    from memtrain.data.checked_stream import CheckedStream

    raw = os.urandom(1 << 20)
    zipped, target = tmp_path / "shard.00000.mds.zstd", tmp_path / "shard.00000.mds"
    zipped.write_bytes(compress("zstd", raw))
    stream = CheckedStream.__new__(CheckedStream)  # only the decompression step, no dataset around it
    stream.validate_hash, stream.safe_keep_zip = None, True
    errors: list[BaseException] = []

    def decompress_many() -> None:
        try:
            for _ in range(30):
                stream._decompress_shard_part(None, str(zipped), str(target), "zstd")
                assert target.read_bytes() == raw
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=decompress_many) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([zipped.name, target.name])  # no temporary left
    stream.safe_keep_zip = False
    stream._decompress_shard_part(None, str(zipped), str(target), "zstd")
    assert not zipped.exists()
    stream._decompress_shard_part(None, str(zipped), str(target), "zstd")  # already done by someone else
    assert target.read_bytes() == raw
