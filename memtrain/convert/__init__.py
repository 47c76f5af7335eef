"""Checkpoint conversion (``memtrain convert``).

* :mod:`memtrain.convert.ds` — a DeepSpeed checkpoint (ZeRO 0-3, or per-layer pipeline files, which the stock
  ``zero_to_fp32`` cannot read) -> one consolidated ``model.safetensors`` plus the run config.
* :mod:`memtrain.convert.reference` — checkpoints of the paper's reference code (``AutoencodingMixer``,
  ``LanguageMixer``, ``VariableMemoryMixer``) -> memtrain, with the saved mixing weights masked causal.
* :mod:`memtrain.convert.hf` — a memtrain transformer causal LM -> a Hugging Face ``LlamaForCausalLM`` folder.
* :mod:`memtrain.convert.tokenizer` — memtrain's SentencePiece tokenizer -> the same tokenizer for
  ``AutoTokenizer`` (``tokenizer.json``), written into every Hugging Face export.

Every conversion writes a folder that did not exist (or was empty), through a temporary folder renamed into
place, and checks its input fully before writing anything. The memtrain outputs are checkpoint folders
(``model.safetensors``, ``config.yaml``, ``meta.json``) that ``memtrain eval`` and ``model.frozen_encoder``
read like any training checkpoint.
"""
