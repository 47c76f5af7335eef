"""Remote shards from a real S3-compatible object store: moto's S3 server, started here on a local port.

The shard directory is uploaded once per module; every test reads ``s3://memtrain-test/shards`` through
mosaicml-streaming's S3 client (``S3_ENDPOINT_URL``, fake credentials) and compares with the same directory read
from local disk: the same batches, the same resume, one download per shard for the ranks of a node, and a
server that stops mid-download ending the run with one line that names the URL while leaving nothing in the
cache that a later run would take for a complete file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import SHM_RACE, SHM_RACE_LEADER, rank_env, records, tiny_config

from memtrain.data.ingest import build_shards
from memtrain.data.loader import make_loader, read_shard_info
from memtrain.errors import UserError

BUCKET = "memtrain-test"
PREFIX = "shards"
URL = f"s3://{BUCKET}/{PREFIX}"
BATCH = 8


class FaultyS3:
    """moto's S3 application behind a WSGI layer that counts GET requests per path and can cut a download short:
    ``cut(name, stop=False)`` sends the first half of the next GET of an object whose key ends with ``name`` and
    drops the connection; with ``stop`` the server then stops (every later request is dropped until it is closed),
    and with ``restart`` too it starts again on the same port; else later requests are served normally."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.gets: Counter[str] = Counter()
        self.server = None
        self.port = 0
        self._cut: tuple[str, bool, bool] | None = None
        self._down = False
        self._lock = threading.Lock()
        # DataLoader workers are forked from this process: they must not keep the listening socket open (the
        # port would then accept connections that no one serves, and could not be bound again)
        os.register_at_fork(after_in_child=self._forget_in_child)

    def _forget_in_child(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            try:
                server.socket.close()
            except OSError:
                pass

    # -- the server -------------------------------------------------------------------------------------
    def start(self) -> None:
        from moto.server import MotoRequestHandler
        from werkzeug.serving import make_server

        self._down = False
        self.server = make_server("127.0.0.1", self.port, self, threaded=True, request_handler=MotoRequestHandler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, name: str, stop: bool = False, restart: bool = False) -> None:
        with self._lock:
            self._cut = (name, stop, restart)

    def _stop_then(self, restart: bool) -> None:
        self.stop()
        if restart:
            self.start()

    # -- WSGI -------------------------------------------------------------------------------------------
    @staticmethod
    def _drop(environ):
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise ConnectionAbortedError("connection dropped by the test server")

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if self._down:
            self._drop(environ)
        if method == "GET":
            self.gets[path] += 1
        with self._lock:
            cut = self._cut if method == "GET" and self._cut and path.endswith(self._cut[0]) else None
            if cut:
                self._cut = None
        if cut is None:
            return self.app(environ, start_response)
        captured = {}

        def keep(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, keep))
        start_response(captured["status"], captured["headers"])
        if cut[1]:
            self._down = True
            threading.Thread(target=self._stop_then, args=(cut[2],), daemon=True).start()

        def half():
            yield body[: len(body) // 2]
            self._drop(environ)

        return half()


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",  # the loader's own retries are what is tested; none hidden in the client
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    """The tiny corpus in small shards (several per split), never read locally (only copies of it are)."""
    out = tmp_path_factory.mktemp("s3_shards") / "shards"
    build_shards(
        [str(tiny_data.corpus)],
        tiny_data.tokenizer,
        out,
        row_len=32,
        val_fraction=0.05,
        workers=1,
        shard_size="24kb",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def s3(shards):
    """moto's S3 server on a free local port, holding ``shards`` under ``s3://memtrain-test/shards``."""
    import boto3

    server = FaultyS3()
    server.start()
    env = _s3_env(server.endpoint)
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(shards.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(shards).as_posix()}")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch) -> FaultyS3:
    """The S3 server's endpoint and fake credentials in this process's environment (restored afterwards)."""
    for key, value in _s3_env(s3.endpoint).items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture
def local(shards, tmp_path) -> Path:
    """A local copy of the uploaded shard directory (streaming decompresses next to local shards)."""
    import shutil

    return Path(shutil.copytree(shards, tmp_path / "local"))


def _take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _shard_files(shards: Path, split: str = "train") -> dict[str, int]:
    """Shard file (path in the split) -> size in bytes, as the split's index records them."""
    index = json.loads((shards / split / "index.json").read_text())
    out = {}
    for shard in index["shards"]:
        for key in ("raw_data", "zip_data"):
            if shard.get(key):
                out[shard[key]["basename"]] = shard[key]["bytes"]
    return out


def test_s3_shards_give_the_local_batches_and_resume_mid_epoch(s3_env, local, tmp_path):
    info = read_shard_info(URL, tmp_path / "cache")
    assert info.remote == URL and info.tokenizer_path.is_file()
    assert info.splits == read_shard_info(local).splits
    with make_loader(local, "train", BATCH, True, 5) as loader:
        n = len(loader) + 3  # into the second epoch
        assert len(_shard_files(local)) >= 4
        expected = _take(loader, n)
    with make_loader(URL, "train", BATCH, True, 5, cache_dir=tmp_path / "cache") as loader:
        assert len(loader) + 3 == n
        got = _take(loader, n)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == n
    # every shard of the split was downloaded once, nothing was fetched twice
    for name in _shard_files(local):
        if name.endswith(".zstd"):
            assert s3_env.gets[f"/{BUCKET}/{PREFIX}/train/{name}"] == 1, name
    # exact mid-epoch resume, into a fresh cache: the state after k batches continues with batch k + 1
    k = 5
    with make_loader(URL, "train", BATCH, True, 5, cache_dir=tmp_path / "cache2") as first:
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
    with make_loader(URL, "train", BATCH, True, 5, cache_dir=tmp_path / "cache2") as resumed:
        resumed.load_state_dict(state)
        tail = _take(resumed, n - k)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected))


def test_training_from_s3_matches_training_from_the_local_copy(s3_env, local, tmp_path):
    from memtrain.engine.trainer import train

    run = ("train.steps=3", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=3")
    train(tiny_config(local, tmp_path / "local_run", *run))
    train(tiny_config(URL, tmp_path / "s3_run", *run, f"data.cache_dir={tmp_path / 'cache'}"))  # type: ignore[arg-type]
    a, b = records(tmp_path / "s3_run"), records(tmp_path / "local_run")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert [a[s]["loss/total"] for s in (1, 2, 3)] == [b[s]["loss/total"] for s in (1, 2, 3)]


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from memtrain.data.loader import make_loader
    url, cache, out = sys.argv[1:4]
    with make_loader(url, "train", batch_size=4, shuffle=True, seed=3, cache_dir=cache) as loader:
        it = iter(loader)
        rows = [r.tolist() for _ in range(len(loader)) for r in next(it)]
        it.close()
    json.dump({"rows": rows}, open(out, "w"))
""")


def _ranks(script: str, args: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    """Two ranks of one node, as separate processes (streaming joins them in a gloo process group)."""
    from memtrain.engine.distributed import free_port

    procs, port = [], str(free_port())
    for rank in range(2):
        penv = rank_env(rank, 2, port, **env)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *[a.replace("{rank}", str(rank)) for a in args]],
                env=penv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_of_a_node_share_one_cache_and_download_each_shard_once(s3, local, tmp_path):
    cache = tmp_path / "node_cache"
    for attempt in range(2):  # once more if the start lost streaming's shared-memory race with another job
        s3.gets.clear()
        procs = _ranks(RANK_SCRIPT, [URL, str(cache), str(tmp_path / "rank{rank}.json")], _s3_env(s3.endpoint))
        outs = [p.communicate(timeout=180)[0] for p in procs]
        if all(p.returncode == 0 for p in procs):
            break
        raced = any(SHM_RACE in o or SHM_RACE_LEADER in o for o in outs)
        assert raced and attempt == 0, "\n".join(o[-2000:] for o in outs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text())["rows"] for r in range(2))
    assert len(r0) == len(r1) > 0
    with make_loader(local, "train", 1, False, 0) as loader:
        every = Counter(tuple(r) for r in torch.cat(list(loader.epoch())).tolist())
    both = Counter(tuple(r) for r in r0) + Counter(tuple(r) for r in r1)
    assert not both - every  # each rank its own part: no stored row served twice
    assert sum(both.values()) >= sum(every.values()) - 2 * 4
    # one node cache: every shard downloaded exactly once, for both ranks
    for name in _shard_files(local):
        if name.endswith(".zstd"):
            assert s3.gets[f"/{BUCKET}/{PREFIX}/train/{name}"] == 1, (name, dict(s3.gets))
    cached = {_in_split(p) for p in cache.rglob("shard.*")}
    assert cached >= {n.removesuffix(".zstd") for n in _shard_files(local) if n.endswith(".zstd")}


def _in_split(path: Path, split: str = "train") -> str:
    """``path``'s name within its split directory (as the index names shard files)."""
    parts = path.parts
    return "/".join(parts[len(parts) - 1 - parts[::-1].index(split) + 1 :])


def _check_cache(cache: Path, sizes: dict[str, int]) -> None:
    """No temporary file left, and every file named like a shard has the size the index records for it."""
    leftovers = [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert not leftovers, leftovers
    for p in cache.rglob("shard.*"):
        assert _in_split(p) in sizes and p.stat().st_size == sizes[_in_split(p)], (p, sizes.get(_in_split(p)))


def test_server_back_before_the_retry_is_transparent(s3_env, local, tmp_path, monkeypatch):
    from memtrain.data import checked_stream

    monkeypatch.setattr(checked_stream, "BACKOFF_S", 2.0)  # the server is back (in under 1 s) before the retry
    names = sorted(n for n in _shard_files(local) if n.endswith(".zstd"))
    s3_env.gets.clear()
    s3_env.cut(names[1], stop=True, restart=True)  # the server stops halfway through the second shard
    with make_loader(local, "train", BATCH, False, 0) as loader:
        expected = list(loader.epoch())
    with make_loader(URL, "train", BATCH, False, 0, cache_dir=tmp_path / "cache") as loader:
        got = list(loader.epoch())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert s3_env.gets[f"/{BUCKET}/{PREFIX}/train/{names[1]}"] >= 2
    _check_cache(tmp_path / "cache", _shard_files(local))


@pytest.mark.faults
def test_server_stopping_mid_download_fails_with_one_line_and_a_clean_cache(s3_env, local, tmp_path, monkeypatch):
    from memtrain.data import checked_stream

    monkeypatch.setattr(checked_stream, "BACKOFF_S", 0.1)  # shorter pauses between the attempts
    names = sorted(n for n in _shard_files(local) if n.endswith(".zstd"))
    with make_loader(local, "train", BATCH, False, 0) as loader:
        expected = list(loader.epoch())
    cache = tmp_path / "cache"
    url = f"{URL}/train/{names[2]}"
    s3_env.gets.clear()
    s3_env.cut(names[2], stop=True)  # halfway through the third shard the server goes away
    got = []
    try:
        with make_loader(URL, "train", BATCH, False, 0, cache_dir=cache, download_retry=2) as loader:
            with pytest.raises(UserError) as err:
                for batch in loader.epoch():
                    got.append(batch)
    finally:
        s3_env.stop()
        s3_env.start()  # the same port and the same objects: the server is back
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{url}: download failed 3 time(s)"), message
    assert got and all(torch.equal(a, b) for a, b in zip(got, expected))  # what came before the failure was right
    sizes = _shard_files(local)
    _check_cache(cache, sizes)
    assert not [p for p in cache.rglob("shard.*") if _in_split(p) in (names[2], names[2].removesuffix(".zstd"))]
    # a later run with the server back reads the whole epoch, the same batches
    with make_loader(URL, "train", BATCH, False, 0, cache_dir=cache) as loader:
        again = list(loader.epoch())
    assert len(again) == len(expected) and all(torch.equal(a, b) for a, b in zip(again, expected))
    _check_cache(cache, sizes)


@pytest.mark.faults
def test_worker_process_download_failure_is_one_line_too(s3_env, local, tmp_path):
    import multiprocessing as mp

    names = sorted(n for n in _shard_files(local) if n.endswith(".zstd"))
    s3_env.cut(names[1], stop=True)
    before = set(mp.active_children())
    try:
        with make_loader(
            URL, "train", BATCH, False, 0, cache_dir=tmp_path / "c", num_workers=1, download_retry=0
        ) as loader:
            with pytest.raises(UserError) as err:
                list(loader.epoch())
            # the worker is gone although the error (and its traceback) is still held: it ignores SIGTERM, so a
            # worker left running would keep the interpreter from exiting
            assert not set(mp.active_children()) - before
    finally:
        s3_env.stop()
        s3_env.start()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{URL}/train/{names[1]}: download failed 1 time(s)"), message
    _check_cache(tmp_path / "c", _shard_files(local))


@pytest.mark.faults
def test_a_damaged_object_fails_with_one_line_and_is_not_kept(s3_env, local, shards, tmp_path):
    import boto3

    names = sorted(n for n in _shard_files(local) if n.endswith(".zstd"))
    client = boto3.client("s3", endpoint_url=s3_env.endpoint)
    for path in sorted(shards.rglob("*")):
        if path.is_file():
            key = f"damaged/{path.relative_to(shards).as_posix()}"
            damaged = path.relative_to(shards).as_posix() == f"train/{names[1]}"
            # the right size, so only decompressing it shows the damage
            body = os.urandom(path.stat().st_size) if damaged else path.read_bytes()
            client.put_object(Bucket=BUCKET, Key=key, Body=body)
    url = f"s3://{BUCKET}/damaged"
    with make_loader(url, "train", BATCH, False, 0, cache_dir=tmp_path / "c") as loader:
        with pytest.raises(UserError) as err:
            list(loader.epoch())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{url}/train/{names[1]}: cannot prepare this shard ("), message
    assert not [p for p in (tmp_path / "c").rglob("shard.*") if _in_split(p).startswith(names[1].removesuffix(".zstd"))]
