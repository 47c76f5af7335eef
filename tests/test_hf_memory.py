"""Hugging Face causal LMs as memory decoders: slot layout, labels, the three training modes, memtrain's trainer
and evaluation on them, gradient checkpointing, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import L_DEC, C, L, dual_shards, first_rows, hf_config, shm_retry, tiny_llm
from safetensors.torch import load_file

from memtrain.cli import main
from memtrain.data.dual import DualLayout
from memtrain.engine.trainer import train
from memtrain.errors import UserError
from memtrain.models import build_model
from memtrain.models.hf_memory import MemoryWidthError
from memtrain.objectives import SpecialTokens, compute_losses

SPECIAL = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=1, filler_id=5)


def _rows(tmp_path_factory, family="llama", n=2):
    return first_rows(tmp_path_factory, family, n)


def _model(tmp_path_factory, tmp_path, family="llama", **extra):
    shards, llm = dual_shards(tmp_path_factory, family), tiny_llm(tmp_path_factory, family)
    cfg = hf_config(shards, llm, tmp_path / "run", **extra)
    torch.manual_seed(0)
    return build_model(cfg.model, 420), cfg


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_reads_bos_memories_and_tokens_at_aligned_positions(tmp_path_factory, tmp_path, family):
    """hidden at decoder slot j of chunk c == the LLM run alone on [BOS, proj(m_0..m_{c-1}), tokens 0..j-1]:
    empty slots and padding are masked, positions count only what the LLM sees (no misaligned mask)."""
    model, _ = _model(tmp_path_factory, tmp_path, family)
    model.eval()
    rows = _rows(tmp_path_factory, family)
    with torch.no_grad():
        hidden = model(rows)
        assert hidden.shape == (2, C * (L + L_DEC), 64)
        memories = model.encode(rows)
        _, slots = model.layout.split(rows)
        ids, mask = DualLayout.decoder_tokens(slots)
        blocks = hidden.view(2, C, L + L_DEC, 64)
        assert (blocks[..., :L, :] == 0).all()
        has_bos = model.start_id is not None
        assert has_bos == (family == "llama")
        for b in range(2):
            for c in range(C):
                n = int(mask[b, c].sum())
                prefix = model.prefix_embeddings(memories[b : b + 1, :c] if c else None)
                x = torch.cat([prefix, model.token_embeddings(ids[b : b + 1, c, :n])], dim=1)
                ref = model.backbone()(inputs_embeds=x, use_cache=False).last_hidden_state[0]
                P = prefix.shape[1]
                for j in range(n):
                    if P - 1 + j < 0:
                        continue  # no BOS, no memory: the row's first token has no context
                    torch.testing.assert_close(blocks[b, c, L + j], ref[P - 1 + j], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_labels_losses_and_gradients(tmp_path_factory, tmp_path, family):
    model, _ = _model(tmp_path_factory, tmp_path, family)
    rows = _rows(tmp_path_factory, family)
    labels = model.align_labels(rows.masked_fill(rows == 0, -100)).view(2, C, L + L_DEC)
    ids, mask = DualLayout.decoder_tokens(DualLayout(C, L, L_DEC).split(rows)[1])
    assert (labels[..., :L] == -100).all()
    expect = torch.where(mask, ids, torch.full_like(ids, -100))
    if family == "qwen3":  # no BOS: the row's first decoder token is predicted from nothing
        assert (labels[:, 0, L] == -100).all()
        expect[:, 0, 0] = -100
    assert torch.equal(labels[..., L:], expect)
    total, parts = compute_losses(model, rows, {"causal": 1.0, "copy": 0.5, "blank_copy": 0.5}, SPECIAL)
    assert torch.isfinite(total) and set(parts) == {"causal", "copy", "blank_copy"}
    assert parts["copy"].n_tokens < parts["causal"].n_tokens  # the copy half only
    total.backward()
    groups = model.module_groups()
    assert set(groups) == {"encoder", "decoder", "projector", "embeddings", "head"}
    for name in ("encoder", "projector", "decoder", "head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pretrained_llm(tmp_path_factory) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_llm(tmp_path_factory) / "model.safetensors"))


def _changed(before: dict, after: dict, keys) -> set[str]:
    return {k for k in keys if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_training_modes_change_exactly_what_they_train(tmp_path_factory, tmp_path, mode):
    extra = {"frozen_encoder": {"checkpoint": None}} if mode == "frozen" else {}
    cfg = hf_config(
        dual_shards(tmp_path_factory), tiny_llm(tmp_path_factory), tmp_path / "run", mode=mode, steps=3, **extra
    )
    torch.manual_seed(cfg.run.seed)
    initial = _state(build_model(cfg.model, 420))  # what the trainer starts from (same seed, same build)
    summary = shm_retry(train, cfg)
    assert summary["complete"] and summary["step"] == 3
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000003" / "model.safetensors"))
    pretrained = _pretrained_llm(tmp_path_factory)
    own = [k for k in trained if not k.startswith("llm.")]
    assert _changed(initial, trained, [k for k in own if k.startswith("projector.")])  # the projector always trains
    if mode == "full":
        llm = [k for k in trained if k.startswith("llm.")]
        assert len(_changed(initial, trained, llm)) > len(llm) // 2
        assert _changed(initial, trained, [k for k in own if k.startswith("encoder.")])
    elif mode == "lora":
        base = {
            k: k.replace("llm.base_model.model.", "").replace(".base_layer", "")
            for k in trained
            if k.startswith("llm.") and "lora_" not in k
        }
        assert set(base.values()) == set(pretrained)  # every LLM weight is there, under peft's names
        for key, name in base.items():
            assert torch.equal(trained[key], pretrained[name]), f"LoRA changed the base weight {name}"
        lora_b = [k for k in trained if "lora_B" in k]
        assert lora_b and all(trained[k].abs().sum() > 0 for k in lora_b)  # adapters trained (they start at 0)
    else:
        for key, value in trained.items():
            if key.startswith("llm."):
                assert torch.equal(value, pretrained[key[len("llm.") :]]), f"frozen mode changed {key}"
        assert _changed(initial, trained, own) == {k for k in own if k.startswith("projector.")}


def test_qwen_decoder_trains_and_memtrain_eval_reads_the_run(tmp_path_factory, tmp_path, capsys):
    cfg = hf_config(
        dual_shards(tmp_path_factory, "qwen3"),
        tiny_llm(tmp_path_factory, "qwen3"),
        tmp_path / "qwen",
        mode="full",
        steps=2,
    )
    assert shm_retry(train, cfg)["complete"]
    out = tmp_path / "eval.json"
    assert (
        shm_retry(
            main,
            [
                "eval",
                str(tmp_path / "qwen"),
                "--batches",
                "1",
                "--objectives",
                "causal,copy",
                "--greedy",
                "--json",
                str(out),
            ],
        )
        == 0
    )
    results = json.loads(out.read_text())["hf-full"]
    assert set(results) == {"causal", "copy"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1 and r["tokens"] > 0 and r["ce"] > 0
    assert results["copy"]["exact_match_mode"] == "greedy" and "greedy_accuracy" in results["copy"]
    assert "causal" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path_factory, tmp_path):
    rows = _rows(tmp_path_factory)
    grads = []
    for checkpointing in (False, True):
        model, _ = _model(tmp_path_factory, tmp_path, hf_decoder={"gradient_checkpointing": checkpointing})
        model.train()
        assert model.causal_lm().is_gradient_checkpointing == checkpointing
        total, _ = compute_losses(model, rows, {"causal": 1.0}, SPECIAL)
        total.backward()
        grads.append(
            (float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert set(grads[0][1]) == set(grads[1][1])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-6, rtol=1e-5)


def test_bad_llm_directories_and_memories_are_one_line_errors(tmp_path_factory, tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    ).save_pretrained(str(bert))
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("not a model")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text('{"model_type": "no-such-model"}')
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_llm(tmp_path_factory) / "config.json").read_text())
    cases = [
        (bert, "holds a BertModel, not a causal language model"),
        (tmp_path / "random", "has no config.json"),
        (tmp_path / "missing", "is not a directory"),
        (garbage, "is not a usable transformers config"),
        (no_weights, "cannot load the causal LM"),
    ]
    for path, expected in cases:
        with pytest.raises(UserError) as err:
            _model(tmp_path_factory, tmp_path, hf_decoder={"path": str(path)})
        assert expected in str(err.value) and "model.hf_decoder.path" in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="target_modules"):
        _model(tmp_path_factory, tmp_path, mode="lora", hf_decoder={"lora": {"target_modules": ["no_such_proj"]}})
    model, _ = _model(tmp_path_factory, tmp_path)
    rows = _rows(tmp_path_factory)
    with pytest.raises(MemoryWidthError, match="projector was built for width 32"):
        model(rows, memories=torch.zeros(2, C - 1, 48))
    # shards made with another decoder tokenizer: ids beyond the LLM's vocabulary, caught at the first batch
    lay = DualLayout(C, L, L_DEC)
    enc, slots = lay.split(rows)
    ids, mask = DualLayout.decoder_tokens(slots)
    foreign = lay.pack(enc, ids.masked_fill(mask, 5000), mask)
    model._ids_checked = False
    with pytest.raises(UserError, match="decoder token id 5000 is outside the LLM's vocabulary of 320"):
        model(foreign)
    assert isinstance(MemoryWidthError("x"), UserError)
