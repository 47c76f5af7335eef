"""A memory model whose decoder is a pretrained Hugging Face causal LM (``model.hf_decoder``; docs/reference.md §7).

A memtrain :class:`~memtrain.models.base.ChunkEncoder` turns chunks 0..C-2 of a row into one memory each; a
``projector`` Linear(e, d) maps them into the LLM's input-embedding space, where they are read as prefix slots
before the chunk's own tokens. The LLM decoder for chunk c reads (P = C - 1 + s prefix slots, s = 1 if the LLM's
tokenizer has a BOS token, else 0)::

    [empty x (C-1-c), BOS, m_0 .. m_{c-1}, tok_0 .. tok_{L_dec-1}]      (length P + L_dec)

Empty slots and the chunk's padding have attention mask 0, and position ids count only visible positions
(``cumsum(mask) - 1``), so the LLM sees exactly ``[BOS, m_0..m_{c-1}, tokens]`` at positions 0, 1, ...: the
empty slots change nothing (left padding). The attention mask is built per chunk from these slots and the
chunk's own token mask (the reference's cumulative, misaligned mask is not reproduced). As in
:class:`~memtrain.models.memory.MemoryModel`, chunks are folded into the batch: the encoder runs once on
[B*(C-1), L] and the LLM once on [B*C, P + L_dec]; output position P-1+j predicts decoder token j.

Rows are the *dual rows* of :mod:`memtrain.data.dual` (each chunk: L encoder ids, then L_dec decoder slots), so
the objectives, engines and evaluation of memtrain run on this model unchanged: ``forward`` returns hidden
states aligned with the whole dual row (zeros at encoder positions, which :meth:`align_labels` never scores).

Training modes (``hf_decoder.mode``): ``full`` (every LLM weight trains), ``lora`` (peft LoRA adapters train;
the LLM's own weights keep ``requires_grad=False`` through every :meth:`freeze`), ``frozen`` (no LLM weight
trains: only the projector, and the encoder unless it is frozen too).

Shapes: B rows, C chunks, L encoder tokens per chunk, L_dec decoder tokens per chunk, T = C*(L + L_dec),
e encoder width, d the LLM's hidden width, V the LLM's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

from memtrain.config import HFDecoderConfig, ModelConfig
from memtrain.data.dual import DualLayout
from memtrain.errors import UserError
from memtrain.labels import IGNORE_INDEX
from memtrain.models.base import ChunkEncoder, MemtrainModel
from memtrain.models.stack import init_like

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MemoryWidthError(UserError, ValueError):
    """Memories whose width is not the one the projector was built for."""


# ----------------------------------------------------------------------------------------------------
# Loading the LLM


def check_causal_lm_dir(path: str | Path, field: str = "model.hf_decoder.path"):
    """The transformers config of the causal LM in directory ``path``; :class:`UserError` (one line naming
    ``field``) when it is missing, not a Hugging Face model, not a causal LM, or one whose logits are not
    ``lm_head(hidden)`` (final-logit soft-capping, logit scaling)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{field}: {p} is not a directory (expected a local Hugging Face causal LM directory)")
    if not (p / "config.json").is_file():
        raise UserError(f"{field}: {p} has no config.json; it is not a Hugging Face model directory")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # ValueError (unknown model_type), OSError, JSON errors
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{field}: {p}/config.json is not a usable transformers config ({detail[:160]})") from None
    archs = list(config.architectures or [])
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
    if archs:
        causal = causal and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if not causal:
        what = ", ".join(archs) or config.model_type
        raise UserError(
            f"{field}: {p} holds a {what}, not a causal language model (expected e.g. "
            "LlamaForCausalLM, Qwen2ForCausalLM, GPTNeoXForCausalLM)"
        )
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise UserError(
                f"{field}: {p} ({config.model_type}) transforms its logits ({attr}); memtrain's LLM "
                "decoders compute logits as lm_head(hidden) only (Llama, Qwen, GPT-NeoX families)"
            )
    return config


def load_causal_lm(hf: HFDecoderConfig, pretrained: bool = True):
    """The transformers causal LM of ``hf.path`` in ``hf.dtype``: its weights when ``pretrained``, else the
    architecture only, uninitialised (for loading a checkpoint's weights into it)."""
    from transformers import AutoModelForCausalLM

    config = check_causal_lm_dir(hf.path)
    dtype = _DTYPES[hf.dtype]
    try:
        if pretrained:
            return AutoModelForCausalLM.from_pretrained(
                hf.path, dtype=dtype, local_files_only=True, attn_implementation=hf.attn_implementation
            )
        from transformers.modeling_utils import no_init_weights

        with no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=hf.attn_implementation)
    except UserError:
        raise
    except Exception as exc:  # missing or damaged weight files, unsupported attention implementation
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.hf_decoder.path: cannot load the causal LM in {hf.path} ({detail[:200]})") from None


def start_token_id(path: str | Path, config) -> int | None:
    """The token each chunk's LLM input starts with: the tokenizer's BOS (Llama, GPT-NeoX), or None when the
    tokenizer has none (Qwen); the model config's ``bos_token_id`` when the directory holds no tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True).bos_token_id
    except Exception:  # no tokenizer files in the model directory
        return getattr(config, "bos_token_id", None)


def _add_lora(lm, lora):
    from peft import LoraConfig, get_peft_model

    target = lora.target_modules
    try:
        return get_peft_model(
            lm,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, bias="none"),
        )
    except ValueError as exc:  # no module matches target_modules
        raise UserError(
            f"model.hf_decoder.lora.target_modules: {target!r} does not fit this LLM ({str(exc).splitlines()[0][:160]})"
        ) from None


def _prefix_table(C: int, has_start: bool, with_memories: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source fills each prefix slot of each chunk: (index [C, P] into [zero, BOS?, m_0..m_{C-2}],
    visible [C, P]), P = C - 1 + has_start; chunk c's visible slots are its last c + has_start."""
    P = C - 1 + int(has_start)
    index = torch.zeros(C, P, dtype=torch.long)
    visible = torch.zeros(C, P, dtype=torch.bool)
    first_memory = 1 + int(has_start)
    for c in range(C):
        if with_memories:
            for j in range(c):
                index[c, P - c + j], visible[c, P - c + j] = first_memory + j, True
        if has_start:
            index[c, P - c - 1], visible[c, P - c - 1] = 1, True
    return index, visible


# ----------------------------------------------------------------------------------------------------
# The model


class HFMemoryModel(MemtrainModel):
    """Dual rows [B, T] -> hidden [B, T, d]: at decoder slot j of chunk c, the state that predicts decoder token
    j of chunk c from the memories of chunks 0..c-1 (and BOS) and decoder tokens 0..j-1 of chunk c.

    Parameters: ``encoder`` (:class:`ChunkEncoder`, absent with ``no_memory``), ``projector`` Linear(e, d),
    ``llm`` (the transformers model; a peft ``PeftModel`` around it in LoRA mode).
    ``pretrained=False`` builds the LLM's architecture without reading its weights (a checkpoint's follow).
    """

    kind = "memory"
    label_shift = 0

    def __init__(self, cfg: ModelConfig, vocab_size: int, pretrained: bool = True):
        if cfg.hf_decoder is None:
            raise ValueError("HFMemoryModel needs model.hf_decoder")
        super().__init__(cfg, vocab_size)
        hf = cfg.hf_decoder
        self.layout = DualLayout(cfg.n_chunks, cfg.chunk_len, cfg.decoder_chunk_len)
        self.encoder_vocab_size = vocab_size
        lm = load_causal_lm(hf, pretrained)
        self.start_id = start_token_id(hf.path, lm.config)
        self.d_model = cast(nn.Embedding, lm.get_input_embeddings()).embedding_dim
        self.vocab_size = cast(nn.Linear, lm.get_output_embeddings()).out_features
        self.memory_width = cfg.encoder.d_model
        self.encoder = None if cfg.no_memory else ChunkEncoder(cfg, vocab_size)
        self.projector = (
            None
            if cfg.no_memory
            else init_like(nn.Linear(self.memory_width, self.d_model), "transformer").to(_DTYPES[hf.dtype])
        )
        if hf.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hf.mode == "frozen":
            lm.requires_grad_(False)
        elif hf.mode == "lora":
            lm = _add_lora(lm, hf.lora)
        self.llm = lm
        self._ids_checked = False
        #: parameters the mode keeps as loaded: the LLM's own weights in lora and frozen mode
        self._fixed = {f"llm.{n}" for n, p in lm.named_parameters() if not p.requires_grad}

    # -- the LLM ------------------------------------------------------------------------------------------

    @property
    def chunk_span(self) -> int:
        """Row positions per chunk of a dual row: L encoder ids then L_dec decoder slots."""
        return self.layout.block_len

    def causal_lm(self):
        """The transformers causal LM (inside the peft wrapper in LoRA mode; adapters included)."""
        get_base = getattr(self.llm, "get_base_model", None)
        return get_base() if get_base is not None else self.llm

    def backbone(self):
        """The LLM without its head (``LlamaModel``, ``Qwen2Model``, ``GPTNeoXModel``, ...)."""
        lm = self.causal_lm()
        return getattr(lm, lm.base_model_prefix)

    def merged_causal_lm(self):
        """The causal LM with LoRA adapters merged into its weights (a plain transformers model; in LoRA mode
        this unloads the adapters from this model, so use it on a copy that is not trained further)."""
        merge_and_unload = getattr(self.llm, "merge_and_unload", None)
        if merge_and_unload is not None:
            return merge_and_unload()
        return self.llm

    def freeze(self, groups: list[str]) -> None:
        """:meth:`MemtrainModel.freeze`, except that the LLM weights the mode keeps (lora, frozen) never train."""
        super().freeze(groups)
        for name, p in self.named_parameters():
            if name in self._fixed:
                p.requires_grad_(False)

    def _group_modules(self) -> dict[str, Sequence[nn.Module]]:
        lm = self.causal_lm()
        encoder = [] if self.encoder is None else [self.encoder]
        return {
            "encoder": encoder,
            "decoder": [self.backbone()],
            "projector": [] if self.projector is None else [self.projector],
            "embeddings": [lm.get_input_embeddings()] + [m.wte for m in encoder],
            "head": [cast(nn.Linear, lm.get_output_embeddings())],
        }

    # -- memories -----------------------------------------------------------------------------------------
    def encode_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """Encoder ids [N, L] -> memories [N, e] (without autograd when the encoder is frozen)."""
        if self.encoder is None:
            raise TypeError("this memory model has no encoder (model.no_memory is true)")
        return self._run_encoder(chunks)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dual rows [B, T] -> memories [B, C-1, e] of chunks 0..C-2 (before the projector)."""
        enc, _ = self.layout.split(input_ids)
        B, C, L = enc.shape
        return self.encode_chunks(enc[:, : C - 1].reshape(B * (C - 1), L)).view(B, C - 1, -1)

    def check_memories(self, memories: torch.Tensor, count: int | None = None) -> None:
        """Raise :class:`MemoryWidthError` unless ``memories`` is [B, k, e] with e the projector's input width
        (and k == ``count`` when given)."""
        if self.projector is None:
            raise MemoryWidthError("this memory model reads no memories (model.no_memory is true)")
        if memories.dim() != 3 or memories.shape[-1] != self.memory_width:
            raise MemoryWidthError(
                f"memories of width {memories.shape[-1] if memories.dim() else '?'} (shape "
                f"{list(memories.shape)}), but the projector was built for width "
                f"{self.memory_width} (model.encoder.d_model): they come from another encoder"
            )
        if count is not None and memories.shape[1] != count:
            raise MemoryWidthError(f"expected {count} memories per row, got {memories.shape[1]}")

    def prefix_embeddings(self, memories: torch.Tensor | None, batch: int = 1) -> torch.Tensor:
        """What the LLM reads before a chunk's tokens: memories [B, k, e] (or None) -> [B, s + k, d] = BOS
        embedding (if the tokenizer has BOS) then the projected memories."""
        parts = []
        if self.start_id is not None:
            start = torch.full((batch, 1), self.start_id, dtype=torch.long, device=self._device())
            parts.append(self.token_embeddings(start))
        if memories is not None:
            self.check_memories(memories)
            parts.append(self._project(memories))
        if not parts:
            return torch.zeros(batch, 0, self.d_model, device=self._device())
        dtype = parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM token ids [...] -> input embeddings [..., d]."""
        return self.causal_lm().get_input_embeddings()(ids)

    def _project(self, memories: torch.Tensor) -> torch.Tensor:
        assert self.projector is not None  # callers check_memories first, which refuses a model without one
        return self.projector(memories.to(self.projector.weight.dtype))

    def _device(self) -> torch.device:
        return cast(nn.Embedding, self.causal_lm().get_input_embeddings()).weight.device

    # -- the forward pass ---------------------------------------------------------------------------------
    def decoder_input(
        self,
        input_ids: torch.Tensor,
        memories: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dual rows [B, T] (+ memories [B, C-1, e], else encoded here) -> the LLM's input with the chunks
        folded into the batch: (inputs_embeds [B*C, P + L_dec, d], attention mask [B*C, P + L_dec])."""
        enc, slots = self.layout.split(input_ids)
        B, C = enc.shape[:2]
        ids, token_mask = self.layout.decoder_tokens(slots)  # [B, C, L_dec]
        if not self._ids_checked:  # once (a host sync): shards of another decoder tokenizer fail here, clearly
            top = int(ids.max()) if ids.numel() else 0
            if top >= self.vocab_size:
                hf = self.cfg.hf_decoder
                assert hf is not None  # __init__ refuses a config without one
                raise UserError(
                    f"decoder token id {top} is outside the LLM's vocabulary of {self.vocab_size}: the "
                    "shards' decoder tokenizer is not this LLM's (make them with `memtrain data shards "
                    f"--decoder-tokenizer {hf.path}`)"
                )
            self._ids_checked = True
        tokens = self.token_embeddings(ids)  # [B, C, L_dec, d]
        sources = [tokens.new_zeros(B, 1, self.d_model)]
        if self.start_id is not None:
            sources.append(self.prefix_embeddings(None, B))
        with_memories = self.encoder is not None
        if with_memories:
            if memories is None:
                memories = self.encode(input_ids)
            self.check_memories(memories, C - 1)
            sources.append(self._project(memories))
        elif memories is not None:
            raise ValueError("memories were given to a memory model built with no_memory: true")
        index, visible = _prefix_table(C, self.start_id is not None, with_memories)
        index, visible = index.to(tokens.device), visible.to(tokens.device)
        source = torch.cat([s.to(tokens.dtype) for s in sources], dim=1)  # [B, S, d]
        prefix = source[:, index]  # [B, C, P, d]
        x = torch.cat([prefix, tokens], dim=2).view(B * C, -1, self.d_model)
        mask = torch.cat([visible.expand(B, C, -1), token_mask], dim=2).view(B * C, -1)
        return x, mask

    def forward(self, input_ids: torch.Tensor, memories: torch.Tensor | None = None) -> torch.Tensor:
        """Dual rows [B, T] -> hidden [B, T, d] aligned with :meth:`align_labels` (zeros at encoder positions).

        ``memories`` [B, C-1, e] (encoder outputs, e.g. precomputed) skips the encoder.
        """
        C, L, Ld = self.layout.n_chunks, self.layout.enc_len, self.layout.dec_len
        x, mask = self.decoder_input(input_ids, memories)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.backbone()(
            inputs_embeds=x, attention_mask=mask.long(), position_ids=positions, use_cache=False
        ).last_hidden_state  # [B*C, P + L_dec, d]
        P = h.shape[1] - Ld
        h = h[:, P - 1 : P - 1 + Ld].reshape(-1, C, Ld, self.d_model)  # position P-1+j predicts token j
        B = h.shape[0]
        return torch.cat([h.new_zeros(B, C, L, self.d_model), h], dim=2).view(B, C * (L + Ld), self.d_model)

    def align_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets of dual rows [B, T] -> labels [B, T]: decoder tokens at decoder slots (-100 at padding and
        unscored slots), -100 at every encoder position and, without a BOS, at the row's first decoder token
        (nothing precedes it)."""
        enc, slots = self.layout.split(targets)
        labels = self.layout.decoder_labels(slots).clone()
        if self.start_id is None:
            labels[:, 0, 0] = IGNORE_INDEX
        return torch.cat([torch.full_like(enc, IGNORE_INDEX), labels], dim=2).view(targets.shape)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] (the LLM's output head; its final norm is in the backbone)."""
        return cast(nn.Linear, self.causal_lm().get_output_embeddings())(hidden)
