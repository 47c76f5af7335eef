"""Untrusted shard directories and caches: crafted index.json names and encodings, shared cache folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import tiny_raw, write_yaml

from memtrain.data import loader as loader_mod
from memtrain.data.loader import make_loader, read_shard_info
from memtrain.errors import UserError

pytestmark = pytest.mark.security


def _copy_shards(tiny_data, dst: Path) -> Path:
    shutil.copytree(tiny_data.shards, dst, ignore=shutil.ignore_patterns("*.mds"))  # zstd only, as built
    return dst


def _edit_index(shards: Path, split: str, edit) -> Path:
    path = shards / split / "index.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return path


def _everything_under(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@pytest.mark.parametrize("field", ["raw_data", "zip_data"])
def test_traversal_shard_name_refused_local(tiny_data, tmp_path, field):
    box = tmp_path / "a" / "b"
    shards = _copy_shards(tiny_data, box / "shards")
    victim = tmp_path / "a" / "victim.txt"
    victim.write_text("keep me")

    def edit(obj):
        obj["shards"][0][field]["basename"] = "../../../evil.pth" if field == "raw_data" else "../../../victim.txt"

    _edit_index(shards, "val", edit)
    before = _everything_under(tmp_path)
    with pytest.raises(UserError) as err:
        make_loader(shards, "val", 2, False, 0, max_batches=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{shards}/val/index.json: shards[0].{field}.basename '../../../" in msg and "not a plain file name" in msg
    assert _everything_under(tmp_path) == before
    assert victim.read_text() == "keep me"


def test_traversal_shard_name_refused_remote_before_streaming_uses_it(tiny_data, tmp_path):
    shards = _copy_shards(tiny_data, tmp_path / "remote" / "shards")
    _edit_index(shards, "val", lambda o: o["shards"][0]["raw_data"].__setitem__("basename", "../../../evil.pth"))
    cache = tmp_path / "cache"
    with pytest.raises(
        UserError,
        match=r"val/index\.json: shards\[0\]\.raw_data\.basename '\.\./\.\./\.\./evil"
        r"\.pth' is not a plain file name",
    ):
        make_loader(f"file://{shards}", "val", 2, False, 0, cache_dir=cache, max_batches=1)
    assert not list(tmp_path.rglob("evil.pth"))
    assert not list(cache.rglob("*.tmp"))


def test_pickle_column_refused(tiny_data, tmp_path):
    shards = _copy_shards(tiny_data, tmp_path / "shards")
    _edit_index(shards, "val", lambda o: o["shards"][0].__setitem__("column_encodings", ["pkl"]))
    with pytest.raises(
        UserError,
        match=r"shards\[0\]\.column_encodings\[0\] 'pkl' is not an encoding memtrain "
        r"writes",
    ):
        make_loader(shards, "val", 2, False, 0, max_batches=1)


def test_precompute_token_reader_refuses_crafted_index(tiny_data, tmp_path):
    from memtrain.precompute.job import _token_index

    shards = _copy_shards(tiny_data, tmp_path / "shards")
    _edit_index(shards, "train", lambda o: o["shards"][0]["zip_data"].__setitem__("basename", "/etc/passwd"))
    with pytest.raises(UserError, match=r"train/index\.json: shards\[0\]\.zip_data\.basename '/etc/passwd'"):
        _token_index(shards, "train")
    _edit_index(shards, "train", lambda o: o["shards"][0]["zip_data"].__setitem__("basename", "shard.00000.mds.zstd"))
    _edit_index(shards, "train", lambda o: o["shards"][0].__setitem__("column_encodings", ["pkl"]))
    with pytest.raises(UserError, match=r"column_encodings\[0\] 'pkl'"):
        _token_index(shards, "train")


def test_memory_shards_refuse_pickle_columns(tmp_path):
    """A memory-shard index with a pkl column (code runs on read) is refused before any reader exists."""
    from memtrain.data.memories import MemoryShards
    from memtrain.data.streaming_compat import import_streaming
    from memtrain.data.tokenizer import file_sha256

    streaming = import_streaming()
    unit = tmp_path / "mem" / "train" / "unit_00000"
    with streaming.MDSWriter(out=str(unit), columns={"idx": "int", "mem": "pkl"}, compression=None) as w:
        w.write({"idx": 0, "mem": {"a": 1}})
    index = json.loads((unit / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = "unit_00000/" + index["shards"][0]["raw_data"]["basename"]
    split_index = tmp_path / "mem" / "train" / "index.json"
    split_index.write_text(json.dumps(index))
    shard_file = unit / "shard.00000.mds"
    manifest = {
        "splits": {
            "train": {
                "index_sha256": file_sha256(split_index),
                "units": [
                    {
                        "unit": "unit_00000",
                        "shard": "shard.00000.mds",
                        "samples": 1,
                        "first_sample": 0,
                        "bytes": shard_file.stat().st_size,
                    }
                ],
            }
        },
        "n_chunks": 4,
        "dtype": "bf16",
        "tasks": {},
    }
    with pytest.raises(UserError, match=r"train/index\.json: shards\[0\]\.column_encodings\[1\] 'pkl'"):
        MemoryShards(tmp_path / "mem", "train", manifest)


@pytest.mark.parametrize(
    "name,ok",
    [
        ("shard.00000.mds", True),
        ("shard-7.v2.mds", True),
        ("../x", False),
        ("..", False),
        (".", False),
        ("/abs/x", False),
        ("unit_00000/shard.00000.mds", True),
        ("a/b/c", False),
        ("a//b", False),
        ("a\\b", False),
        ("a\x00b", False),
        ("a\nb", False),
        ("x" * 201, False),
        ("", False),
        ("c:x", False),
    ],
)
def test_validator_names(tiny_data, name, ok):
    from memtrain.data.index_check import validate_index

    obj = json.loads((tiny_data.shards / "train" / "index.json").read_text())
    obj["shards"][0]["raw_data"]["basename"] = name
    if ok:
        validate_index(obj, "i.json")
    else:
        with pytest.raises(UserError, match=r"^i\.json: shards\[0\]\.raw_data\.basename .* is not a plain file name$"):
            validate_index(obj, "i.json")


def test_validator_fields(tiny_data):
    from memtrain.data.index_check import validate_index

    good = json.loads((tiny_data.shards / "train" / "index.json").read_text())
    validate_index(good, "i.json")
    cases = [
        (lambda s: s.__setitem__("format", "json"), "format 'json', expected 'mds'"),
        (lambda s: s.__setitem__("compression", "lzma"), "compression 'lzma'"),
        (lambda s: s.__setitem__("column_encodings", ["str"]), "'str' is not an encoding"),
        (lambda s: s.__setitem__("column_encodings", ["ndarray:object:32"]), "'ndarray:object:32'"),
        (lambda s: s.__setitem__("column_encodings", ["json"]), "'json'"),
        (lambda s: s.__setitem__("samples", -1), "samples"),
        (lambda s: s["raw_data"].__setitem__("bytes", "1"), "raw_data.bytes"),
        (lambda s: s.__setitem__("exec", 1), "unexpected field 'exec'"),
    ]
    for edit, want in cases:
        obj = json.loads(json.dumps(good))
        edit(obj["shards"][0])
        with pytest.raises(UserError, match=f"^i\\.json: shards\\[0\\][ .].*{__import__('re').escape(want)}"):
            validate_index(obj, "i.json")
    # unit shard names: at most one <unit>/ level (max_depth=1: plain names only)
    obj = json.loads(json.dumps(good))
    obj["shards"][0]["raw_data"]["basename"] = "unit_00000/shard.00000.mds"
    validate_index(obj, "i.json")
    with pytest.raises(UserError):
        validate_index(obj, "i.json", max_depth=1)
    obj["shards"][0]["raw_data"]["basename"] = "unit_00000/../../x"
    with pytest.raises(UserError):
        validate_index(obj, "i.json", max_depth=2)


def test_cli_train_on_crafted_shards_exits_2(tiny_data, tmp_path):
    shards = _copy_shards(tiny_data, tmp_path / "shards")
    _edit_index(shards, "train", lambda o: o["shards"][0]["raw_data"].__setitem__("basename", "../../x.pth"))
    cfg = write_yaml(tmp_path / "run.yaml", tiny_raw(shards, tmp_path / "run", ["train.steps=2"]))
    res = subprocess.run(
        [sys.executable, "-m", "memtrain", "train", str(cfg)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "train/index.json: shards[0].raw_data.basename '../../x.pth' is not a plain file name" in res.stderr
    assert not (tmp_path / "x.pth").exists()


# ----------------------------------------------------------------------------------------------------
# R6: the remote-shard cache is private


def test_default_cache_is_private_per_user(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = loader_mod._private_cache_root(None)
    assert root == tmp_path / f"memtrain-{os.getuid()}" / "shard-cache"
    for d in (root, root.parent):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


def test_cache_root_symlink_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / f"memtrain-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="is a symbolic link"):
        loader_mod._private_cache_root(None)
    (tmp_path / "mine").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"data\.cache_dir .*mine: is a symbolic link"):
        read_shard_info("file:///nonexistent/shards", tmp_path / "mine")


def test_cache_root_group_writable_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = tmp_path / f"memtrain-{os.getuid()}"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(UserError, match="writable by group or others"):
        loader_mod._private_cache_root(None)
    d.chmod(0o775)
    with pytest.raises(UserError, match="writable by group or others"):
        loader_mod._private_cache_root(None)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a folder owned by another user needs root")
def test_cache_root_owned_by_another_user_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = tmp_path / f"memtrain-{os.getuid()}"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    with pytest.raises(UserError, match="owned by another user"):
        loader_mod._private_cache_root(None)


def test_remote_read_uses_private_default_cache(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    info = read_shard_info(f"file://{tiny_data.shards}")
    assert str(info.local_dir).startswith(str(tmp_path / f"memtrain-{os.getuid()}" / "shard-cache"))
    assert ((tmp_path / f"memtrain-{os.getuid()}").stat().st_mode & 0o077) == 0
