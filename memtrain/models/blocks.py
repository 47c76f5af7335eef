"""The two block types: the masked mixer block and a Llama-style transformer block.

Both map [B, T, d] -> [B, T, d] causally and take ``rope`` (the (cos, sin) pair of the transformer's rotary
embeddings, ignored by mixers) so a stack can call them alike. Parameter names follow the reference mixer
(``seq_layernorm``, ``conv``, ``patch_layernorm``, ``patch_ff.0/2``) and HF Llama (``self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``post_attention_layernorm``), so converters map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memtrain.kernels import dispatch  # pyright: ignore[reportMissingImports]  (kernels/ installs as memtrain.kernels)
from memtrain.models.mixing import CausalMix

Rope = tuple[torch.Tensor, torch.Tensor]


class MixerBlock(nn.Module):
    """Pre-norm masked mixer block: x += Mix(LN(x)); x += FFN(LN(x)). [B, L, d] -> [B, L, d].

    FFN = Linear(d, m*d) -> exact GELU -> Linear(m*d, d); LayerNorms with bias; PyTorch default init
    (as the reference). ``seq_len`` is fixed: the mixing weights are position-specific.

    ``kernels`` (auto | triton | torch, see :mod:`memtrain.kernels.dispatch`): on the Triton path the block
    runs four fused kernels per sublayer pair: LayerNorm, mixing + bias + residual, LayerNorm, FFN (GELU and
    residual fused into its matmuls). The submodules are then not called, only their parameters read, so
    under DeepSpeed ZeRO-3 (parameters gathered by submodule hooks) the block keeps the torch path.
    """

    def __init__(
        self, d_model: int, seq_len: int, kernel: int = 1, n_heads: int = 0, ffn_mult: int = 4, norm_eps: float = 1e-5
    ):
        super().__init__()
        self.seq_layernorm = nn.LayerNorm(d_model, eps=norm_eps)
        self.conv = CausalMix(d_model, seq_len, kernel, n_heads)
        self.patch_layernorm = nn.LayerNorm(d_model, eps=norm_eps)
        self.patch_ff = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model)
        )
        self.kernels = "auto"

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """x [B, L, d] -> [B, L, d]."""
        if dispatch.resolve(self.kernels, x.device) == "torch" or dispatch.partitioned(self):
            x = x + self.conv(self.seq_layernorm(x))
            return x + self.patch_ff(self.patch_layernorm(x))
        ln1, ln2, fc1, fc2 = self.seq_layernorm, self.patch_layernorm, self.patch_ff[0], self.patch_ff[2]
        x = self.conv(dispatch.layer_norm(x, ln1.weight, ln1.bias, ln1.eps, impl="triton"), residual=x)
        h = dispatch.layer_norm(x, ln2.weight, ln2.bias, ln2.eps, impl="triton")
        return dispatch.ffn(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=x, impl="triton")


# ---------------------------------------------------------------------------------------------------------
# Transformer (Llama)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Rope:
    """HF Llama's default rotary embedding for positions 0..T-1: (cos, sin), each [T, head_dim].

    Computed in float32 (autocast off), then cast to ``dtype``, exactly as ``LlamaRotaryEmbedding``.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    with torch.autocast(device_type=device.type, enabled=False):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        inv_freq = 1.0 / (theta**exponent)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF Llama convention): x [B, H, T, d_h], cos/sin [T, d_h] -> [B, H, T, d_h]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE, no biases: [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, T, d], rope (cos, sin) each [T, d_h] -> [B, T, d]."""
        B, T, d = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # [B, H, T, d_h]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), hidden width ``hidden``, no biases. [..., d] -> [..., d]."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Llama decoder layer (same maths and names as HF ``LlamaDecoderLayer``, MHA): [B, T, d] -> [B, T, d].

    x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)). Linear weights start N(0, 0.02) like HF Llama.
    """

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.self_attn = Attention(d_model, n_heads)
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = SwiGLU(d_model, ffn_mult * d_model)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """x [B, T, d], rope (cos, sin) each [T, d/H] (required) -> [B, T, d]."""
        if rope is None:
            raise ValueError("TransformerBlock needs rope=(cos, sin); see rotary_cos_sin")
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))
