"""memtrain's SentencePiece tokenizer as a Hugging Face fast tokenizer (``tokenizer.json``), for every export.

``AutoTokenizer.from_pretrained(folder)`` then loads a ``PreTrainedTokenizerFast`` that gives the ids
:meth:`memtrain.data.tokenizer.Tokenizer.encode` gives, with memtrain's special tokens at their ids
(``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<sep>`` 4, ``<blank>`` 5). It adds no BOS or EOS, as
memtrain's tokenizer adds none.

The conversion is transformers' :class:`~transformers.convert_slow_tokenizer.SpmConverter` (the BPE merges
are read from the model's pieces and scores by its ``SentencePieceExtractor``), with byte fallback and the
pipeline of memtrain's tokenizers (identity normalisation, whitespace kept): a ``▁`` in front of the text
(SentencePiece's dummy prefix), every space as ``▁``, no pre-splitting. The control tokens are special and,
as in SentencePiece, never read out of text (``split_special_tokens``); ``<sep>`` and ``<blank>`` are read out
of text, as SentencePiece reads user-defined symbols. One difference remains: text that spells ``<sep>`` or
``<blank>`` literally gets a ``▁`` in front of the text that follows it (a Hugging Face tokenizer normalises
the pieces between such tokens separately), where SentencePiece adds none.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from memtrain.errors import UserError

#: the files :func:`save_hf_tokenizer` writes beside ``tokenizer.model``
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _converter_class():
    from tokenizers import decoders, normalizers
    from transformers.convert_slow_tokenizer import SpmConverter

    class MemtrainSpmConverter(SpmConverter):
        """SpmConverter for memtrain's BPE models: byte fallback, identity normalisation, dummy prefix."""

        handle_byte_fallback = True

        def normalizer(self, proto):
            return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])

        def pre_tokenizer(self, replacement, add_prefix_space):
            return None

        def decoder(self, replacement, add_prefix_space):
            return decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            )

    return MemtrainSpmConverter


def hf_tokenizer(tok, model_max_length: int | None = None):
    """The ``PreTrainedTokenizerFast`` of a memtrain :class:`~memtrain.data.tokenizer.Tokenizer` ``tok``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    pb2: Any = import_protobuf()  # generated protobuf modules carry no type information
    proto = pb2.ModelProto()
    proto.ParseFromString(tok.processor.serialized_model_proto())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != 2 or norm.name != "identity" or not norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise UserError(
            f"{tok.path}: a SentencePiece model memtrain did not train (expected BPE with identity normalisation, "
            "a dummy prefix and whitespace kept); it has no exact Hugging Face form here"
        )
    backend = _converter_class()(SimpleNamespace(vocab_file=str(tok.path))).converted()
    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def save_hf_tokenizer(tok, folder: str | Path, model_max_length: int | None = None) -> list[str]:
    """Write ``tok`` into ``folder`` twice over: its own ``tokenizer.model`` (what memtrain loads) and the
    Hugging Face files of :data:`HF_TOKENIZER_FILES` (what ``AutoTokenizer`` loads). Returns the names written."""
    from memtrain.data.tokenizer import TOKENIZER_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.path, folder / TOKENIZER_FILE)
    written = hf_tokenizer(tok, model_max_length).save_pretrained(str(folder), legacy_format=False)
    return [TOKENIZER_FILE] + sorted(Path(p).name for p in written if Path(p).is_file())
