"""An HF decoder under the DeepSpeed engine on 2 gloo ranks (CPU, OMP_NUM_THREADS=1): ZeRO-3 with the LLM's
gradient checkpointing trains the tiny Llama decoder exactly like plain DDP on the same 2 ranks, and its
consolidated checkpoint exports to a plain Hugging Face model.

The reference is DDP, not one process on the global batch: each rank's loss is the mean over its own
supervised tokens, and with decoder padding that differs by row, the average of two ranks' means is not the
mean over both ranks' tokens (ZeRO-3, ZeRO-0 and DDP agree to the last digit; one process does not)."""

from __future__ import annotations

import pytest
import torch

import yaml

deepspeed = pytest.importorskip("deepspeed")

from helpers import dual_shards, hf_config, records, tiny_llm, torchrun, weights  # noqa: E402

from memtrain.cli import main  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, ROWS = 3, 2  # steps, rows per rank


def _two_ranks(tmp_path, name: str, raw: dict, dist: dict):
    raw = dict(raw, dist=dist, run=dict(raw["run"], name=name, out_dir=str(tmp_path / name)))
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return torchrun(config)


def test_zero3_with_gradient_checkpointing_trains_like_ddp(tmp_path_factory, tmp_path, capsys):
    shards, llm = dual_shards(tmp_path_factory), tiny_llm(tmp_path_factory)
    raw = hf_config(shards, llm, tmp_path / "run", steps=STEPS).model_dump(mode="json")
    raw["data"]["batch_size"] = ROWS
    assert "2 rank(s) on cpu (DDP)" in _two_ranks(tmp_path, "ddp", raw, {"engine": "plain"}).stdout
    raw["model"]["hf_decoder"]["gradient_checkpointing"] = True
    done = _two_ranks(tmp_path, "zero3", raw, {"engine": "deepspeed", "zero_stage": 3})
    assert "2 rank(s) on cpu (DeepSpeed ZeRO-3, fp32" in done.stdout
    ra, rb = records(tmp_path / "zero3"), records(tmp_path / "ddp")
    assert sorted(ra) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for key in ("loss/total", "loss/causal", "loss/copy", "grad_norm"):
            assert ra[s][key] == pytest.approx(rb[s][key], rel=0, abs=2e-5), (s, key)
    wa, wb = weights(tmp_path / "zero3", STEPS), weights(tmp_path / "ddp", STEPS)
    assert sorted(wa) == sorted(wb) and any(k.startswith("llm.model.layers.") for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4, msg=k)  # Adam on near-zero gradients
    # the consolidated checkpoint of the ZeRO-3 run exports like any other
    from transformers import AutoModelForCausalLM

    assert main(["export-decoder", str(tmp_path / "zero3"), "--out", str(tmp_path / "export")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "decoder").state_dict()
    assert all(torch.equal(plain[k[len("llm.") :]], v) for k, v in wa.items() if k.startswith("llm."))
