"""What every memtrain model shares: the LM head, label alignment, module groups, freezing, and the chunk encoder.

Shapes: B batch, T = cfg.seq_len tokens per row, L = cfg.chunk_len, C = cfg.n_chunks, V vocabulary,
e = encoder width, d = decoder width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn as nn

from memtrain.config import MODULE_GROUPS, ModelConfig
from memtrain.errors import UserError
from memtrain.models.stack import Stack, init_like, make_norm


class ChunkEncoder(Stack):
    """Token ids [N, L] -> memory [N, e]: embedding -> encoder stack (+ final norm if cfg.final_norm) ->
    hidden state at ``cfg.memory_position`` -> optional bottleneck Linear(e, e/c) -> Linear(e/c, e).

    Parameters: ``wte``, ``blocks.*``, ``norm``, ``down``, ``up`` (the last two only when compression > 1).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg.encoder, cfg.chunk_len, final_norm=cfg.final_norm)
        e, c = cfg.encoder.d_model, cfg.compression
        self.memory_position = cfg.memory_position
        self.wte = init_like(nn.Embedding(vocab_size, e), cfg.encoder.arch)
        self.down = init_like(nn.Linear(e, e // c), cfg.encoder.arch) if c > 1 else nn.Identity()
        self.up = init_like(nn.Linear(e // c, e), cfg.encoder.arch) if c > 1 else nn.Identity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [N, L] -> memories [N, e]."""
        return self.readout(self.run_blocks(self.embed(input_ids)))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [N, L] -> token embeddings [N, L, e]."""
        return self.wte(input_ids)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Block output [N, L, e] -> memories [N, e]: final norm, the hidden state at the memory position,
        then the bottleneck."""
        return self.up(self.down(self.norm(h)[:, self.memory_position]))


class MemtrainModel(nn.Module):
    """Base of the three model kinds. ``forward(input_ids [B, T]) -> hidden [B, T, d]`` aligned with
    :meth:`align_labels`; :meth:`logits` maps hidden states to the vocabulary.

    Subclasses set ``kind``, ``label_shift``, build their layers and call :meth:`_build_head`.
    """

    kind: str = ""
    label_shift: int = 0

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size

    def _build_head(self, tie_to: nn.Embedding | None) -> None:
        """Final norm (if cfg.final_norm) and lm_head Linear(d, V, bias=False), tied to ``tie_to`` if asked."""
        dec = self.cfg.decoder
        self.norm = make_norm(dec) if self.cfg.final_norm else nn.Identity()
        self.lm_head = init_like(nn.Linear(dec.d_model, self.vocab_size, bias=False), dec.arch)
        if self.cfg.tie_embeddings:
            if tie_to is None or tie_to.weight.shape != self.lm_head.weight.shape:
                have = "none" if tie_to is None else str(tuple(tie_to.weight.shape))
                raise UserError(
                    f"model.tie_embeddings: the lm_head {tuple(self.lm_head.weight.shape)} can only be "
                    f"tied to a token embedding of the same shape; this {self.kind}'s is {have}; "
                    "set tie_embeddings: false or make encoder.d_model equal decoder.d_model"
                )
            self.lm_head.weight = tie_to.weight

    # -- Hugging Face Hub folders (memtrain.hub) ------------------------------------------------------------
    def save_pretrained(self, out, *, tokenizer, config=None, meta: dict | None = None):
        """Write this model as a Hub folder ``out`` (config.json, model.safetensors, the tokenizer, README.md;
        see :mod:`memtrain.hub`). ``tokenizer``: memtrain's Tokenizer of the model; ``config``: the run config
        (default: a minimal one around ``self.cfg``); ``meta``: the checkpoint's meta.json. Returns ``out``."""
        from memtrain.hub import save_pretrained

        return save_pretrained(self, out, config=config, tokenizer=tokenizer, meta=meta)

    @classmethod
    def from_pretrained(cls, path_or_repo, device="cpu", revision: str | None = None):
        """The model of a Hub folder or Hub repository id (see :mod:`memtrain.hub`), in eval mode on
        ``device``; :class:`UserError` when it is not a memtrain export or not of this class."""
        from memtrain.hub import CONFIG_FILE, load_pretrained

        loaded = load_pretrained(path_or_repo, device, revision)
        if not isinstance(loaded.model, cls):
            raise UserError(
                f"{loaded.folder / CONFIG_FILE}: holds a {type(loaded.model).__name__}, not a {cls.__name__}; "
                "load it with MemtrainModel.from_pretrained"
            )
        return loaded.model

    def push_to_hub(self, repo_id: str, *, tokenizer, config=None, private: bool | None = None, token=None) -> str:
        """:meth:`save_pretrained` into a temporary folder and upload it to the Hub repository ``repo_id``
        (needs a network connection and a write token); returns the commit URL."""
        from memtrain.hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, tokenizer=tokenizer, config=config)

    @property
    def chunk_span(self) -> int:
        """Row positions per chunk of the rows this model reads: L (``cfg.chunk_len``); a memory model with an
        HF decoder reads dual rows and overrides it."""
        return self.cfg.chunk_len

    # -- outputs ------------------------------------------------------------------------------------------
    def decoder_output(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder stack's output -> hidden [B, T, d] aligned with :meth:`align_labels` (the same tensor,
        except for the memory model, whose decoder rows are chunks)."""
        return h

    def standard_head(self) -> bool:
        """Whether :meth:`logits` is this class's ``lm_head(norm(h))`` (a subclass with its own head is not),
        so a fused linear + cross-entropy may replace it."""
        return type(self).logits is MemtrainModel.logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] (final norm if cfg.final_norm, then lm_head)."""
        return self.lm_head(self.norm(hidden))

    def align_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """targets [B, T] (what each sequence position is; -100 = ignore) -> labels [B, T] for hidden[:, t].

        Autoencoder: labels = targets (overridden by the memory model and the causal LM).
        """
        return targets

    def _check_ids(self, input_ids: torch.Tensor, length: int) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] != length:
            raise ValueError(f"{self.kind} model expects input_ids [B, {length}], got {list(input_ids.shape)}")

    # -- groups and freezing ------------------------------------------------------------------------------
    def _group_modules(self) -> dict[str, Sequence[nn.Module]]:
        raise NotImplementedError

    def module_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"encoder", "decoder", "embeddings", "head"} -> parameters (groups may overlap, may be empty)."""
        groups = {}
        for name, modules in self._group_modules().items():
            seen: dict[int, nn.Parameter] = {}
            for m in modules:
                for p in m.parameters():
                    seen.setdefault(id(p), p)
            groups[name] = list(seen.values())
        return groups

    def freeze(self, groups: list[str]) -> None:
        """requires_grad = False for every parameter of ``groups``, True for every other parameter."""
        unknown = set(groups) - set(MODULE_GROUPS)
        if unknown:
            raise ValueError(f"unknown module groups {sorted(unknown)}; valid: {list(MODULE_GROUPS)}")
        frozen = {id(p) for g, params in self.module_groups().items() if g in groups for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) not in frozen)

    # -- encoder ------------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Memories of ``input_ids`` (see subclasses). The causal LM has no encoder: TypeError."""
        raise TypeError(f"a {self.kind} model has no encoder")

    def encoder_frozen(self) -> bool:
        """True when the model has an encoder and none of its parameters requires grad (it then runs under
        torch.no_grad(), its own embedding included)."""
        encoder = getattr(self, "encoder", None)
        return encoder is not None and not any(p.requires_grad for p in encoder.parameters())

    def _run_encoder(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [N, L] -> memories [N, e], without autograd when the encoder is frozen."""
        ctx = torch.no_grad() if self.encoder_frozen() else contextlib.nullcontext()
        with ctx:
            return cast(nn.Module, self.encoder)(chunks)

    def load_encoder_state(self, state_dict: dict[str, torch.Tensor], source_kind: str) -> None:
        """Copy the encoder of another model's full state dict into this model's encoder and check it fits.

        ``source_kind``: ``autoencoder`` or ``memory`` (their ``encoder.*``: embedding, blocks, final norm,
        bottleneck), or ``clm``: a causal LM's embedding, decoder stack and final norm become the encoder
        (``wte`` -> ``wte``, ``decoder.blocks.*`` -> ``blocks.*``, ``norm`` -> ``norm``; a tied LM head
        supplies the embedding). A causal LM's every prefix is a context it was trained on, so a mixer LM of
        context T loads into an encoder of L <= T positions: the first L rows and columns of each
        position-specific mixing weight, which computes exactly what the LM computes at positions 0..L-1.
        Raises UserError naming any missing, unexpected or mis-shaped parameter. Does not freeze anything
        (call ``freeze(["encoder"])``).
        """
        src = encoder_state_from(state_dict, source_kind)
        encoder: nn.Module | None = getattr(self, "encoder", None)
        if encoder is None:
            raise UserError(f"frozen encoder: this {self.kind} model has no encoder (model.no_memory is true?)")
        prefix = "encoder."
        own = encoder.state_dict()
        if source_kind == "clm":
            src = {k: _position_prefix(k, v, own.get(k)) for k, v in src.items()}
        missing = sorted(set(own) - set(src))
        unexpected = sorted(set(src) - set(own))
        if missing or unexpected:
            raise UserError(
                f"frozen encoder: the {source_kind} checkpoint's encoder does not fit this model's encoder "
                f"(missing: {[prefix + k for k in missing][:5]}, "
                f"unexpected: {[prefix + k for k in unexpected][:5]}); "
                "check model.encoder (arch, n_layers, n_heads), model.compression and model.final_norm"
            )
        for key, value in src.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise UserError(
                    f"frozen encoder: parameter {prefix}{key} has shape {tuple(value.shape)} in the {source_kind} "
                    f"checkpoint but {tuple(own[key].shape)} in this model; check model.encoder, model.chunk_len "
                    "and the vocabulary"
                )
        encoder.load_state_dict(src)


#: model kinds whose checkpoints hold something that can serve as a :class:`ChunkEncoder`
ENCODER_SOURCES = ("autoencoder", "memory", "clm")


def encoder_state_from(state_dict: dict[str, torch.Tensor], source_kind: str) -> dict[str, torch.Tensor]:
    """The parameters of a ``source_kind`` model's full state dict that form a :class:`ChunkEncoder`, named as
    in ``ChunkEncoder.state_dict()`` (``wte.weight``, ``blocks.{i}.*``, ``norm.*``, ``down.*``, ``up.*``).

    ``module.`` / ``_orig_mod.`` wrappers (DDP, torch.compile) are stripped. For a causal LM, whose tied LM
    head is stored in place of its embedding, ``lm_head.weight`` stands in for ``wte.weight``. Raises
    UserError for a kind without an encoder, or a state dict without encoder parameters.
    """
    if source_kind not in ENCODER_SOURCES:
        raise UserError(
            f"frozen encoder: a checkpoint of kind {source_kind!r} has no encoder; "
            f"use a checkpoint of kind {', '.join(ENCODER_SOURCES)}"
        )
    clean = {}
    for key, value in state_dict.items():
        for wrap in ("module.", "_orig_mod."):
            key = key.removeprefix(wrap)
        clean[key] = value
    src = {}
    if source_kind == "clm":
        renames = (("wte.", "wte."), ("decoder.blocks.", "blocks."), ("norm.", "norm."))
        for key, value in clean.items():
            for old, new in renames:
                if key.startswith(old):
                    src[new + key[len(old) :]] = value
        if "wte.weight" not in src and "lm_head.weight" in clean:
            src["wte.weight"] = clean["lm_head.weight"]
    else:
        src = {k[len("encoder.") :]: v for k, v in clean.items() if k.startswith("encoder.")}
    if not src:
        raise UserError(
            f"frozen encoder: the {source_kind} checkpoint holds no encoder parameters "
            "(a memory model trained with model.no_memory: true has none)"
        )
    return src


def _position_prefix(key: str, value: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """A mixer's position-specific mixing ``weight [.., T, T, k]`` / ``bias [.., T]`` cut to the first L
    positions of ``own`` (shape [.., L, L, k] / [.., L]) when T > L; anything else is returned unchanged."""
    if own is None or own.dim() != value.dim() or not key.endswith(("conv.weight", "conv.bias")):
        return value
    if key.endswith("conv.weight"):
        L = own.shape[-2]
        if value.shape[-2] > L and value.shape[-3] == value.shape[-2]:
            return value[..., :L, :L, :]
        return value
    L = own.shape[-1]
    return value[..., :L] if value.shape[-1] > L else value
