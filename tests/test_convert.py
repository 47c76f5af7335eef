"""Conversions: the paper's reference checkpoints -> memtrain (checked against a direct computation of the
reference maths on the documented state-dict layouts, with garbage in the saved upper triangles), and a
memtrain transformer causal LM -> Hugging Face LlamaForCausalLM (same logits after from_pretrained).

The reference state dicts are built here from the names and shapes of docs/reference.md §3.3; the reference
forward below is written from docs/reference.md §1.1-§1.5, §3.1 and §4.1 (sequence positions
as the channels of a 'same'-padded Conv1d whose weight is masked lower-triangular per tap, pre-norm blocks,
last-position memories, unrolled or repeated, zero pad slots, no final norm)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memtrain.cli import main
from memtrain.config import config_from_dict, dump_config
from memtrain.convert.hf import hf_name
from memtrain.engine import checkpoint as ckpt
from memtrain.engine.checkpoint import load_model
from memtrain.models import build_model

V = 40
#: PyTorch notes that 'same' padding with an even kernel copies the input: the reference's own op
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# ----------------------------------------------------------------------------------------------------
# reference layouts and maths


def mixer_block_state(prefix: str, d: int, L: int, k: int, heads: int, gen: torch.Generator) -> dict:
    """One reference MixerBlock's tensors; mixing weights have a non-zero upper triangle, as saved."""

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=gen) * scale

    s = {
        f"{prefix}.seq_layernorm.weight": 1 + r(d, scale=0.1),
        f"{prefix}.seq_layernorm.bias": r(d, scale=0.1),
        f"{prefix}.patch_layernorm.weight": 1 + r(d, scale=0.1),
        f"{prefix}.patch_layernorm.bias": r(d, scale=0.1),
        f"{prefix}.patch_ff.0.weight": r(4 * d, d),
        f"{prefix}.patch_ff.0.bias": r(4 * d),
        f"{prefix}.patch_ff.2.weight": r(d, 4 * d, scale=0.1),
        f"{prefix}.patch_ff.2.bias": r(d),
    }
    if heads == 0:
        s[f"{prefix}.conv.weight"] = r(L, L, k)
        s[f"{prefix}.conv.bias"] = r(L)
    else:
        for h in range(heads):
            s[f"{prefix}.conv.proj_head.{h}.weight"] = r(d // heads, d)
            s[f"{prefix}.conv.proj_head.{h}.bias"] = r(d // heads)
            s[f"{prefix}.conv.convs.{h}.weight"] = r(L, L, k)
            s[f"{prefix}.conv.convs.{h}.bias"] = r(L)
        s[f"{prefix}.conv.out_proj.weight"] = r(d, d)
        s[f"{prefix}.conv.out_proj.bias"] = r(d)
    return s


def ref_tril(w: torch.Tensor) -> torch.Tensor:
    """The reference's mask: tril over (out_pos, in_pos) of every tap ('f d p -> p f d', tril, back)."""
    return torch.stack([torch.tril(w[:, :, j]) for j in range(w.shape[2])], dim=2)


def ref_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d(L, L, k, padding='same') over x [B, L, f] with the masked weight."""
    return F.conv1d(x, ref_tril(w), b, padding="same")


def ref_block(s: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    d = x.shape[-1]
    y = F.layer_norm(x, (d,), s[f"{prefix}.seq_layernorm.weight"], s[f"{prefix}.seq_layernorm.bias"], 1e-5)
    if heads == 0:
        y = ref_conv(y, s[f"{prefix}.conv.weight"], s[f"{prefix}.conv.bias"])
    else:
        outs = [
            ref_conv(
                F.linear(y, s[f"{prefix}.conv.proj_head.{h}.weight"], s[f"{prefix}.conv.proj_head.{h}.bias"]),
                s[f"{prefix}.conv.convs.{h}.weight"],
                s[f"{prefix}.conv.convs.{h}.bias"],
            )
            for h in range(heads)
        ]
        y = F.linear(torch.cat(outs, -1), s[f"{prefix}.conv.out_proj.weight"], s[f"{prefix}.conv.out_proj.bias"])
    x = x + y
    z = F.layer_norm(x, (d,), s[f"{prefix}.patch_layernorm.weight"], s[f"{prefix}.patch_layernorm.bias"], 1e-5)
    z = F.linear(
        F.gelu(F.linear(z, s[f"{prefix}.patch_ff.0.weight"], s[f"{prefix}.patch_ff.0.bias"])),
        s[f"{prefix}.patch_ff.2.weight"],
        s[f"{prefix}.patch_ff.2.bias"],
    )
    return x + z


def ref_stack(s: dict, name: str, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    for i in range(depth):
        x = ref_block(s, f"{name}.{i}", x, heads)
    return x


def bottleneck_state(e: int, compression: int, gen: torch.Generator) -> dict:
    """The reference's optional bottleneck (compression > 1): down = Linear(e, e//c), up = Linear(e//c, e)."""
    if compression <= 1:
        return {}
    r = e // compression
    return {
        "down.weight": torch.randn(r, e, generator=gen) * 0.3,
        "down.bias": torch.randn(r, generator=gen) * 0.1,
        "up.weight": torch.randn(e, r, generator=gen) * 0.3,
        "up.bias": torch.randn(e, generator=gen) * 0.1,
    }


def ref_bottleneck(s: dict, m: torch.Tensor) -> torch.Tensor:
    """``up(down(m))`` when the reference was built with compression > 1, else m (docs/reference.md §3.1)."""
    if "down.weight" not in s:
        return m
    return F.linear(F.linear(m, s["down.weight"], s["down.bias"]), s["up.weight"], s["up.bias"])


def autoencoding_mixer(d, L, k, heads, depth, gen, compression: int = 1) -> dict:
    s = {
        "wte.weight": torch.randn(V, d, generator=gen),
        "lm_head.weight": torch.randn(V, d, generator=gen) * 0.2,
        "projection.weight": torch.randn(d, d // 2, generator=gen) * 0.2,
        "projection.bias": torch.randn(d, generator=gen) * 0.1,
    }
    for i in range(depth):
        s.update(mixer_block_state(f"encoderblocks.{i}", d, L, k, heads, gen))
        s.update(mixer_block_state(f"decoderblocks.{i}", d, L, k, heads, gen))
    s.update(bottleneck_state(d, compression, gen))
    return s


def ref_autoencoder(s: dict, ids: torch.Tensor, depth: int, heads: int, unroll: bool) -> torch.Tensor:
    """AutoencodingMixer.forward: logits [B, L, V] (docs/reference.md §3.1)."""
    L = ids.shape[1]
    x = ref_stack(s, "encoderblocks", s["wte.weight"][ids], depth, heads)
    e = ref_bottleneck(s, x[:, -1, :])  # [B, d]
    d = e.shape[-1]
    if unroll:  # cyclic windows e[(t mod d) : (t mod d) + d/2], then Linear(d/2, d)
        windows = torch.stack([torch.cat([e, e], dim=1)[:, t % d : t % d + d // 2] for t in range(L)], dim=1)
        x = F.linear(windows, s["projection.weight"], s["projection.bias"])
    else:
        x = e.unsqueeze(1).repeat(1, L, 1)
    x = ref_stack(s, "decoderblocks", x, depth, heads)
    return F.linear(x, s["lm_head.weight"])


def variable_memory_mixer(e, d, L, C, k, heads, depth, gen, compression: int = 1) -> dict:
    """VariableMemoryMixer: encoder e wide (k taps, heads), decoder d wide over L + C positions (one tap)."""
    s = {
        "wte.weight": torch.randn(V, e, generator=gen),
        "decoder_wte.weight": torch.randn(V, d, generator=gen),
        "lm_head.weight": torch.randn(V, d, generator=gen) * 0.2,
    }
    if e != d:
        s.update(
            {
                "decoder_proj.weight": torch.randn(d, e, generator=gen) * 0.3,
                "decoder_proj.bias": torch.randn(d, generator=gen) * 0.1,
            }
        )
    for i in range(depth):
        s.update(mixer_block_state(f"encoderblocks.{i}", e, L, k, heads, gen))
        s.update(mixer_block_state(f"decoderblocks.{i}", d, L + C, 1, 0, gen))
    s.update(bottleneck_state(e, compression, gen))
    return s


def ref_memory_mixer(s: dict, ids: torch.Tensor, L: int, C: int, depth: int, heads: int) -> list[torch.Tensor]:
    """VariableMemoryMixer.forward chunk by chunk (docs/reference.md §4.1): per chunk c the decoder's logits
    [B, C + L, V]; decoder position C + j (j < L-1) predicts token j + 1 of chunk c."""
    B, d = ids.shape[0], s["decoder_wte.weight"].shape[1]
    memories = []  # one memory per chunk 0..C-2: last position, then the bottleneck, then decoder_proj
    for c in range(C - 1):
        h = ref_stack(s, "encoderblocks", s["wte.weight"][ids[:, c * L : (c + 1) * L]], depth, heads)
        m = ref_bottleneck(s, h[:, -1])
        if "decoder_proj.weight" in s:
            m = F.linear(m, s["decoder_proj.weight"], s["decoder_proj.bias"])
        memories.append(m)
    out = []
    for c in range(C):
        slots = [memories[j] if j < c else torch.zeros(B, d) for j in range(C)]  # zero pad slots
        x = torch.cat([torch.stack(slots, 1), s["decoder_wte.weight"][ids[:, c * L : (c + 1) * L]]], dim=1)
        out.append(F.linear(ref_stack(s, "decoderblocks", x, depth, 0), s["lm_head.weight"]))
    return out


def convert(tmp_path, state: dict, arch: str, *flags: str):
    src = tmp_path / f"{arch}.safetensors"
    save_file(state, str(src))
    out = tmp_path / f"{arch}-memtrain"
    assert main(["convert", "reference", str(src), "--arch", arch, "--out", str(out), *flags]) == 0
    model, cfg, meta = load_model(out, torch.device("cpu"))
    return model, cfg, load_file(str(out / "model.safetensors"))


def assert_causal_mixing(converted: dict) -> None:
    """Every mixing weight of the converted file is zero above the diagonal, for every tap and head."""
    mixing = [k for k in converted if k.endswith("conv.weight")]
    assert mixing
    for key in mixing:
        w = converted[key]
        L = w.shape[-2]
        upper = torch.ones(L, L, dtype=torch.bool).triu(1)
        assert torch.all(w.movedim(-1, -3)[..., upper] == 0), key


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, k, injection", [(0, 1, "unroll"), (2, 4, "repeat"), (2, 3, "unroll")])
def test_autoencoding_mixer_converts_and_reconstructs_like_the_reference(tmp_path, heads, k, injection):
    gen = torch.Generator().manual_seed(heads * 10 + k)
    d, L, depth = 16, 8, 2
    state = autoencoding_mixer(d, L, k, heads, depth, gen)
    model, cfg, converted = convert(tmp_path, state, "autoencoding-mixer", "--injection", injection)
    assert cfg.model.kind == "autoencoder" and cfg.model.final_norm is False
    assert (cfg.model.chunk_len, cfg.model.encoder.kernel, cfg.model.encoder.n_heads) == (L, k, heads)
    assert_causal_mixing(converted)
    assert ("projection.weight" in converted) == (injection == "unroll")  # unused in a repeat model: dropped
    ids = torch.randint(0, V, (3, L), generator=gen)
    with torch.no_grad():
        expect = ref_autoencoder(state, ids, depth, heads, unroll=injection == "unroll")
        got = model.logits(model(ids))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


def test_language_mixer_converts_to_a_clm_with_the_same_next_token_logits(tmp_path):
    gen = torch.Generator().manual_seed(7)
    d, L, depth = 16, 12, 3
    state = {"wte.weight": torch.randn(V, d, generator=gen), "lm_head.weight": torch.randn(V, d, generator=gen) * 0.2}
    for i in range(depth):
        state.update(mixer_block_state(f"mixerblocks.{i}", d, L, 1, 0, gen))
    model, cfg, converted = convert(tmp_path, state, "language-mixer")
    assert cfg.model.kind == "clm" and cfg.model.seq_len == L and cfg.model.decoder.n_layers == depth
    assert_causal_mixing(converted)
    ids = torch.randint(0, V, (2, L), generator=gen)
    with torch.no_grad():
        expect = F.linear(ref_stack(state, "mixerblocks", state["wte.weight"][ids], depth, 0), state["lm_head.weight"])
        got = model.logits(model(ids))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    # the garbage upper triangle really was in the file, and it would change the logits if it were used
    assert state["mixerblocks.0.conv.weight"][:, :, 0].triu(1).abs().sum() > 0
    with torch.no_grad():
        leaky = dict(
            converted,
            **{f"decoder.blocks.{i}.conv.weight": state[f"mixerblocks.{i}.conv.weight"] for i in range(depth)},
        )
        unmasked = F.conv1d(
            F.layer_norm(
                state["wte.weight"][ids],
                (d,),
                state["mixerblocks.0.seq_layernorm.weight"],
                state["mixerblocks.0.seq_layernorm.bias"],
            ),
            leaky["decoder.blocks.0.conv.weight"],
            state["mixerblocks.0.conv.bias"],
        )
        masked = ref_conv(
            F.layer_norm(
                state["wte.weight"][ids],
                (d,),
                state["mixerblocks.0.seq_layernorm.weight"],
                state["mixerblocks.0.seq_layernorm.bias"],
            ),
            state["mixerblocks.0.conv.weight"],
            state["mixerblocks.0.conv.bias"],
        )
    assert not torch.allclose(unmasked, masked)


def test_variable_memory_mixer_converts_with_its_chunked_memories(tmp_path):
    """VariableMemoryMixer (encoder 16 wide with k=4 taps and 2 heads, decoder 24 wide, 3 chunks of 6): the
    reference runs chunk by chunk; memtrain folds chunks into the batch; the decoder outputs agree."""
    gen = torch.Generator().manual_seed(3)
    e, d, L, C, depth = 16, 24, 6, 3, 2
    state = variable_memory_mixer(e, d, L, C, 4, 2, depth, gen)
    model, cfg, converted = convert(tmp_path, state, "variable-memory-mixer")
    assert cfg.model.kind == "memory" and (cfg.model.chunk_len, cfg.model.n_chunks) == (L, C)
    assert cfg.model.compression == 1 and "encoder.down.weight" not in converted
    assert_causal_mixing(converted)
    ids = torch.randint(0, V, (2, C * L), generator=gen)
    with torch.no_grad():
        expect = ref_memory_mixer(state, ids, L, C, depth, 2)
        got = model.logits(model(ids))  # [B, C*L, V]; position c*L + j predicts token j of chunk c
    for c in range(C):
        torch.testing.assert_close(got[:, c * L + 1 : (c + 1) * L], expect[c][:, C : C + L - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch, e, d, compression",
    [("variable-memory-mixer", 16, 24, 2), ("variable-memory-mixer", 16, 16, 4), ("autoencoding-mixer", 16, 16, 2)],
)
def test_reference_bottleneck_converts_to_compression_with_the_same_logits(tmp_path, arch, e, d, compression):
    """A reference built with compression = c > 1 (the VariableMemoryMixer default is 4) has down = Linear(e, e/c)
    and up = Linear(e/c, e) on its memories: they become memtrain's encoder.down / encoder.up, compression is
    read from their shapes, and the converted model computes the reference's logits."""
    gen = torch.Generator().manual_seed(11 + compression + d)
    L, C, depth, heads = 6, 3, 2, 2
    if arch == "variable-memory-mixer":
        state = variable_memory_mixer(e, d, L, C, 4, heads, depth, gen, compression=compression)
    else:
        state = autoencoding_mixer(d, L, 3, heads, depth, gen, compression=compression)
    assert state["down.weight"].shape == (e // compression, e)
    model, cfg, converted = convert(tmp_path, state, arch)
    assert cfg.model.compression == compression and cfg.model.final_norm is False
    for key in ("down.weight", "down.bias", "up.weight", "up.bias"):
        torch.testing.assert_close(converted[f"encoder.{key}"], state[key], rtol=0, atol=0)
    assert_causal_mixing(converted)
    with torch.no_grad():
        if arch == "variable-memory-mixer":
            ids = torch.randint(0, V, (2, C * L), generator=gen)
            expect = ref_memory_mixer(state, ids, L, C, depth, heads)
            plain = ref_memory_mixer(
                {k: v for k, v in state.items() if not k.startswith(("down.", "up."))}, ids, L, C, depth, heads
            )
            got = model.logits(model(ids))
            for c in range(C):
                torch.testing.assert_close(
                    got[:, c * L + 1 : (c + 1) * L], expect[c][:, C : C + L - 1], rtol=1e-4, atol=1e-4
                )
            expect, plain = torch.stack(expect), torch.stack(plain)
        else:
            ids = torch.randint(0, V, (3, L), generator=gen)
            expect = ref_autoencoder(state, ids, depth, heads, unroll=True)
            plain = ref_autoencoder(
                {k: v for k, v in state.items() if not k.startswith(("down.", "up."))}, ids, depth, heads, unroll=True
            )
            torch.testing.assert_close(model.logits(model(ids)), expect, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expect, plain, rtol=1e-3, atol=1e-3)  # the bottleneck really shapes the logits


def test_unsupported_reference_bottleneck_is_refused_with_what_was_found(tmp_path, capsys):
    """A bottleneck memtrain cannot hold (a width that does not divide e: the reference's e//c with c not
    dividing e) or one whose tensors disagree is refused in one line naming the tensor and its shape, never
    as a wrong --arch."""
    gen = torch.Generator().manual_seed(5)
    base = variable_memory_mixer(16, 24, 6, 3, 1, 0, 1, gen)
    r5 = {
        "down.weight": torch.randn(5, 16),
        "down.bias": torch.randn(5),
        "up.weight": torch.randn(16, 5),
        "up.bias": torch.randn(16),
    }  # VariableMemoryMixer(encoder_dim=16, compression=3): 16 // 3 = 5
    r8 = dict(bottleneck_state(16, 2, gen))
    cases = [
        (r5, "down.weight has shape (5, 16)", "widths e/c with an integer model.compression c > 1 dividing e = 16"),
        (dict(r8, **{"up.weight": torch.randn(16, 4)}), "up.weight has shape (16, 4), expected (16, 8)", ""),
        (dict(r8, **{"down.weight": torch.randn(8, 24)}), "down.weight has shape (8, 24), expected (e/c, e)", "e = 16"),
        ({k: v for k, v in r8.items() if k != "up.bias"}, "but no up.bias", "down = Linear(e, e/c)"),
    ]
    src = tmp_path / "vmm.safetensors"
    for extra, needle, also in cases:
        save_file(dict(base, **extra), str(src))
        capsys.readouterr()
        assert (
            main(["convert", "reference", str(src), "--arch", "variable-memory-mixer", "--out", str(tmp_path / "o")])
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("memtrain: error: ") and needle in err[0] and also in err[0], err
        assert "--arch" not in err[0], err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    # a tensor no reference class of this kind holds is reported with its shape; --arch only when it fits another
    same_width = variable_memory_mixer(16, 16, 6, 3, 1, 0, 1, gen)  # e == d: the reference builds no decoder_proj
    ae = autoencoding_mixer(16, 6, 1, 0, 1, gen)
    for arch, state, needles in [
        (
            "variable-memory-mixer",
            dict(same_width, **{"decoder_proj.weight": torch.randn(16, 16)}),
            ["decoder_proj.weight (16, 16)", "memtrain maps only", "this variant is not supported"],
        ),
        (
            "autoencoding-mixer",
            dict(ae, **{"decoder_wte.weight": torch.randn(V, 16)}),
            [f"decoder_wte.weight ({V}, 16)", "they belong to a variable-memory-mixer: check --arch"],
        ),
    ]:
        save_file(state, str(src))
        capsys.readouterr()
        assert main(["convert", "reference", str(src), "--arch", arch, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert not (tmp_path / "o").exists()


def test_bad_reference_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    state = autoencoding_mixer(16, 8, 1, 0, 1, gen)
    src = tmp_path / "ae.safetensors"
    save_file(state, str(src))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    (tmp_path / "broken.safetensors").write_bytes(b"\0" * 64)
    cases = [
        (["convert", "reference", src, "--arch", "language-mixer", "--out", tmp_path / "o"], "no mixerblocks.* blocks"),
        (["convert", "reference", src, "--arch", "variable-memory-mixer", "--out", tmp_path / "o"], "n_chunks"),
        (
            [
                "convert",
                "reference",
                tmp_path / "nope.safetensors",
                "--arch",
                "language-mixer",
                "--out",
                tmp_path / "o",
            ],
            "not found",
        ),
        (
            [
                "convert",
                "reference",
                tmp_path / "broken.safetensors",
                "--arch",
                "language-mixer",
                "--out",
                tmp_path / "o",
            ],
            "not a readable safetensors file",
        ),
        (["convert", "reference", src, "--arch", "autoencoding-mixer", "--out", tmp_path / "full"], "not an empty"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("memtrain: error: ") and needle in err[0], (needle, err)
    assert not (tmp_path / "o").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    assert not list(tmp_path.glob(".o.tmp-*"))
    state["encoderblocks.0.conv.weight"] = torch.zeros(8, 7, 1)  # not [L, L, k]
    save_file(state, str(src))
    capsys.readouterr()
    assert main(["convert", "reference", str(src), "--arch", "autoencoding-mixer", "--out", str(tmp_path / "o")]) == 2
    assert "expected [L, L, k]" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------
# memtrain -> Hugging Face


def clm_checkpoint(tmp_path, tie: bool = False, eps: float = 1e-5, vocab: int = V):
    raw = {
        "model": {
            "kind": "clm",
            "chunk_len": 8,
            "n_chunks": 2,
            "tie_embeddings": tie,
            "decoder": {
                "arch": "transformer",
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
                "norm_eps": eps,
                "rope_theta": 500.0,
            },
        },
        "objective": {"weights": {"causal": 1.0}},
        "data": {"shards": str(tmp_path / "no-shards")},
    }
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    with torch.no_grad():  # move the norms off their all-ones start so the norm weights are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    meta = {
        "kind": "clm",
        "vocab_size": vocab,
        "tokenizer_sha256": None,
        "row_len": 16,
        "special_ids": {"pad": 0, "eos": 3, "bos": 2},
    }
    ck = ckpt.save_checkpoint(tmp_path / "run", 5, model, {"step": 5}, dump_config(cfg), meta, keep=1)
    return model, ck


def held_out_texts(n_docs: int = 150) -> list[str]:
    """Demo documents no test tokenizer was trained on, plus texts at the tokenizer's edges."""
    import pyarrow.parquet as pq

    from memtrain.data import demo_corpus_path

    table = pq.read_table(demo_corpus_path(), columns=["text"])
    docs = table.column("text").to_pylist()[-n_docs:]
    edges = ["", " ", " leading space", "trailing  ", "tabs\tand\nnew\n\nlines", "12345.678", "naïve café 日本語 🙂"]
    return edges + ["<s>, </s> and <pad> are text here", "ends with <sep>", "\u00a0\r\n"] + docs


def test_hf_tokenizer_encodes_like_the_sentencepiece_model(tmp_path, tiny_data):
    """The exported tokenizer gives memtrain's ids on held-out text (each document and as a batch), has
    memtrain's special tokens at their ids, adds no BOS or EOS, and decodes back to the text."""
    from transformers import AutoTokenizer

    from memtrain.convert.tokenizer import save_hf_tokenizer
    from memtrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_data.tokenizer)
    written = save_hf_tokenizer(tok, tmp_path / "tok")
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(written)
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = held_out_texts()
    expect = tok.encode(texts)
    assert sum(map(len, expect)) > 100_000
    assert hf(texts)["input_ids"] == expect
    assert [hf.encode(t) for t in texts[:12]] == expect[:12]
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<pad>", "<unk>", "<s>", "</s>", "<sep>", "<blank>")}
    assert ids == {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<sep>": 4, "<blank>": 5}
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    for text, enc in zip(texts[:40], expect[:40]):
        assert hf.decode(enc) == tok.decode(enc) == text
    # the one documented difference: text after a literally spelled <sep> / <blank> starts with a "▁"
    sp_ids, hf_ids = tok.encode(["a <sep>b"])[0], hf.encode("a <sep>b")
    assert 4 in sp_ids and hf_ids == sp_ids[:-1] + hf.encode("b")


@pytest.mark.parametrize("tie", [False, True])
def test_clm_transformer_converts_to_llama_with_the_same_logits(tmp_path, tiny_data, tie):
    """AutoModelForCausalLM and AutoTokenizer load the export: the same token ids as memtrain's tokenizer and
    the same logits as the memtrain model; a model card comes with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memtrain.data.tokenizer import Tokenizer

    vocab = Tokenizer.load(tiny_data.tokenizer).vocab_size
    model, ck = clm_checkpoint(tmp_path, tie=tie, eps=1e-6, vocab=vocab)
    out = tmp_path / "hf"
    argv = ["convert", "hf", str(tmp_path / "run"), "--out", str(out), "--tokenizer", str(tiny_data.tokenizer)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500.0  # from the run config
    assert config["tie_word_embeddings"] is tie and config["max_position_embeddings"] == 16
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(out))
    texts = held_out_texts(20)[-3:]
    assert tok(texts)["input_ids"] == Tokenizer.load(tiny_data.tokenizer).encode(texts)
    ids = torch.tensor([tok(t)["input_ids"][:16] for t in texts])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.logits(model(ids)), rtol=1e-5, atol=1e-5)
    assert hf_name("decoder.blocks.1.self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- memtrain" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "kind: clm" in card


def test_hf_conversion_needs_the_runs_tokenizer(tmp_path, tiny_data, capsys):
    """Without a tokenizer (none with the run, none given) or with one of another vocabulary, nothing is written."""
    clm_checkpoint(tmp_path, vocab=64)
    for extra, needle in (([], "no tokenizer.model beside it"), (["--tokenizer", str(tiny_data.tokenizer)], "pieces")):
        capsys.readouterr()
        assert main(["convert", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_hf_conversion_refuses_models_without_a_llama_form(tmp_path, capsys):
    raw = {"model": {"kind": "memory", "chunk_len": 4, "n_chunks": 2}, "objective": {"weights": {"causal": 1.0}}}
    cfg = config_from_dict(raw)
    ckpt.save_checkpoint(
        tmp_path / "run",
        1,
        build_model(cfg.model, V),
        {"step": 1},
        dump_config(cfg),
        {"kind": "memory", "vocab_size": V},
        keep=1,
    )
    capsys.readouterr()
    assert main(["convert", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only a causal LM (model.kind: clm) with a transformer decoder" in err[0]
    assert not (tmp_path / "hf").exists()
