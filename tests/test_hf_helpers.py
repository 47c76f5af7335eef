"""Shared builders for the HF-decoder tests (tiny local LLMs, a memtrain tokenizer, dual shards, short runs),
cached per test session under pytest's base temp directory, plus a check that every tiny family loads.

Other test modules import these helpers; nothing here downloads anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from memtrain.config import config_from_dict
from memtrain.data import demo_corpus_path

N_DOCS, MAX_CHARS = 40, 1200
C, L, L_DEC = 4, 16, 12


def _root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "hf-shared"
    root.mkdir(exist_ok=True)
    return root


def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    """corpus.jsonl of the first N_DOCS demo documents (cut to MAX_CHARS) and its records."""
    path = _root(tmp_path_factory) / "corpus.jsonl"
    table = pq.read_table(demo_corpus_path(), columns=["text", "id"]).slice(0, N_DOCS)
    records = [{"id": r["id"], "text": r["text"][:MAX_CHARS]} for r in table.to_pylist()]
    if not path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def encoder_tokenizer(tmp_path_factory) -> Path:
    """A memtrain SentencePiece tokenizer (vocab 420) trained on the corpus."""
    from memtrain.data.tokenizer import TOKENIZER_FILE, train_tokenizer

    out = _root(tmp_path_factory) / "enc_tok"
    if not (out / TOKENIZER_FILE).is_file():
        train_tokenizer([str(corpus(tmp_path_factory)[0])], out, vocab_size=420, threads=1)
    return out / TOKENIZER_FILE


def tiny_llm(tmp_path_factory, family: str = "llama") -> Path:
    """A randomly initialised tiny ``family`` causal LM with its own BPE tokenizer (vocab 320)."""
    from memtrain.models.hf_tiny import make_tiny_llm

    out = _root(tmp_path_factory) / f"llm-{family}"
    if not (out / "config.json").is_file():
        make_tiny_llm(out, family, [r["text"] for r in corpus(tmp_path_factory)[1]], vocab_size=320)
    return out


def dual_shards(tmp_path_factory, family: str = "llama") -> Path:
    """Dual shards (C=4 chunks of L=16 encoder / L_DEC=12 decoder tokens) of the corpus."""
    from memtrain.data.dual import build_dual_shards

    out = _root(tmp_path_factory) / f"shards-{family}"
    if not (out / "memtrain_shards.json").is_file():
        build_dual_shards([str(corpus(tmp_path_factory)[0])], encoder_tokenizer(tmp_path_factory),
                          tiny_llm(tmp_path_factory, family), out, chunk_len=L, n_chunks=C, decoder_chunk_len=L_DEC,
                          val_fraction=0.1, progress=False)
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
    """The first ``n`` dual rows of the family's shards (unshuffled), loaded once per test session."""
    from memtrain.data.loader import make_loader

    key = (family, n, split)
    if key not in _ROWS:
        shards = dual_shards(tmp_path_factory, family)
        loader = shm_retry(make_loader, shards, split, batch_size=n, shuffle=False, seed=0, max_batches=1)
        _ROWS[key] = next(iter(loader)).clone()
    return _ROWS[key]


def hf_config(shards: Path, llm: Path, out_dir: Path, mode: str = "full", steps: int = 3, **model_extra):
    """A tiny HF-decoder run config: transformer encoder d 32, copy + causal, fp32, one thread."""
    model = {"kind": "memory", "chunk_len": L, "n_chunks": C,
             "encoder": {"arch": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2},
             "hf_decoder": {"path": str(llm), "chunk_len": L_DEC, "mode": mode, "lora": {"r": 4}}}
    for key, value in model_extra.items():
        if key == "hf_decoder":
            model["hf_decoder"].update(value)
        else:
            model[key] = value
    raw = {"run": {"name": f"hf-{mode}", "out_dir": str(out_dir), "seed": 0}, "model": model,
           "objective": {"weights": {"causal": 1.0, "copy": 0.5}},
           "data": {"shards": str(shards), "batch_size": 2},
           "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
           "train": {"steps": steps, "precision": "fp32", "device": "cpu", "eval_every": 0, "eval_batches": 1,
                     "log_every": 1, "ckpt_every": 0, "progress": False, "threads": 1}}
    return config_from_dict(raw, source="hf test config")


def trained_run(tmp_path_factory, name: str = "lora", mode: str = "lora", steps: int = 4) -> Path:
    """A short HF-decoder training run (tiny Llama), shared by the inference and capability tests."""
    from memtrain.engine.trainer import train

    out = _root(tmp_path_factory) / f"run-{name}"
    if not (out / "summary.json").is_file():
        shm_retry(train, hf_config(dual_shards(tmp_path_factory), tiny_llm(tmp_path_factory), out, mode=mode,
                                   steps=steps))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt_neox"])
def test_tiny_llms_load_as_causal_lms(tmp_path_factory, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llm(tmp_path_factory, family)
    lm = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(lm).__name__.endswith("ForCausalLM") and lm.config.hidden_size == 64
    ids = tok("SELECT name FROM users;", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "SELECT name FROM users;" and max(ids) < lm.config.vocab_size
    assert (tok.bos_token_id is None) == family.startswith("qwen") and tok.eos_token_id is not None
    logits = lm(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
