"""Plain functions and constants the test modules share (fixtures built on them live in ``conftest.py``).

- tiny run configs cut from ``yaml/tiny.yaml`` and what runs write (metrics, checkpoint weights);
- two-rank runs under torchrun or the DeepSpeed launcher, killed and resumed;
- tiny Hugging Face decoders, a memtrain tokenizer and dual shards, cached per test session;
- fake Slurm tools (``srun``, ``scontrol``, ``sbatch``, a recording ``python``) for rendered batch scripts.

Importing this module starts nothing and imports nothing optional (memtrain modules are imported where they are
used). Test modules import from here, never from each other or from ``conftest``; ``conftest.py`` registers this
module for pytest's assertion rewriting, so its ``assert`` statements report like a test's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from memtrain.launch.node import descendants

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "yaml" / "tiny.yaml"
ROW_LEN = 32  # yaml/tiny.yaml: chunk_len 8 x n_chunks 4


# ----------------------------------------------------------------------------------------------------
# tiny run configs and what runs write


@dataclass(frozen=True)
class ShardSet:
    """A tokenizer and the shard directory made with it (rows of ROW_LEN tokens, train and val splits)."""

    corpus: Path
    tokenizer: Path
    shards: Path


def build_shard_set(root: Path, offset: int, n_docs: int, vocab_size: int) -> ShardSet:
    """Tokenizer (``vocab_size``) + shards of demo documents ``offset .. offset + n_docs`` under ``root``."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path
    from memtrain.data.ingest import build_shards
    from memtrain.data.tokenizer import train_tokenizer

    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).slice(offset, n_docs)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps({"id": row["id"], "text": row["text"][:2500]}) + "\n")
    tok = train_tokenizer([str(corpus)], root / "tok", vocab_size=vocab_size, threads=1)
    build_shards([str(corpus)], tok, root / "shards", row_len=ROW_LEN, val_fraction=0.05, workers=1, progress=False)
    return ShardSet(corpus=corpus, tokenizer=tok, shards=root / "shards")


def tiny_raw(shards: Path, out_dir: Path, overrides: list[str] = ()) -> dict:
    """yaml/tiny.yaml as a dict pointed at ``shards`` and ``out_dir``: fp32, one thread, no progress bar,
    then ``overrides`` (``a.b=value`` strings, as for ``--set``)."""
    from memtrain.config import apply_overrides, read_yaml

    raw = read_yaml(TINY_YAML)
    base = [
        f"data.shards={shards}",
        f"run.out_dir={out_dir}",
        "train.precision=fp32",
        "train.progress=false",
        "train.threads=1",
        "train.device=cpu",
    ]
    return apply_overrides(raw, base + list(overrides))


def tiny_config(shards: Path, out_dir: Path, *overrides: str):
    """A validated tiny :class:`memtrain.config.Config` (see :func:`tiny_raw`)."""
    from memtrain.config import config_from_dict

    return config_from_dict(tiny_raw(shards, out_dir, overrides), source="tiny test config")


def records(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """A run's metrics.jsonl records of one kind by step (a later record of a step replaces an earlier one)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of a run's checkpoint at ``step``."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


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


# ----------------------------------------------------------------------------------------------------
# two-rank runs (DeepSpeed engine, pipeline stages): 2 ranks of BATCH rows against one process of 2 x BATCH

STEPS = 6
BATCH = 4  # rows per rank; the single-process reference trains 2 x BATCH rows per step
CURRICULUM = (
    "curriculum=[{name: joint, steps: 3, weights: {causal: 1.0, copy: 0.5}}, "
    "{name: decoder, steps: 3, weights: {causal: 1.0}, freeze: [encoder]}]"
)
RUN = (f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=3", "train.keep_ckpts=5")
KILL_STEPS = 30
KILL_RUN = (
    f"train.steps={KILL_STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=5",
    "train.keep_ckpts=10",
)


def torchrun_cmd(config: Path, *extra: str) -> list[str]:
    """2 ranks of ``memtrain train CONFIG`` under torchrun (the DeepSpeed launcher's runs are in
    tests/test_multinode.py)."""
    from memtrain.engine.distributed import free_port

    torchrun = Path(sys.executable).with_name("torchrun")
    return [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "memtrain",
        "train",
        str(config),
        *extra,
    ]


def run_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


#: mosaicml-streaming picks shared-memory names by probing; two jobs on one machine can pick the same name at
#: once, and the later one fails with this before it reads anything (seen when other test suites run beside):
#: the name is taken, or a rank finds its node's first rank registered under a name another job now holds
SHM_RACE = "FileExistsError: [Errno 17] File exists: '/0"
SHM_RACE_LEADER = "shared memory registered does not match local leader"


def torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m memtrain train CONFIG``; asserts success
    (one retry if the start lost streaming's shared-memory race with another job, before anything is written)."""
    cmd = torchrun_cmd(config, *extra)
    done = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    if done.returncode and (SHM_RACE in done.stderr or SHM_RACE_LEADER in done.stderr):
        done = subprocess.run(torchrun_cmd(config, *extra), env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, "\n".join(ln for ln in done.stderr.splitlines() if "rank0]" in ln)[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def launch_and_kill(config: Path, run_dir: Path) -> int:
    """Start a 2-rank run and SIGKILL torchrun and every rank once its first checkpoint exists; returns the
    step of the newest complete checkpoint left behind."""
    from memtrain.engine import checkpoint as ckpt

    proc = subprocess.Popen(
        torchrun_cmd(config), env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while not ckpt.list_checkpoints(run_dir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        for pid in descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    return ckpt.latest_checkpoint(run_dir).step


def check_kill_and_resume(config: Path, run_dir: Path, reference: Path, resumed_from_text: str = "") -> int:
    """Kill a run after its first checkpoint, resume it, and check: each step logged once, the resumed steps
    repeat exactly what the killed process computed, and every step equals the single-process reference."""
    killed_at = launch_and_kill(config, run_dir)
    assert killed_at < KILL_STEPS and not (run_dir / "summary.json").exists()
    before = records(run_dir)
    done = torchrun(config, "--resume")
    assert f"at step {killed_at};" in done.stdout
    after = records(run_dir)
    assert sorted(after) == list(range(1, KILL_STEPS + 1))
    overlap = [s for s in before if s > killed_at]
    for s in overlap:
        assert after[s]["loss/total"] == pytest.approx(before[s]["loss/total"], rel=0, abs=1e-6), s
    ref = records(reference)
    for s in range(1, KILL_STEPS + 1):
        assert after[s]["loss/total"] == pytest.approx(ref[s]["loss/total"], rel=0, abs=2e-5), s
    assert_close_weights(weights(run_dir, KILL_STEPS), weights(reference, KILL_STEPS), atol=2e-4)
    return killed_at


def assert_close_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    """Same names; same values except the mixers' per-position biases (a LayerNorm follows them, so their
    gradient is rounding noise that Adam turns into +-lr steps depending on the reduction order)."""
    assert sorted(a) == sorted(b)
    compared = [k for k in a if not k.endswith("conv.bias")]
    assert len(compared) > 20
    for k in compared:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def same_losses(run: Path, reference: Path, steps: int, atol: float = 1e-5) -> None:
    ra, rb = records(run), records(reference)
    assert sorted(ra) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        for key in ("loss/total", "loss/causal", "accuracy/causal"):
            if key in rb[s]:
                assert ra[s][key] == pytest.approx(rb[s][key], rel=0, abs=atol), (s, key)


# ----------------------------------------------------------------------------------------------------
# tiny Hugging Face decoders, a memtrain tokenizer, dual shards and short runs, built once per test session
# under pytest's base temp directory; nothing here downloads anything

N_DOCS, MAX_CHARS = 40, 1200
C, L, L_DEC = 4, 16, 12


def _hf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "hf-shared"
    root.mkdir(exist_ok=True)
    return root


def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    """corpus.jsonl of the first N_DOCS demo documents (cut to MAX_CHARS) and its records."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path

    path = _hf_root(tmp_path_factory) / "corpus.jsonl"
    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).slice(0, N_DOCS)
    records = [{"id": r["id"], "text": r["text"][:MAX_CHARS]} for r in table.to_pylist()]
    if not path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def encoder_tokenizer(tmp_path_factory) -> Path:
    """A memtrain SentencePiece tokenizer (vocab 420) trained on the corpus."""
    from memtrain.data.tokenizer import TOKENIZER_FILE, train_tokenizer

    out = _hf_root(tmp_path_factory) / "enc_tok"
    if not (out / TOKENIZER_FILE).is_file():
        train_tokenizer([str(corpus(tmp_path_factory)[0])], out, vocab_size=420, threads=1)
    return out / TOKENIZER_FILE


def tiny_llm(tmp_path_factory, family: str = "llama") -> Path:
    """A randomly initialised tiny ``family`` causal LM with its own BPE tokenizer (vocab 320)."""
    from memtrain.models.hf_tiny import make_tiny_llm

    out = _hf_root(tmp_path_factory) / f"llm-{family}"
    if not (out / "config.json").is_file():
        make_tiny_llm(out, family, [r["text"] for r in corpus(tmp_path_factory)[1]], vocab_size=320)
    return out


def dual_shards(tmp_path_factory, family: str = "llama") -> Path:
    """Dual shards (C=4 chunks of L=16 encoder / L_DEC=12 decoder tokens) of the corpus."""
    from memtrain.data.dual import build_dual_shards

    out = _hf_root(tmp_path_factory) / f"shards-{family}"
    if not (out / "memtrain_shards.json").is_file():
        build_dual_shards(
            [str(corpus(tmp_path_factory)[0])],
            encoder_tokenizer(tmp_path_factory),
            tiny_llm(tmp_path_factory, family),
            out,
            chunk_len=L,
            n_chunks=C,
            decoder_chunk_len=L_DEC,
            val_fraction=0.1,
            progress=False,
        )
    return out


def shm_retry(fn, *args, attempts: int = 3, **kwargs):
    """``fn(*args, **kwargs)``, again (up to ``attempts`` times) when it lost mosaicml-streaming's shared-memory
    naming race with another job on the machine (``FileExistsError: '/NNNNNN_locals'``: raised when a loader
    opens, before a run writes anything, so a retry starts from the same state)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except FileExistsError as exc:
            if "_locals" not in str(exc) or attempt == attempts - 1:
                raise


_ROWS: dict[tuple, torch.Tensor] = {}


def first_rows(tmp_path_factory, family: str = "llama", n: int = 2, split: str = "train") -> torch.Tensor:
    """The first ``n`` dual rows of the family's shards (unshuffled), loaded once per test session (the loader
    is closed right away: its shared memory and file descriptors are not kept for the rest of the run)."""
    from memtrain.data.loader import make_loader

    key = (family, n, split)
    if key not in _ROWS:
        shards = dual_shards(tmp_path_factory, family)
        with shm_retry(make_loader, shards, split, batch_size=n, shuffle=False, seed=0, max_batches=1) as loader:
            _ROWS[key] = next(iter(loader)).clone()
    return _ROWS[key]


def hf_config(shards: Path, llm: Path, out_dir: Path, mode: str = "full", steps: int = 3, **model_extra):
    """A tiny HF-decoder run config: transformer encoder d 32, copy + causal, fp32, one thread."""
    from memtrain.config import config_from_dict

    model = {
        "kind": "memory",
        "chunk_len": L,
        "n_chunks": C,
        "encoder": {"arch": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2},
        "hf_decoder": {"path": str(llm), "chunk_len": L_DEC, "mode": mode, "lora": {"r": 4}},
    }
    for key, value in model_extra.items():
        if key == "hf_decoder":
            model["hf_decoder"].update(value)
        else:
            model[key] = value
    raw = {
        "run": {"name": f"hf-{mode}", "out_dir": str(out_dir), "seed": 0},
        "model": model,
        "objective": {"weights": {"causal": 1.0, "copy": 0.5}},
        "data": {"shards": str(shards), "batch_size": 2},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "train": {
            "steps": steps,
            "precision": "fp32",
            "device": "cpu",
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
            "ckpt_every": 0,
            "progress": False,
            "threads": 1,
        },
    }
    return config_from_dict(raw, source="hf test config")


def trained_run(tmp_path_factory, name: str = "lora", mode: str = "lora", steps: int = 4) -> Path:
    """A short HF-decoder training run (tiny Llama), shared by the inference and capability tests."""
    from memtrain.engine.trainer import train

    out = _hf_root(tmp_path_factory) / f"run-{name}"
    if not (out / "summary.json").is_file():
        shm_retry(
            train, hf_config(dual_shards(tmp_path_factory), tiny_llm(tmp_path_factory), out, mode=mode, steps=steps)
        )
    return out


# ----------------------------------------------------------------------------------------------------
# fake Slurm tools: rendered batch scripts run under bash with fake srun / scontrol / sbatch on PATH

PY = sys.executable


def fake_bin(tmp_path: Path, python: str | None = None) -> Path:
    """Fake srun (records argv, runs the command as one task in a new session, records its pid), scontrol
    (hostnames, requeue recorded) and, when ``python`` is given, a fake python that records its argv."""
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    (b / "srun").write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        printf '%s\\0' "$@" > "$FAKE_LOG/srun.argv"
        while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
        {PY} -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" &
        echo $! > "$FAKE_LOG/task.pid"
        wait $!
        """)
    )
    (b / "scontrol").write_text(
        textwrap.dedent("""\
        #!/bin/bash
        if [ "$1" = show ]; then echo 127.0.0.1; exit 0; fi
        echo "$@" >> "$FAKE_LOG/scontrol.log"
        """)
    )
    (b / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$FAKE_LOG/sbatch.log"\necho 1\n')
    for f in b.iterdir():
        f.chmod(0o755)
    if python:
        (b / "fakepython").write_text(python)
        (b / "fakepython").chmod(0o755)
    return b


#: a stand-in for the ranks: records its argv; FAKE_MODE=fail exits 1 before training, FAKE_MODE=preempt
#: writes this attempt's PREEMPTED marker as a preempted rank 0 does and exits 75
FAKE_PYTHON = textwrap.dedent(f"""\
    #!/bin/bash
    printf '%s\\0' "$@" > "$FAKE_LOG/python.argv"
    if [ "$2" = memtrain ] && [ "$3" = config-get ]; then echo "$FAKE_RUN_DIR"; exit 0; fi
    case "${{FAKE_MODE:-ok}}" in
      fail) exit 1 ;;
      preempt) {PY} -c 'import sys; from memtrain.engine.preempt import write_marker; write_marker(sys.argv[1], 7, "SIGUSR1")' "$MEMTRAIN_RUN_DIR"; exit 75 ;;
      stray) MEMTRAIN_ATTEMPT=4242.0 {PY} -c 'import sys; from memtrain.engine.preempt import write_marker; write_marker(sys.argv[1], 7, "SIGUSR1")' "$MEMTRAIN_RUN_DIR"; exit 1 ;;
    esac
    exit 0
    """)


def render_job(tmp_path: Path, argv: list[str]) -> Path:
    """``memtrain submit ... --dry-run`` into ``tmp_path``; returns the job script."""
    from memtrain.cli import main

    assert main(["submit", *argv, "--dry-run", "--workdir", str(tmp_path)]) == 0
    (job,) = list((tmp_path / "slurm-jobs").iterdir())
    return job / "job.sbatch"


def use_python(script: Path, python: Path) -> None:
    """Point the rendered script at ``python`` instead of this interpreter."""
    text = script.read_text()
    script.write_text(re.sub(r"(?m)^export MEMTRAIN_PYTHON=.*$", f"export MEMTRAIN_PYTHON={python}", text))


def job_env(tmp_path: Path, bin_dir: Path, **extra) -> dict:
    log = tmp_path / "fakelog"
    log.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_LOG=str(log),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_RESTART_COUNT="0",
        PYTHONPATH=str(REPO),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(script: Path, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def tiny_cfg(tmp_path: Path, run_dir: Path, *overrides: str) -> Path:
    raw = tiny_raw(Path("unused"), run_dir, ["train.steps=100"] + list(overrides))
    return write_yaml(tmp_path / "cfg.yaml", raw)


def rank_env(rank: int, world: int = 2, port: str | int | None = None, **extra: str) -> dict[str, str]:
    """The environment of rank ``rank`` of a one-node job of ``world`` processes (torchrun's variables,
    MASTER_ADDR on this machine, one thread), on top of this process's, plus ``extra``."""
    env = dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        **extra,
    )
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env
