"""Shared fixtures, and the process state every test starts from.

Data: small tokenizer + shard pairs cut from the bundled demo corpus, built once per test session.
``tiny_data`` matches ``yaml/tiny.yaml`` (rows of 4 x 8 = 32 tokens); ``other_data`` is made from a different
slice of the corpus with another vocabulary (so another tokenizer, same row length) for mismatch tests.
Plain functions and constants (tiny configs, two-rank launches, fake Slurm tools, ...) are in ``helpers.py``.

The whole suite runs in one pytest process, so a test must not leave state behind for the next one: the
autouse fixture below restores what in-process runs change (environment variables, the stop-signal handlers,
torch's thread count and global random generator), and loaders a test opens are closed when it ends
(``open_loader``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("helpers")

from helpers import BATCH, CURRICULUM, KILL_RUN, RUN, ShardSet, build_shard_set, tiny_config  # noqa: E402

# Triton decides whether a kernel runs in its CPU interpreter when the kernel module is first imported, so the
# variable must be set before any test module imports one; test_kernels.py, test_kernels_models.py and
# test_bench.py also set it themselves (tools/gpu_check.sh runs the first two without this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: the signals memtrain's preemption handler takes over (memtrain.engine.preempt), with their handlers and
#: torch's thread count as the test process starts: every test ends with them restored, whatever its fixtures
#: of a wider scope changed
_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") if hasattr(signal, name)
)
_START_HANDLERS = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
_START_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Undo what a test changed in this process that the next test would otherwise inherit: environment
    variables (libraries set their own: W&B its service address, DeepSpeed its accelerator) and torch's
    global random generator as they were before the test; handlers of the stop signals (``memtrain train``
    installs its preemption handler before it reads the config, and a config error returns without restoring
    it) and ``torch.set_num_threads`` (set by runs from ``train.threads``) as they were when the process
    started."""
    env = dict(os.environ)
    rng = torch.random.get_rng_state()
    yield
    for name in set(os.environ) - set(env):
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    torch.random.set_rng_state(rng)
    for sig, handler in _START_HANDLERS.items():
        if signal.getsignal(sig) != handler and handler is not None:
            signal.signal(sig, handler)
    if torch.get_num_threads() != _START_THREADS:
        torch.set_num_threads(_START_THREADS)


# ----------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> ShardSet:
    """Tokenizer (vocab 400) + shards of the first 150 demo documents, rows of 32 tokens."""
    return build_shard_set(tmp_path_factory.mktemp("tiny_data"), offset=0, n_docs=150, vocab_size=400)


@pytest.fixture(scope="session")
def other_data(tmp_path_factory) -> ShardSet:
    """Another tokenizer (vocab 420, documents 600..720) + its shards, also rows of 32 tokens."""
    return build_shard_set(tmp_path_factory.mktemp("other_data"), offset=600, n_docs=120, vocab_size=420)


@pytest.fixture
def open_loader():
    """``make_loader`` whose loaders are closed when the test ends: a streaming dataset holds about a dozen
    shared-memory segments and file descriptors until it is closed, for as long as the process lives."""
    from memtrain.data.loader import make_loader

    opened = []

    def make(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        opened.append(loader)
        return loader

    yield make
    for loader in opened:
        loader.close()


# ----------------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Single-process plain runs on the global batch of two ranks (2 x BATCH rows): the plain schedule, the
    curriculum, and the longer run of the kill tests; what the two-rank DeepSpeed and pipeline runs must equal."""
    from memtrain.engine.trainer import train

    root = tmp_path_factory.mktemp("reference")
    runs = {"plain": (RUN, ()), "curriculum": (RUN, (CURRICULUM,)), "long": (KILL_RUN, ())}
    for name, (run, extra) in runs.items():
        train(tiny_config(tiny_data.shards, root / name, *run, f"data.batch_size={2 * BATCH}", *extra))
    return {name: root / name for name in runs}


# ----------------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture
def fake_cluster(monkeypatch):
    """A Slurm cluster of one partition ``cpu`` (2 nodes of 8 CPUs, no GPU) as ``memtrain submit`` sees it."""
    from memtrain.launch import slurm

    cluster = {"cpu": slurm.Partition("cpu", nodes=2, gpus_per_node=0, cpus_per_node=8)}
    monkeypatch.setattr(slurm, "cluster_partitions", lambda: cluster)
    monkeypatch.setattr(slurm, "default_partition", lambda: "cpu")
