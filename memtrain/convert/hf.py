"""A memtrain transformer causal LM -> a Hugging Face ``LlamaForCausalLM`` folder (``from_pretrained``).

memtrain's transformer block is HF Llama's decoder layer with the same parameter names, so the mapping is
``wte`` -> ``model.embed_tokens``, ``decoder.blocks.{i}`` -> ``model.layers.{i}``, ``norm`` -> ``model.norm``,
``lm_head`` -> ``lm_head``. The folder also holds the run's tokenizer (:mod:`memtrain.convert.tokenizer`: the
same ids through ``AutoTokenizer``) and a model card. The config carries the model's own numbers: ``rms_norm_eps`` is the decoder's
``norm_eps``, ``rope_theta`` its ``rope_theta``, ``intermediate_size`` = ``ffn_mult`` x d, one key/value head
per query head, and ``max_position_embeddings`` the trained context C*L.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from memtrain.convert.common import output_dir
from memtrain.engine import checkpoint as ckpt
from memtrain.errors import UserError


def llama_config(cfg, vocab_size: int, special_ids: dict):
    """The ``transformers.LlamaConfig`` of a memtrain clm run config."""
    from transformers import LlamaConfig

    dec = cfg.model.decoder
    # LlamaConfig leaves these unannotated with int defaults, but None (no such token) is valid
    token_ids: dict[str, Any] = dict(
        bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"), pad_token_id=special_ids.get("pad")
    )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dec.d_model,
        intermediate_size=dec.ffn_mult * dec.d_model,
        num_hidden_layers=dec.n_layers,
        num_attention_heads=dec.n_heads,
        num_key_value_heads=dec.n_heads,
        head_dim=dec.d_model // dec.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.model.seq_len,
        rms_norm_eps=dec.norm_eps,
        rope_theta=dec.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.model.tie_embeddings,
        torch_dtype="float32",
        **token_ids,
    )


def hf_name(name: str) -> str:
    """memtrain clm parameter name -> LlamaForCausalLM parameter name."""
    if name == "wte.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    m = re.match(r"decoder\.blocks\.(\d+)\.(.+)$", name)
    if m:
        return f"model.layers.{m.group(1)}.{m.group(2)}"
    return name


def convert_hf(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a ``LlamaForCausalLM`` folder ``out`` from the memtrain checkpoint (or run) ``src``: config.json,
    generation_config.json, model.safetensors, the run's tokenizer (``tokenizer``, else the one found with the
    run) for ``AutoTokenizer`` and as ``tokenizer.model``, and README.md (the model card)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # transformers
    from transformers import LlamaForCausalLM  # may import deepspeed, which otherwise warns about its choice

    from memtrain.convert.tokenizer import save_hf_tokenizer
    from memtrain.hub import CARD_FILE, card_info, model_card, run_results
    from memtrain.inference import find_encoder_tokenizer

    ck, cfg, meta = ckpt.read_checkpoint(src)
    m = cfg.model
    if m.kind != "clm" or m.decoder.arch != "transformer":
        raise UserError(
            f"{ck}: a {m.kind} model with a {m.decoder.arch} decoder has no LlamaForCausalLM form; "
            "only a causal LM (model.kind: clm) with a transformer decoder converts"
        )
    if not m.final_norm:
        raise UserError(f"{ck}: model.final_norm is false, but LlamaForCausalLM always applies a final RMSNorm")
    tok = find_encoder_tokenizer(ck, cfg, meta, tokenizer)
    if tok.vocab_size != int(meta["vocab_size"]):
        raise UserError(
            f"{tok.path}: a tokenizer of {tok.vocab_size} pieces, but {ck} has a vocabulary of {meta['vocab_size']}"
        )
    memtrain_model = ckpt.load_model(ck)[0]  # strict; tied weights under both names afterwards
    hf_state = {hf_name(k): v for k, v in memtrain_model.state_dict().items()}
    config = llama_config(cfg, int(meta["vocab_size"]), meta.get("special_ids") or {})
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"{ck / 'model.safetensors'}: does not fit its config as a Llama model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    card = model_card(
        cfg,
        card_info(meta),
        n_params=model.num_parameters(),
        results=run_results(ck, meta.get("step"), label=cfg.run.name),
        transformers_class=type(model).__name__,
    )
    with output_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_hf_tokenizer(tok, tmp, m.seq_len)
        (tmp / CARD_FILE).write_text(card)
    return Path(out)
