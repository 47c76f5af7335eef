"""The kernels inside the models: the ``model.kernels`` switch, mixer blocks and the output head on the Triton
path against the torch path, and training with ``kernels: triton`` against ``kernels: torch``.

Without CUDA the Triton path runs in the CPU interpreter (slow: the training comparison then runs 8 steps;
``tools/gpu_check.sh`` runs it for 50 steps on the GPU). No fixture from conftest is used, so the GPU check can
run this file without the data stack (``pytest --noconftest``).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from memtrain.config import load_config  # noqa: E402
from memtrain.engine.optim import build_optimizer  # noqa: E402
from memtrain.errors import UserError  # noqa: E402
from memtrain.kernels import dispatch  # noqa: E402
from memtrain.models import build_model  # noqa: E402
from memtrain.models.blocks import MixerBlock  # noqa: E402
from memtrain.objectives import SpecialTokens, compute_losses, supervised_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = Path(__file__).resolve().parents[1] / "yaml" / "tiny.yaml"


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32 on CUDA too: the torch path's matmuls and convolutions (k > 1) without TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_resolve_and_set_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.resolve("torch", cpu) == "torch"
    assert dispatch.resolve("auto", cpu) == "torch"  # auto never picks the interpreter
    assert dispatch.resolve("auto", torch.device("cuda")) == "torch"  # nor Triton, which lost to torch on an H200
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("triton", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="model.kernels: triton needs a CUDA device"):
        dispatch.resolve("triton", cpu)
    with pytest.raises(UserError, match="expected one of auto, triton, torch"):
        dispatch.resolve("fast", cpu)
    cfg = load_config(str(TINY)).model
    for impl in ("torch", "triton"):
        model = build_model(cfg.model_copy(update={"kernels": impl}), 64)
        mixers = [m for m in model.modules() if hasattr(m, "kernels")]
        assert model.kernels == impl and len(mixers) >= 5 and {m.kernels for m in mixers} == {impl}


def _pair(impl_a: str, impl_b: str, **kwargs) -> tuple[MixerBlock, MixerBlock]:
    a = dispatch.set_kernels(MixerBlock(**kwargs), impl_a).to(DEVICE)
    b = dispatch.set_kernels(MixerBlock(**kwargs), impl_b).to(DEVICE)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("kernel,heads", [(1, 0), (3, 0), (1, 2), (2, 4)])
def test_mixer_block_triton_equals_torch(kernel, heads):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    a, b = _pair("torch", "triton", d_model=32, seq_len=19, kernel=kernel, n_heads=heads)
    x = torch.randn(3, 19, 32, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=name)
    upper = torch.ones(19, 19, dtype=torch.bool, device=DEVICE).triu(1)
    assert (b.conv.weight.grad[..., upper, :] == 0).all()


def test_zero3_partitioned_modules_keep_the_torch_path(monkeypatch):
    """ZeRO-3 gathers parameters in submodule hooks, which the fused block and head would bypass."""
    a, b = _pair("torch", "triton", d_model=16, seq_len=9, kernel=1, n_heads=2)
    for p in b.parameters():
        p.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions
    monkeypatch.setattr(dispatch, "layer_norm", lambda *a, **k: pytest.fail("fused path under ZeRO-3"))
    monkeypatch.setattr(dispatch, "linear", lambda *a, **k: pytest.fail("fused out_proj under ZeRO-3"))
    x = torch.randn(2, 9, 16, device=DEVICE)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    model = build_model(load_config(str(TINY)).model.model_copy(update={"kernels": "triton"}), 64)
    assert dispatch.fused_head(model, DEVICE)
    model.lm_head.weight.ds_id = 0
    assert not dispatch.fused_head(model, DEVICE)


def test_mixer_block_triton_under_bf16_autocast():
    a, b = _pair("torch", "triton", d_model=32, seq_len=17, kernel=1, n_heads=0)
    x = torch.randn(2, 17, 32, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ya, yb = a(x), b(x)
    assert ya.dtype == yb.dtype == torch.float32  # the residual stream stays fp32
    assert ((yb - ya).norm() / ya.norm()).item() < 1e-2


def test_fused_head_equals_plain_head():
    """supervised_loss on the Triton path (chunked linear + CE) gives the plain head's loss, gradients and
    accuracy statistics."""
    cfg = load_config(str(TINY)).model
    torch.manual_seed(0)
    plain = build_model(cfg.model_copy(update={"kernels": "torch"}), 64).to(DEVICE)
    fused = build_model(cfg.model_copy(update={"kernels": "torch"}), 64).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    fused.kernels = "triton"  # only the head: the hidden states are given
    hidden = torch.randn(3, 32, cfg.decoder.d_model, device=DEVICE)
    labels = torch.randint(0, 64, (3, 32), device=DEVICE)
    labels[0, :5] = -100
    stats = {}
    for name, model in (("plain", plain), ("fused", fused)):
        h = hidden.clone().requires_grad_()
        s = supervised_loss(model, h, labels)
        s.loss.backward()
        stats[name] = (s, h.grad, model.lm_head.weight.grad, model.norm.weight.grad)
    assert dispatch.fused_head(fused, DEVICE) and not dispatch.fused_head(plain, DEVICE)

    class OwnHead(type(fused)):  # a model with another head keeps the plain path
        def logits(self, hidden):
            return super().logits(hidden) * 2

    fused.__class__ = OwnHead
    assert not dispatch.fused_head(fused, DEVICE)
    fused.__class__ = OwnHead.__mro__[1]
    (sp, *gp), (sf, *gf) = stats["plain"], stats["fused"]
    torch.testing.assert_close(sf.loss, sp.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(gf, gp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for field in ("n_tokens", "n_correct", "n_rows_exact", "n_rows"):
        assert int(getattr(sf, field)) == int(getattr(sp, field)), field


def train_losses(impl: str, steps: int, seed: int) -> list[float]:
    """``steps`` AdamW steps of yaml/tiny.yaml's model and objectives (fp32), all on one random batch (so the
    loss falls steadily: the model memorises it)."""
    cfg = load_config(str(TINY), [f"model.kernels={impl}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 64).to(DEVICE)
    opt = build_optimizer(model, cfg.optim, DEVICE)
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=cfg.objective.n_delimiters, filler_id=5)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 64, (cfg.data.batch_size, cfg.model.seq_len), generator=gen).to(DEVICE)
    losses = []
    for _ in range(steps):
        total, _ = compute_losses(model, ids, cfg.stages()[0].weights, special)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
    return losses


@pytest.mark.slow
def test_training_with_triton_kernels_matches_torch():
    steps = 50 if DEVICE.type == "cuda" else 8  # the interpreter takes 2-5 s per step of the tiny model
    seed = int.from_bytes(os.urandom(4), "little")
    ref, fast = train_losses("torch", steps, seed), train_losses("triton", steps, seed)
    assert ref[-1] < ref[0] - 0.1, f"the comparison must cover real training: {ref} (seed {seed})"
    for step, (a, b) in enumerate(zip(ref, fast)):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"step {step}: torch {a} vs triton {b} (seed {seed})"
