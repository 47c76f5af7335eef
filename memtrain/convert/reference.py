"""Checkpoints of the paper's reference code -> memtrain checkpoints.

The reference saves the state dict of one class (docs/reference.md §3.3 gives names and shapes):

=========================  ===================================================================================
``autoencoding-mixer``     ``AutoencodingMixer``: ``wte``, ``encoderblocks.{i}``, ``decoderblocks.{i}``,
                           ``lm_head``, ``projection`` (+ ``down``, ``up``) -> memtrain ``kind: autoencoder``
``language-mixer``         ``LanguageMixer``: ``wte``, ``mixerblocks.{i}``, ``lm_head`` -> ``kind: clm`` with a
                           mixer decoder over one chunk of L tokens
``variable-memory-mixer``  ``VariableMemoryMixer``: ``wte``, ``encoderblocks.{i}``, ``decoder_wte``,
                           ``decoderblocks.{i}`` (L + C positions), ``decoder_proj``, ``lm_head`` (+ ``down``,
                           ``up``) -> ``kind: memory``
=========================  ===================================================================================

The bottleneck (``compression = c > 1``, docs/reference.md §3.1 and §4.1; the ``VariableMemoryMixer`` default is
4): ``down = Linear(e, e//c)`` and ``up = Linear(e//c, e)`` with biases, applied to the memory before
``decoder_proj`` and before the unroll or repeat, exactly where memtrain's ``ChunkEncoder`` applies its
``down`` / ``up``; they map to ``encoder.down`` / ``encoder.up`` and ``model.compression`` is read from their
shapes. memtrain needs c to divide e, so a bottleneck width that does not divide e is refused.

Blocks map name for name (memtrain's mixer block keeps the reference's names: ``seq_layernorm``,
``conv.weight`` [L, L, k], ``conv.bias`` [L], ``patch_layernorm``, ``patch_ff.0``/``patch_ff.2``). The
multi-head form's per-head ``conv.proj_head.{h}`` (Linear(d, d/H)) become the rows h*d/H.. of memtrain's one
``conv.proj`` (Linear(d, d)), and ``conv.convs.{h}`` become ``conv.weight[h]`` / ``conv.bias[h]``.

The reference masks its mixing weights by overwriting them with their lower triangle at every forward, after
the optimizer has written into the upper triangle, so saved weights carry a non-zero upper triangle
(docs/reference.md §1.2): every mixing weight is masked to its causal part (per tap) here.
The reference has no final norm (``final_norm: false``) and untied embeddings; ``projection`` exists in every
``AutoencodingMixer`` and is dropped when the model repeats its memory instead of unrolling it. What shapes
cannot tell (repeat or unroll, which encoder position is the memory) comes from the command's hints.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from memtrain.config import Config, config_from_dict
from memtrain.convert.common import load_strict, output_dir, write_memtrain_checkpoint
from memtrain.errors import UserError
from memtrain.kernels.reference import causal_weight  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)

ARCHS = ("autoencoding-mixer", "language-mixer", "variable-memory-mixer")


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference ``model.safetensors`` (a file, or the HF-Trainer folder holding one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise UserError(f"{p}: not found (expected the reference checkpoint's model.safetensors)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{p}: not a readable safetensors file ({exc})") from None


def _blocks(state: dict, prefix: str) -> int:
    """Number of blocks ``prefix.{i}.*`` (0 if none); they must be numbered 0..n-1."""
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if ids and ids != set(range(len(ids))):
        raise UserError(f"blocks {prefix}.* are not numbered 0..{len(ids) - 1} (found {sorted(ids)})")
    return len(ids)


def _need(state: dict, key: str, arch: str) -> torch.Tensor:
    if key not in state:
        found = sorted({k.split(".")[0] for k in state})
        raise UserError(
            f"reference checkpoint: no '{key}', which every {arch} has (top-level names found: "
            f"{', '.join(found)}); check --arch"
        )
    return state[key]


def _stack_config(state: dict, prefix: str, arch: str) -> tuple[dict, int]:
    """A memtrain mixer StackConfig dict from the blocks ``prefix.{i}``, and the positions L they mix."""
    n = _blocks(state, prefix)
    if n == 0:
        raise UserError(f"reference checkpoint: no {prefix}.* blocks, which every {arch} has; check --arch")
    d = _need(state, f"{prefix}.0.seq_layernorm.weight", arch).shape[0]
    ff = _need(state, f"{prefix}.0.patch_ff.0.weight", arch).shape[0]
    if f"{prefix}.0.conv.weight" in state:
        heads, w = 0, state[f"{prefix}.0.conv.weight"]
    else:
        heads = _blocks(state, f"{prefix}.0.conv.convs")
        w = _need(state, f"{prefix}.0.conv.convs.0.weight", arch)
    if w.dim() != 3 or w.shape[0] != w.shape[1]:
        raise UserError(
            f"reference checkpoint: {prefix}.0 mixing weight has shape {tuple(w.shape)}, expected [L, L, k]"
        )
    return {
        "arch": "mixer",
        "d_model": d,
        "n_layers": n,
        "kernel": int(w.shape[2]),
        "n_heads": heads,
        "ffn_mult": ff // d,
    }, int(w.shape[0])


def _map_blocks(state: dict, src: str, dst: str, heads: int, out: dict) -> set[str]:
    """Copy the blocks ``src.{i}.*`` to ``dst.{i}.*`` (mixing weights masked causal); returns keys used."""
    used = set()
    for key, value in state.items():
        m = re.match(rf"{re.escape(src)}\.(\d+)\.(.+)$", key)
        if not m:
            continue
        i, rest = m.groups()
        used.add(key)
        if rest == "conv.weight":
            out[f"{dst}.{i}.conv.weight"] = causal_weight(value)
        elif rest.startswith("conv.proj_head.") or rest.startswith("conv.convs."):
            continue  # gathered per block below
        else:
            out[f"{dst}.{i}.{rest}"] = value
    for i in range(_blocks(state, src) if heads else 0):
        p = f"{src}.{i}.conv"
        for h in range(heads):
            for part in ("proj_head", "convs"):
                for kind in ("weight", "bias"):
                    key = f"{p}.{part}.{h}.{kind}"
                    if key not in state:
                        raise UserError(f"reference checkpoint: no '{key}' (block {i} has {heads} heads)")
                    used.add(key)
        out[f"{dst}.{i}.conv.proj.weight"] = torch.cat([state[f"{p}.proj_head.{h}.weight"] for h in range(heads)])
        out[f"{dst}.{i}.conv.proj.bias"] = torch.cat([state[f"{p}.proj_head.{h}.bias"] for h in range(heads)])
        out[f"{dst}.{i}.conv.weight"] = causal_weight(
            torch.stack([state[f"{p}.convs.{h}.weight"] for h in range(heads)])
        )
        out[f"{dst}.{i}.conv.bias"] = torch.stack([state[f"{p}.convs.{h}.bias"] for h in range(heads)])
    return used


#: the bottleneck's tensors in the reference (``down = Linear(e, e//c)``, ``up = Linear(e//c, e)``)
_BOTTLENECK = ("down.weight", "down.bias", "up.weight", "up.bias")


def _bottleneck(state: dict, e: int) -> tuple[int, dict[str, str]]:
    """(compression c, reference key -> memtrain key) of the memory bottleneck; (1, {}) when there is none.

    Every shape is checked against the encoder width ``e``: down.weight (e/c, e), down.bias (e/c,),
    up.weight (e, e/c), up.bias (e,), with an integer c > 1 (memtrain's model.compression must divide e).
    """
    present = [k for k in _BOTTLENECK if k in state]
    if not present:
        return 1, {}
    missing = [k for k in _BOTTLENECK if k not in state]
    if missing:
        raise UserError(
            f"reference checkpoint: has {', '.join(present)} but no {', '.join(missing)}; a reference "
            "bottleneck (compression > 1) is down = Linear(e, e/c) and up = Linear(e/c, e), with biases"
        )
    w = state["down.weight"]
    if w.dim() != 2 or w.shape[1] != e:
        raise UserError(
            f"reference checkpoint: down.weight has shape {tuple(w.shape)}, expected (e/c, e) with the "
            f"encoder width e = {e} (the memory bottleneck down = Linear(e, e/c))"
        )
    r = int(w.shape[0])
    if not 0 < r < e or e % r:
        widths = [str(e // c) for c in range(2, e + 1) if e % c == 0]
        ref_c = [c for c in range(2, e + 1) if e // c == r]  # the reference's width is e // c, c not dividing e
        was = f" (= {e} // {ref_c[0]})" if ref_c else ""
        raise UserError(
            f"reference checkpoint: down.weight has shape {tuple(w.shape)}, a bottleneck of width {r}{was} "
            f"on memories of width {e}; memtrain supports only widths e/c with an integer "
            f"model.compression c > 1 dividing e = {e} ({', '.join(widths[:8])}"
            f"{', ...' if len(widths) > 8 else ''})"
        )
    for key, shape in (("down.bias", (r,)), ("up.weight", (e, r)), ("up.bias", (e,))):
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"reference checkpoint: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                f"for the bottleneck down.weight {tuple(w.shape)} (compression {e // r} of width {e})"
            )
    return e // r, {k: f"encoder.{k}" for k in _BOTTLENECK}


def _model_config(arch: str, state: dict, injection: str, memory_position: int) -> tuple[dict, dict[str, str]]:
    """(the ``model`` section, reference key -> memtrain key for the non-block tensors)."""
    if arch == "language-mixer":
        dec, L = _stack_config(state, "mixerblocks", arch)
        vocab = _need(state, "wte.weight", arch).shape[0]
        model = {"kind": "clm", "vocab_size": vocab, "chunk_len": L, "n_chunks": 1, "decoder": dec}
        return model, {"wte.weight": "wte.weight", "lm_head.weight": "lm_head.weight"}
    enc, L = _stack_config(state, "encoderblocks", arch)
    dec, L_dec = _stack_config(state, "decoderblocks", arch)
    vocab = _need(state, "wte.weight", arch).shape[0]
    compression, bottleneck = _bottleneck(state, enc["d_model"])
    common = {
        "vocab_size": vocab,
        "chunk_len": L,
        "encoder": enc,
        "decoder": dec,
        "memory_position": memory_position,
        "compression": compression,
    }
    if arch == "autoencoding-mixer":
        if L_dec != L:
            raise UserError(
                f"reference checkpoint: decoder blocks mix {L_dec} positions, the encoder's {L}; an "
                "AutoencodingMixer has one length (is this a variable-memory-mixer?)"
            )
        names = {"wte.weight": "encoder.wte.weight", "lm_head.weight": "lm_head.weight", **bottleneck}
        if injection == "unroll":
            names.update({"projection.weight": "projection.weight", "projection.bias": "projection.bias"})
        return dict(common, kind="autoencoder", n_chunks=1, injection=injection), names
    n_chunks = L_dec - L
    if n_chunks < 2:
        raise UserError(
            f"reference checkpoint: decoder blocks mix {L_dec} positions for chunks of {L}; a "
            "VariableMemoryMixer's decoder mixes L + n_chunks (n_chunks >= 2) positions"
        )
    names = {
        "wte.weight": "encoder.wte.weight",
        "decoder_wte.weight": "decoder_wte.weight",
        "lm_head.weight": "lm_head.weight",
        **bottleneck,
    }
    if enc["d_model"] != dec["d_model"]:
        names.update({"decoder_proj.weight": "decoder_proj.weight", "decoder_proj.bias": "decoder_proj.bias"})
    return dict(common, kind="memory", n_chunks=n_chunks), names


#: top-level names of each reference class's state dict (docs/reference.md §3.3), bottleneck included
_TOP_LEVEL = {
    "autoencoding-mixer": {"wte", "encoderblocks", "decoderblocks", "lm_head", "projection", "down", "up"},
    "language-mixer": {"wte", "mixerblocks", "lm_head"},
    "variable-memory-mixer": {
        "wte",
        "decoder_wte",
        "encoderblocks",
        "decoderblocks",
        "decoder_proj",
        "lm_head",
        "down",
        "up",
    },
}

#: reference tensors that exist but that the reference never uses in the converted configuration
_UNUSED = {"projection.weight", "projection.bias"}


def reference_to_memtrain(
    state: dict[str, torch.Tensor],
    arch: str,
    injection: str = "unroll",
    memory_position: int = -1,
    shards: str | None = None,
) -> tuple[Config, dict]:
    """(run config, memtrain state dict) for a reference state dict of class ``arch`` (see :data:`ARCHS`)."""
    if arch not in ARCHS:
        raise UserError(f"--arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    model, names = _model_config(arch, state, injection, memory_position)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for src, dst in names.items():
        out[dst] = _need(state, src, arch)
        used.add(src)
    if arch == "language-mixer":
        used |= _map_blocks(state, "mixerblocks", "decoder.blocks", model["decoder"]["n_heads"], out)
    else:
        used |= _map_blocks(state, "encoderblocks", "encoder.blocks", model["encoder"]["n_heads"], out)
        used |= _map_blocks(state, "decoderblocks", "decoder.blocks", model["decoder"]["n_heads"], out)
    left = sorted(set(state) - used - _UNUSED)
    if left:
        found = ", ".join(f"{k} {tuple(state[k].shape)}" for k in left[:3]) + (
            f" and {len(left) - 3} more" if len(left) > 3 else ""
        )
        tops = {k.split(".")[0] for k in left}
        others = [a for a in ARCHS if a != arch and tops <= _TOP_LEVEL[a]]
        if not tops <= _TOP_LEVEL[arch] and others:
            hint = f"they belong to a {' or '.join(others)}: check --arch"
        else:
            mapped = sorted({k.split(".")[0] for k in used})
            hint = (
                f"memtrain maps only {', '.join(mapped)} of a {arch} (docs/reference.md §3.3); this variant is "
                "not supported"
            )
        raise UserError(
            f"reference checkpoint: {found} have no place in a memtrain {model['kind']} model converted "
            f"from {arch}; {hint}"
        )
    raw = {
        "run": {"name": f"reference-{arch}"},
        "model": dict(model, final_norm=False, tie_embeddings=False),
        "objective": {"weights": {"reconstruction": 1.0} if model["kind"] == "autoencoder" else {"causal": 1.0}},
    }
    if shards:
        raw["data"] = {"shards": shards}
    return config_from_dict(raw, source=f"the {arch} converted config"), out


def convert_reference(
    path: str | Path,
    arch: str,
    out: str | Path,
    injection: str = "unroll",
    memory_position: int = -1,
    shards: str | None = None,
) -> Path:
    """Write a memtrain checkpoint folder ``out`` from the reference checkpoint ``path``. Returns ``out``."""
    from memtrain.models import build_model

    state = read_reference(path)
    cfg, converted = reference_to_memtrain(state, arch, injection, memory_position, shards)
    assert cfg.model.vocab_size is not None  # the converted config takes it from the embedding's shape
    model = build_model(cfg.model, cfg.model.vocab_size)
    load_strict(model, converted, str(path))
    meta = {
        "kind": cfg.model.kind,
        "vocab_size": cfg.model.vocab_size,
        "tokenizer_sha256": None,
        "special_ids": {},
        "row_len": cfg.model.seq_len,
        "step": 0,
        "engine": {"name": "reference", "arch": arch, "from": str(path)},
    }
    with output_dir(Path(out)) as tmp:
        write_memtrain_checkpoint(tmp, model, cfg, meta)
    return Path(out)
