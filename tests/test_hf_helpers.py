"""Every tiny Hugging Face decoder family the HF-decoder tests build (``helpers.tiny_llm``) loads as a causal LM
with its own tokenizer. Nothing here downloads anything."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llm


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
