"""`memtrain data shards` spread over processes as a cluster would run it: slurm/shards_array.sbatch executed as
the tasks of a job array, and `memtrain data bench`."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memtrain.cli import main
from memtrain.data import demo_corpus_path
from memtrain.data.ingest import build_shards

ROOT = Path(__file__).resolve().parents[1]


def small_corpus(path: Path, n_docs: int = 300) -> Path:
    """The first ``n_docs`` demo documents as parquet, in row groups of 50."""
    table = pq.read_table(demo_corpus_path(), columns=["id", "text"]).slice(0, n_docs)
    pq.write_table(pa.Table.from_pylist(table.to_pylist()), path, row_group_size=50)
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def array_case(tmp_path: Path, tokenizer: Path) -> tuple[Path, dict]:
    """A corpus of 300 demo documents, its one-process build in ``tmp_path/single`` (rows of 32, units of
    300 kB), and the environment slurm/shards_array.sbatch needs to build the same into ``tmp_path/sliced``:
    returns (the sliced output directory, that environment)."""
    corpus = small_corpus(tmp_path / "corpus.parquet")
    single = build_shards(
        [str(corpus)],
        tokenizer,
        tmp_path / "single",
        32,
        val_fraction=0.05,
        workers=1,
        unit_size="300kb",
        progress=False,
    )
    assert single["units"] >= 4
    out = tmp_path / "sliced"
    env = dict(
        os.environ,
        MEMTRAIN_INPUT=str(corpus),
        MEMTRAIN_TOKENIZER=str(tokenizer),
        MEMTRAIN_OUT=str(out),
        MEMTRAIN_ROW_LEN="32",
        MEMTRAIN_SHARDS_ARGS="--val-fraction 0.05 --unit-size 300kb",
        MEMTRAIN_PYTHON=sys.executable,
        MEMTRAIN_WORKDIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    return out, env


@pytest.mark.slurm
def test_shards_array_script_tasks_build_what_one_process_builds(tiny_data, tmp_path):
    out, env = array_case(tmp_path, tiny_data.tokenizer)
    logs = []
    for task in (12, 10, 11):  # an array --array=10-12, tasks finishing in any order
        env.update(
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_ARRAY_TASK_MIN="10",
            SLURM_ARRAY_TASK_COUNT="3",
            SLURM_CPUS_PER_TASK="2",
            SLURM_ARRAY_JOB_ID="77",
        )
        res = subprocess.run(
            ["bash", str(ROOT / "slurm" / "shards_array.sbatch")], env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        logs.append(res.stdout)
    assert "memtrain: shards slice 2 of 3 (array job 77" in logs[0]
    assert "slice 2/3: wrote" in logs[0] and "unit(s) of the build still to write" in logs[0]
    assert f"{out}: rows of 32 tokens" in logs[2]  # the last task merged and published
    assert tree(out) == tree(tmp_path / "single")


def test_data_bench_prints_both_rates_and_their_ratio(tiny_data, tmp_path, capsys):
    corpus = small_corpus(tmp_path / "corpus.parquet", 120)
    code = main(
        [
            "data",
            "bench",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tiny_data.tokenizer),
            "--row-len",
            "64",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| raw SentencePiece encode (text in memory) |" in out and "| memtrain data shards (read, tokenize" in out
    ratio = float(out.strip().splitlines()[-1].split(":")[1])
    assert 0 < ratio < 10
    assert (
        main(["data", "bench", "--input", str(corpus), "--tokenizer", str(tiny_data.tokenizer), "--workers", "0"]) == 2
    )


@pytest.mark.slow
def test_fineweb_script_makes_every_shard_set_the_paper_configs_read(tiny_data, tmp_path, tmp_path_factory):
    """tools/fineweb.sh on a slice of the bundled corpus (instead of the download): every data.shards of
    yaml/paper/ exists afterwards, with rows that fit the config's chunks."""
    import json

    from helpers import tiny_llm

    from memtrain.config import read_yaml

    corpus = small_corpus(tmp_path / "corpus.parquet", 400)
    env = dict(
        os.environ,
        MEMTRAIN_CORPUS=str(corpus),
        MEMTRAIN_VOCAB="400",
        MEMTRAIN_WORKERS="2",
        MEMTRAIN_LLM=str(tiny_llm(tmp_path_factory)),
        MEMTRAIN_PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
    )
    res = subprocess.run(
        ["bash", str(ROOT / "tools" / "fineweb.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    checked = 0
    for path in sorted((ROOT / "yaml" / "paper").glob("*.yaml")):
        raw = read_yaml(path)
        shards = raw.get("data", {}).get("shards")
        if not shards:
            continue
        info = json.loads((tmp_path / shards / "memtrain_shards.json").read_text())
        model = raw["model"]
        hf = model.get("hf_decoder")
        if hf:
            dual = info["dual"]
            assert (dual["chunk_len"], dual["n_chunks"]) == (model["chunk_len"], model["n_chunks"]), path.name
            assert dual["decoder_chunk_len"] == hf["chunk_len"], path.name
        else:
            assert info["row_len"] == model["chunk_len"] * model["n_chunks"], path.name
        checked += 1
    assert checked >= 10
    # run again: every step is found done
    again = subprocess.run(
        ["bash", str(ROOT / "tools" / "fineweb.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and again.stdout.count("done before") == 4, again.stdout
