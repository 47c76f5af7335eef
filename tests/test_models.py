"""Blocks and token mixing: exact maths, causality, functional masking, HF Llama equality, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from memtrain.config import ModelConfig, StackConfig
from memtrain.kernels.reference import causal_mix, causal_weight
from memtrain.models import build_model
from memtrain.models.autoencoder import unroll_index
from memtrain.models.blocks import MixerBlock, TransformerBlock, rotary_cos_sin
from memtrain.models.mixing import CausalMix

# ---------------------------------------------------------------------------------------------------------
# Token mixing maths


def explicit_mix(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y[b,t,f] = sum_{s<=t} sum_j w[t,s,j] * x[b,s,f+j-(k-1)//2] + b[t], written as loops (x zero outside)."""
    B, L, d = x.shape
    k = w.shape[-1]
    p = (k - 1) // 2
    y = torch.zeros_like(x)
    for bb in range(B):
        for t in range(L):
            for f in range(d):
                acc = b[t].clone()
                for s in range(t + 1):
                    for j in range(k):
                        if 0 <= f + j - p < d:
                            acc += w[t, s, j] * x[bb, s, f + j - p]
                y[bb, t, f] = acc
    return y


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_causal_mix_equals_explicit_formula(k):
    torch.manual_seed(0)
    L, d = 5, 6
    x = torch.randn(2, L, d, dtype=torch.float64)
    w = torch.randn(L, L, k, dtype=torch.float64)  # dense on purpose: the upper triangle must be ignored
    b = torch.randn(L, dtype=torch.float64)
    torch.testing.assert_close(causal_mix(x, w, b), explicit_mix(x, w, b), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # nn.Conv1d's own warning
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_causal_mix_equals_reference_conv1d(k):
    """The reference op: nn.Conv1d(L, L, k, padding='same') on [B, L, d] with a tril-masked weight."""
    torch.manual_seed(0)
    L, d = 7, 10
    conv = nn.Conv1d(L, L, k, padding="same").double()
    x = torch.randn(3, L, d, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(causal_weight(conv.weight))
        expected = conv(x)
    torch.testing.assert_close(causal_mix(x, conv.weight, conv.bias), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,heads", [(1, 2), (1, 3), (3, 2), (4, 3)])
def test_multihead_mix_equals_per_head_loop(k, heads):
    torch.manual_seed(0)
    L, d = 6, 12
    mix = CausalMix(d, L, kernel=k, n_heads=heads).double()
    x = torch.randn(2, L, d, dtype=torch.float64)
    dh = d // heads
    outs = []
    for h in range(heads):  # reference MixerHead: P_h = Linear(d, d/H), masked conv per head, concat, out_proj
        rows = slice(h * dh, (h + 1) * dh)
        p_h = x @ mix.proj.weight[rows].T + mix.proj.bias[rows]
        outs.append(explicit_mix(p_h, mix.weight[h], mix.bias[h]))
    expected = mix.out_proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(mix(x), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Causality and functional masking

BLOCKS = [pytest.param("mixer", k, h, id=f"mixer-k{k}-h{h}") for k in (1, 2, 3, 4, 8) for h in (0, 2)]
BLOCKS.append(pytest.param("transformer", 1, 2, id="transformer-h2"))


def make_block(arch: str, k: int, heads: int, L: int, d: int) -> nn.Module:
    if arch == "mixer":
        return MixerBlock(d, L, kernel=k, n_heads=heads)
    return TransformerBlock(d, heads)


def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rope = rotary_cos_sin(x.shape[1], x.shape[2] // 2, 10000.0) if isinstance(block, TransformerBlock) else None
    return block(x, rope)


@pytest.mark.parametrize("arch,k,heads", BLOCKS)
def test_block_is_causal(arch, k, heads):
    torch.manual_seed(0)
    L, d = 10, 16
    block = make_block(arch, k, heads, L, d)
    for mix in mixing_layers(block):  # a dirty upper triangle (as in reference checkpoints) must not leak
        with torch.no_grad():
            mix.weight.add_(torch.randn_like(mix.weight))
    x = torch.randn(2, L, d)
    with torch.no_grad():
        y = run_block(block, x)
        for p in (0, 3, 6, 9):
            x2 = x.clone()
            x2[:, p] += torch.randn(2, d)
            y2 = run_block(block, x2)
            assert torch.equal(y2[:, :p], y[:, :p]), f"position {p} leaked into earlier outputs"
            assert not torch.equal(y2[:, p:], y[:, p:]), f"position {p} changed nothing at or after itself"


def mixing_layers(model: nn.Module) -> list[CausalMix]:
    return [m for m in model.modules() if isinstance(m, CausalMix)]


def tiny_mixer_memory_model(enc_k: int, enc_h: int, dec_k: int, dec_h: int) -> nn.Module:
    enc = StackConfig(arch="mixer", d_model=16, n_layers=2, kernel=enc_k, n_heads=enc_h)
    dec = StackConfig(arch="mixer", d_model=24, n_layers=2, kernel=dec_k, n_heads=dec_h)
    return build_model(ModelConfig(kind="memory", chunk_len=6, n_chunks=3, encoder=enc, decoder=dec), 40)


@pytest.mark.parametrize("kernels", [(3, 2, 2, 0), (1, 2, 1, 0), (4, 0, 1, 3)])
def test_upper_triangle_is_zero_gets_zero_grad_and_forward_is_pure(kernels):
    torch.manual_seed(0)
    model = tiny_mixer_memory_model(*kernels)
    layers = mixing_layers(model)
    assert len(layers) == 4
    for m in layers:
        upper = causal_weight(torch.ones_like(m.weight)) == 0
        assert upper.any() and torch.all(m.weight[upper] == 0), "upper triangle not zero at init"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 40, (3, model.cfg.seq_len))
    model.logits(model(ids)).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"forward/backward modified {n}"
    for m in layers:
        upper = causal_weight(torch.ones_like(m.weight)) == 0
        assert m.weight.grad is not None and m.weight.grad[~upper].abs().sum() > 0
        assert torch.all(m.weight.grad[upper] == 0), "upper-triangle entries received gradient"


@pytest.mark.parametrize("k,heads", [(1, 0), (3, 0), (1, 2), (4, 2)])
def test_mask_is_applied_in_forward(k, heads):
    """A non-zero upper triangle (e.g. loaded from a reference checkpoint) changes neither output nor grads."""
    torch.manual_seed(0)
    mix = CausalMix(8, 5, kernel=k, n_heads=heads)
    x = torch.randn(2, 5, 8)
    y = mix(x)
    with torch.no_grad():
        mix.weight.add_(torch.randn_like(mix.weight) * (causal_weight(torch.ones_like(mix.weight)) == 0))
    y_dirty = mix(x)
    assert torch.equal(y, y_dirty)
    y_dirty.sum().backward()
    upper = causal_weight(torch.ones_like(mix.weight)) == 0
    assert torch.all(mix.weight.grad[upper] == 0)


# ---------------------------------------------------------------------------------------------------------
# Transformer block == HF Llama


def test_transformer_block_equals_hf_llama_decoder_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    d, h, m, eps, theta, T = 32, 4, 3, 1e-6, 5000.0, 11
    ours = TransformerBlock(d, h, ffn_mult=m, norm_eps=eps)
    with torch.no_grad():  # non-trivial norm weights so that their names are checked too
        ours.input_layernorm.weight.uniform_(0.5, 1.5)
        ours.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    hf_cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=m * d,
        num_attention_heads=h,
        num_key_value_heads=h,
        rms_norm_eps=eps,
        rope_theta=theta,
        attn_implementation="sdpa",
    )
    hf = LlamaDecoderLayer(hf_cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict(), strict=True)  # same parameter names and shapes
    x = torch.randn(2, T, d)
    pos = torch.arange(T).unsqueeze(0)
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    cos, sin = rotary_cos_sin(T, d // h, theta)
    torch.testing.assert_close(cos, cos_hf[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_hf[0], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = hf(x, position_ids=pos, position_embeddings=(cos_hf, sin_hf))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours(x, (cos, sin))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Unroll windows (docs/reference.md §3.1)


def test_unroll_windows_match_reference_example():
    idx = unroll_index(12, 8).tolist()
    assert idx[:3] == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert idx[5:8] == [[5, 6, 7, 0], [6, 7, 0, 1], [7, 0, 1, 2]]
    assert idx[8] == [0, 1, 2, 3] and idx[11] == [3, 4, 5, 6]  # period d
    memory = torch.arange(8.0).unsqueeze(0) * 10  # [1, d]
    assert memory[:, unroll_index(12, 8)].shape == (1, 12, 4)
    assert memory[0, unroll_index(12, 8)][6].tolist() == [60.0, 70.0, 0.0, 10.0]


# ---------------------------------------------------------------------------------------------------------
# Parameter counts against docs/reference.md §1.5 / §2.1 (V = 8000), built on the meta device

V = 8000


def count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = build_model(cfg, V)
    return sum(p.numel() for p in model.parameters())


def mixer(d: int, n: int, k: int = 1, h: int = 0) -> StackConfig:
    return StackConfig(arch="mixer", d_model=d, n_layers=n, kernel=k, n_heads=h)


def ref_mixer_block(d: int, L: int, k: int) -> int:
    """docs/reference.md §1.3: per-block parameters of the reference MixerBlock (single mixing matrix)."""
    return 8 * d * d + 9 * d + k * L * L + L


def ref_autoencoding_mixer(d: int, depth: int, L: int, k: int) -> int:
    """wte + lm_head + 2*depth blocks + the reference's `projection` Linear(d/2, d) (always present)."""
    return 2 * V * d + 2 * depth * ref_mixer_block(d, L, k) + (d // 2 * d + d)


def test_reference_formula_reproduces_documented_counts():
    # rows of docs/reference.md §1.5, so the formula above is the reference's count
    assert ref_autoencoding_mixer(1024, 8, 512, 8) == 184_837_120
    assert ref_autoencoding_mixer(1024, 8, 512, 16) == 218_391_552
    assert ref_autoencoding_mixer(512, 8, 256, 16) == 58_733_056
    # the kernel-1 model of docs/reference.md §3.3, summed from its listed shapes
    d, L = 1024, 512
    block = 4 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + L * L * 1 + L
    assert ref_autoencoding_mixer(1024, 8, 512, 1) == V * d + 16 * block + V * d + (d * L + d) == 155_476_992


def test_autoencoder_parameter_counts_match_reference():
    projection = 1024 // 2 * 1024 + 1024  # 525,312: the reference's projection, unused by `repeat`
    final_norms = 2 * (2 * 1024)  # ours, with final_norm: encoder LayerNorm + head LayerNorm (weight + bias)
    for k in (1, 8):
        ref = ref_autoencoding_mixer(1024, 8, 512, k)
        base = dict(
            kind="autoencoder",
            chunk_len=512,
            n_chunks=1,
            encoder=mixer(1024, 8, k),
            decoder=mixer(1024, 8, k),
            injection="repeat",
        )
        assert count(ModelConfig(**base, final_norm=False)) == ref - projection
        assert count(ModelConfig(**base, final_norm=True)) == ref - projection + final_norms
    assert (
        count(
            ModelConfig(
                kind="autoencoder",
                chunk_len=512,
                n_chunks=1,
                encoder=mixer(1024, 8, 8),
                decoder=mixer(1024, 8, 8),
                final_norm=False,
            )
        )
        == 184_837_120 - projection
    )
    for d, L, total in ((1024, 512, 218_391_552), (512, 256, 58_733_056)):  # unroll uses the projection
        cfg = ModelConfig(
            kind="autoencoder",
            chunk_len=L,
            n_chunks=1,
            encoder=mixer(d, 8, 16),
            decoder=mixer(d, 8, 16),
            injection="unroll",
            final_norm=False,
        )
        assert count(cfg) == total


def test_clm_and_memory_parameter_counts_match_reference():
    clm = dict(kind="clm", chunk_len=512, n_chunks=1, final_norm=False)
    assert count(ModelConfig(**clm, decoder=mixer(1024, 16))) == 154_951_680
    assert count(ModelConfig(**clm, decoder=mixer(512, 16))) == 46_022_656
    clm2 = dict(kind="clm", chunk_len=512, n_chunks=2, final_norm=False)
    assert count(ModelConfig(**clm2, decoder=mixer(1024, 16))) == 167_542_784
    # mixer_clm_compiled.LanguageMixer h4: the correct multi-head mixer, n_h(L^2 + L) + 2d^2 + 2d per layer
    assert count(ModelConfig(**clm2, decoder=mixer(1024, 16, h=4))) == 251_510_784
    # LlamaForCausalLM d512 n16 h4 (final RMSNorm included, as in HF)
    llama = StackConfig(arch="transformer", d_model=512, n_layers=16, n_heads=4)
    assert count(ModelConfig(kind="clm", chunk_len=512, n_chunks=2, decoder=llama, final_norm=True)) == 75_317_760
    # VariableMemoryMixer enc512/dec1024 n16 c256x4 (decoder k1, context 260), encoder k1 and k8
    for k, total in ((1, 191_137_088), (8, 198_477_120)):
        cfg = ModelConfig(
            kind="memory",
            chunk_len=256,
            n_chunks=4,
            encoder=mixer(512, 16, k),
            decoder=mixer(1024, 16),
            final_norm=False,
        )
        assert count(cfg) == total
