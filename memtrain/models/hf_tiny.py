"""Tiny randomly initialised Hugging Face causal LMs with their own small tokenizer, made locally (no download):
for tests, docs and smoke runs of ``model.hf_decoder``.

    python -m memtrain.models.hf_tiny --family llama --out runs/tiny-llama [--corpus TEXT_FILES...]

Families: ``llama`` (BOS + EOS, like Llama 3), ``qwen2`` / ``qwen3`` (EOS only, no BOS, like Qwen), ``gpt_neox``
(one ``<|endoftext|>`` token as BOS and EOS, like Pythia). The tokenizer is a byte-level BPE trained on the
given texts (default: the first documents of the bundled demo corpus).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

FAMILIES = ("llama", "qwen2", "qwen3", "gpt_neox")
_SPECIALS = {  # family -> (bos, eos, pad)
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", None),
    "qwen2": (None, "<|endoftext|>", "<|pad|>"),
    "qwen3": (None, "<|endoftext|>", "<|pad|>"),
    "gpt_neox": ("<|endoftext|>", "<|endoftext|>", None),
}


def demo_texts(n_docs: int = 120, max_chars: int = 3000) -> list[str]:
    """The first ``n_docs`` documents of the bundled demo corpus, each cut to ``max_chars``."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path

    table = pq.read_table(demo_corpus_path(), columns=["text"]).slice(0, n_docs)
    return [t[:max_chars] for t in table.column("text").to_pylist()]


def train_tiny_tokenizer(texts: Iterable[str], family: str = "llama", vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``family``'s special tokens, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = _SPECIALS[family]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if family == "llama":  # like Llama 3: BOS in front of every encoded text (unless add_special_tokens=False)
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def tiny_config(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    bos_id: int | None = None,
    eos_id: int | None = None,
):
    """A transformers config of ``family`` at a tiny size (intermediate 2x hidden, 2 KV heads where grouped)."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=1024,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(num_key_value_heads=max(1, n_heads // 2), **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=max(1, n_heads // 2), **common)
    if family == "qwen3":
        return Qwen3Config(num_key_value_heads=max(1, n_heads // 2), head_dim=hidden_size // n_heads, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(**common)
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def make_tiny_llm(
    out_dir: str | Path,
    family: str = "llama",
    texts: Sequence[str] | None = None,
    vocab_size: int = 384,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised ``family`` causal LM and its tokenizer to ``out_dir`` (save_pretrained,
    safetensors); returns ``out_dir``. ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = train_tiny_tokenizer(texts if texts is not None else demo_texts(), family, vocab_size)
    bos_id = cast(int | None, tok.bos_token_id)  # special-token ids resolve through __getattr__
    eos_id = cast(int | None, tok.eos_token_id)
    cfg = tiny_config(family, len(tok), hidden_size, n_layers, n_heads, bos_id, eos_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memtrain.models.hf_tiny", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="llama")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--corpus", nargs="*", metavar="SRC", help="texts for the tokenizer (default: the demo corpus)")
    p.add_argument("--vocab-size", type=int, default=384)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    texts = None
    if args.corpus:
        from memtrain.data.documents import iter_documents

        texts = [t for _, t in iter_documents(args.corpus)]
    out = make_tiny_llm(
        args.out, args.family, texts, args.vocab_size, args.hidden_size, args.layers, args.heads, args.seed
    )
    print(f"{out}: tiny {args.family} causal LM (hidden {args.hidden_size}, {args.layers} layers) and its tokenizer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
