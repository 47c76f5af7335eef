"""Pipeline stages: the layer list computes the model's forward for every model kind, partitions keep frozen
layers with trainable ones, one pipeline micro-batch gives compute_losses' weighted objective sum, activations
without gradient cross stages as integer views, and on 2 gloo ranks a 2-stage DeepSpeed pipeline trains like
one process, resumes after a kill with the same next losses, and converts from its per-layer files."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers import (  # noqa: E402
    BATCH,
    KILL_RUN,
    KILL_STEPS,
    RUN,
    STEPS,
    assert_close_weights,
    check_kill_and_resume,
    records,
    same_losses,
    tiny_raw,
    torchrun,
    weights,
    write_yaml,
)
from safetensors.torch import load_file  # noqa: E402

from memtrain.cli import main  # noqa: E402
from memtrain.config import config_from_dict, pipeline_units  # noqa: E402
from memtrain.engine.pipeline import (  # noqa: E402
    PipelineLoss,
    from_wire,
    layer_param_names,
    pipeline_layers,
    pipeline_parts,
    run_layers,
    stack_tasks,
    to_wire,
)
from memtrain.errors import UserError  # noqa: E402
from memtrain.models import build_model  # noqa: E402
from memtrain.objectives import SpecialTokens, compute_losses  # noqa: E402

SPECIAL = SpecialTokens(pad_id=0, delimiter_id=3, n_delimiters=1, filler_id=4)


def small_config(kind: str, arch: str, frozen: bool = False, **model):
    stack = {"arch": arch, "d_model": 16, "n_layers": 2, "n_heads": 2 if arch == "transformer" else 0}
    raw = {
        "model": {
            "kind": kind,
            "chunk_len": 4,
            "n_chunks": 1 if kind == "autoencoder" else 4,
            "encoder": stack,
            "decoder": dict(stack, d_model=model.pop("d_dec", 16)),
            **model,
        },
        "objective": {"weights": {"reconstruction": 1.0} if kind == "autoencoder" else {"causal": 1.0, "copy": 0.5}},
    }
    if frozen:
        raw["model"]["frozen_encoder"] = {"checkpoint": None}
    return config_from_dict(raw)


CASES = [
    (kind, arch, extra)
    for kind, arch, extra in itertools.product(
        ["memory", "autoencoder", "clm"],
        ["mixer", "transformer"],
        [{}, {"d_dec": 24}, {"no_memory": True}, {"injection": "unroll", "compression": 2}],
    )
    if not (kind != "memory" and "no_memory" in extra)
    and not (kind != "autoencoder" and "injection" in extra)
    and not (arch == "transformer" and "d_dec" in extra and kind == "clm")
]


@pytest.mark.parametrize("kind, arch, extra", CASES)
def test_layers_compute_the_model_forward_and_own_every_parameter_once(kind, arch, extra):
    cfg = small_config(kind, arch, **dict(extra))
    torch.manual_seed(0)
    model = build_model(cfg.model, 50)
    ids = torch.randint(5, 50, (3, cfg.model.seq_len))
    layers = pipeline_layers(model)
    torch.testing.assert_close(run_layers(layers, ids), model(ids), rtol=0, atol=0)
    names = [n for m in layer_param_names(model, layers) for n in m.values()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # gradients reach every parameter through the layers as through the model
    model.logits(run_layers(layers, ids)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the config's count of trainable pipeline layers (checked before any process starts) is the real one
    assert pipeline_units(cfg.model) == sum(any(p.requires_grad for p in la.parameters()) for la in layers)


@pytest.mark.parametrize("kind", ["memory", "autoencoder"])
def test_frozen_layers_share_a_stage_with_the_next_trainable_layer(kind):
    cfg = small_config(kind, "mixer", frozen=True)
    model = build_model(cfg.model, 50)
    model.freeze(["encoder"])
    layers = pipeline_layers(model)
    names = [la.name for la in layers]
    first_trainable = next(i for i, la in enumerate(layers) if any(p.requires_grad for p in la.parameters()))
    frozen = ["encoder.embed", "encoder.blocks.0", "encoder.blocks.1"]
    if kind == "autoencoder":  # repeat injection, e = d: only the (frozen) encoder's final norm
        frozen.append("memory injection")
    assert names[:first_trainable] == frozen
    units = pipeline_units(cfg.model)
    for method in ("uniform", "parameters"):
        for stages in range(1, units + 1):
            parts = pipeline_parts(layers, stages, method)
            assert parts[0] == 0 and parts[-1] == len(layers) and len(parts) == stages + 1
            for s in range(stages):  # every stage holds a parameter that trains
                assert any(p.requires_grad for la in layers[parts[s] : parts[s + 1]] for p in la.parameters())
        assert pipeline_parts(layers, 2, method)[1] > first_trainable
        with pytest.raises(UserError, match=f"more than the {units} pipeline layers that train"):
            pipeline_parts(layers, units + 1, method)
    # without the freeze every layer is a unit: DeepSpeed's uniform split of 7 layers
    assert pipeline_parts(pipeline_layers(build_model(cfg.model, 50)), 3, "uniform") == [0, 3, 5, 7]


def test_one_micro_batch_gives_compute_losses_sum_and_statistics():
    cfg = small_config("memory", "mixer")
    torch.manual_seed(1)
    model = build_model(cfg.model, 50)
    ids = torch.randint(5, 50, (3, cfg.model.seq_len))
    weights = {"causal": 1.0, "copy": 0.5}
    expect, parts = compute_losses(model, ids, weights, SPECIAL)
    inputs, labels = stack_tasks(model, ids, weights, SPECIAL)
    assert inputs.shape == labels.shape == (6, cfg.model.seq_len)
    loss = PipelineLoss(model)
    loss.weights = weights
    got = loss(run_layers(pipeline_layers(model), inputs), labels)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
    (record,) = loss.records
    for name in weights:
        assert record[name].n_tokens == parts[name].n_tokens
        assert int(record[name].n_correct) == int(parts[name].n_correct)
        torch.testing.assert_close(record[name].ce_sum, parts[name].ce_sum, rtol=1e-6, atol=1e-5)


def test_activations_without_gradient_cross_stages_as_integer_views():
    x = torch.randn(3, 4)
    w = torch.randn(4, requires_grad=True)
    ids = torch.arange(5)
    for dtype, int_dtype in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        frozen, live = x.to(dtype), (x * w).to(dtype)
        sent = to_wire((frozen, live, ids))
        assert sent[0].dtype == int_dtype and sent[1] is live and sent[2] is ids
        back = from_wire(sent)
        assert back[0].dtype == dtype and torch.equal(back[0], frozen) and back[2] is ids
    assert to_wire(x).dtype == torch.int32 and torch.equal(from_wire(to_wire(x)), x)  # a lone tensor too
    assert to_wire(x * w).dtype == torch.float32
    with torch.no_grad():
        assert to_wire((x,))[0] is x  # inside no_grad nothing is sent for backward anyway


# ----------------------------------------------------------------------------------------------------
# 2 stages on 2 gloo ranks


@pytest.mark.distributed
@pytest.mark.slow
def test_two_stage_pipeline_killed_and_resumed_equals_one_process(reference, tiny_data, tmp_path, capsys):
    """ZeRO-1, 2 stages x 1 replica, each step 2 micro-batches of 4 rows (the rows both ranks loaded):
    killed after its first checkpoint and resumed, it logs the same losses as one process with batches of 8."""
    run = tmp_path / "pipe"
    config = write_yaml(
        tmp_path / "c.yaml",
        tiny_raw(
            tiny_data.shards, run, [*KILL_RUN, "dist.engine=deepspeed", "dist.zero_stage=1", "dist.pipeline_stages=2"]
        ),
    )
    check_kill_and_resume(config, run, reference["long"])
    ck = run / "checkpoints" / f"step_{KILL_STEPS:07d}"
    assert sorted(p.name for p in (ck / "ds" / "state").glob("layer_*-model_states.pt")) == [
        f"layer_{i:02d}-model_states.pt" for i in range(5)
    ]
    # the per-layer files convert (DeepSpeed's own zero_to_fp32 cannot read a pipeline checkpoint)
    assert main(["convert", "deepspeed", str(run), "--out", str(tmp_path / "conv")]) == 0
    converted, saved = load_file(str(tmp_path / "conv" / "model.safetensors")), weights(run, KILL_STEPS)
    assert sorted(converted) == sorted(saved) and all(torch.equal(converted[k], saved[k]) for k in saved)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "conv"), "--batches", "1", "--objectives", "causal"]) == 0
    assert "| tiny | causal |" in capsys.readouterr().out


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_curriculum_freezing_a_whole_stage_equals_one_process(reference, tiny_data, tmp_path):
    """Uniform partition puts the encoder and the memory assembly on stage 0; the curriculum's second stage
    freezes the encoder and the embeddings, so stage 0 trains nothing and sends activations without gradient
    (as integer views), here with activation checkpointing (which hands a stage's lone output over untupled).
    The run still equals one process, and stage 0 stays exactly as it was."""
    cur = (
        "curriculum=[{name: joint, steps: 3, weights: {causal: 1.0, copy: 0.5}}, "
        "{name: decoder, steps: 3, weights: {causal: 1.0}, freeze: [encoder, embeddings]}]"
    )
    run = tmp_path / "pipe"
    config = write_yaml(
        tmp_path / "c.yaml",
        tiny_raw(
            tiny_data.shards,
            run,
            [
                *RUN,
                "dist.engine=deepspeed",
                "dist.zero_stage=1",
                "dist.pipeline_stages=2",
                "dist.pipeline_partition=uniform",
                "dist.activation_checkpointing=true",
                cur,
            ],
        ),
    )
    done = torchrun(config)
    assert "pipeline of 2 stages (layers [0, 3, 5]) x 1 replica(s)" in done.stdout
    ref = tmp_path / "ref"
    from helpers import tiny_config

    from memtrain.engine.trainer import train

    train(tiny_config(tiny_data.shards, ref, *RUN, f"data.batch_size={2 * BATCH}", cur))
    same_losses(run, ref, STEPS)
    assert_close_weights(weights(run, STEPS), weights(ref, STEPS))
    w3, w6 = weights(run, 3), weights(run, STEPS)
    stage0 = [k for k in w3 if k.startswith(("encoder.", "decoder_wte."))]
    assert stage0 and all(torch.equal(w3[k], w6[k]) for k in stage0)
    # the logged rate is the schedule's, not the 0 of rank 0's frozen groups
    assert (
        records(run)[STEPS - 1]["lr"] == pytest.approx(records(ref)[STEPS - 1]["lr"])
        and records(ref)[STEPS - 1]["lr"] > 0
    )
