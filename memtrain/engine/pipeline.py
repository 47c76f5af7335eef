"""Pipeline stages: a :class:`~memtrain.models.MemtrainModel` as a sequence of layers for DeepSpeed's
``PipelineModule``.

The layers are built from the model's own submodules (the same parameter objects), so a pipeline run and a
plain run train the same weights under the same names, and every computation is one of the model's own
stage functions, composed here: ``ChunkEncoder.embed`` / ``readout``, ``Stack.run_blocks`` (one block per
layer), ``MemoryModel.encoder_chunks`` / ``unfold_memories`` / ``decoder_input``, ``Autoencoder.inject`` and
``decoder_output`` (the memory model's chunks stay folded into the batch). Activations between layers are tuples:

    memory       ids [R, C*L] -> encoder embedding (x [R*(C-1), L, e], ids) -> encoder blocks (x, ids)
                 -> memory assembly (x_dec [R*C, C+L, d],) -> decoder blocks -> head: hidden [R, C*L, d]
    autoencoder  ids [R, L] -> embedding (x,) -> encoder blocks -> memory + injection (x_dec [R, L, d],)
                 -> decoder blocks -> head: hidden [R, L, d]
    clm          ids [R, T] -> embedding (x,) -> blocks -> head: hidden [R, T, d]

The head layer holds the final norm and ``lm_head``: the loss (:class:`PipelineLoss`) applies them to the
supervised rows only, exactly as :func:`memtrain.objectives.supervised_loss` does in a plain run.

Rows of one micro-batch: every active objective's task rows (:func:`stack_tasks`), so one pass through the
pipeline computes the same weighted sum of objective losses as :func:`memtrain.objectives.compute_losses`.

Between stages, a floating-point activation that needs no gradient (a frozen encoder's output) travels as an
integer view of its bits: DeepSpeed would otherwise ask the receiving stage for its gradient and run a
backward pass into a tensor without a graph. A frozen layer always shares a stage with the next layer that
trains (:func:`pipeline_parts`), because DeepSpeed cannot build an optimizer for a stage without parameters.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from memtrain.errors import UserError
from memtrain.objectives import SpecialTokens, make_task, supervised_loss, task_chunks

#: float dtype -> the integer dtype of the same width that carries it between stages, and back
_AS_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_AS_FLOAT = {v: k for k, v in _AS_INT.items()}


class PipeLayer(nn.Module):
    """One pipeline layer: ``fn`` of the activations tuple, holding the model submodules it uses as children
    (the stage that owns the layer owns, trains and checkpoints them)."""

    def __init__(self, name: str, fn: Callable, **modules: nn.Module):
        super().__init__()
        self.name = name
        self._fn = fn
        for key, module in modules.items():
            self.add_module(key, module)

    def forward(self, acts):
        """acts: a tensor or a tuple of tensors -> a tuple of tensors (the head: hidden [R, T, d])."""
        return self._fn(*(acts if isinstance(acts, tuple) else (acts,)))

    def extra_repr(self) -> str:
        return self.name


def _stack_layers(stack, prefix: str, carry: bool) -> list[PipeLayer]:
    """One layer per block of ``stack`` ((x, ids) -> (x', ids) when ``carry``, else (x,) -> (x',))."""
    layers = []
    for i, block in enumerate(stack.blocks):
        if carry:

            def carried(x, ids, i=i):
                return stack.run_blocks(x, i, i + 1), ids

            fn = carried
        else:

            def single(x, i=i):
                return (stack.run_blocks(x, i, i + 1),)

            fn = single
        layers.append(PipeLayer(f"{prefix}.blocks.{i}", fn, block=block))
    return layers


def _head(model) -> PipeLayer:
    """The decoder's final norm and the output alignment; the loss applies the model's norm and lm_head."""
    dec = model.decoder
    return PipeLayer(
        "head",
        lambda x: model.decoder_output(dec.norm(x)),
        decoder_norm=dec.norm,
        norm=model.norm,
        lm_head=model.lm_head,
    )


def _memory_layers(model) -> list[PipeLayer]:
    layers: list[PipeLayer] = []
    assembly = dict(decoder_proj=model.decoder_proj, decoder_wte=model.decoder_wte)
    enc = model.encoder
    if enc is not None:
        layers.append(PipeLayer("encoder.embed", lambda ids: (enc.embed(model.encoder_chunks(ids)), ids), wte=enc.wte))
        layers += _stack_layers(enc, "encoder", carry=True)
        layers.append(
            PipeLayer(
                "memory assembly",
                lambda x, ids: (model.decoder_input(ids, model.unfold_memories(enc.readout(x), ids.shape[0])),),
                norm=enc.norm,
                down=enc.down,
                up=enc.up,
                **assembly,
            )
        )
    else:
        layers.append(PipeLayer("memory assembly", lambda ids: (model.decoder_input(ids),), **assembly))
    return layers + _stack_layers(model.decoder, "decoder", carry=False) + [_head(model)]


def _autoencoder_layers(model) -> list[PipeLayer]:
    enc = model.encoder
    layers = [PipeLayer("encoder.embed", lambda ids: (enc.embed(ids),), wte=enc.wte)]
    layers += _stack_layers(enc, "encoder", carry=False)
    # contiguous: a repeated memory is an expanded view, and a stage sends whole tensors
    layers.append(
        PipeLayer(
            "memory injection",
            lambda x: (model.inject(enc.readout(x)).contiguous(),),
            norm=enc.norm,
            down=enc.down,
            up=enc.up,
            decoder_proj=model.decoder_proj,
            projection=model.projection,
        )
    )
    return layers + _stack_layers(model.decoder, "decoder", carry=False) + [_head(model)]


def _clm_layers(model) -> list[PipeLayer]:
    layers = [PipeLayer("embed", lambda ids: (model.wte(ids),), wte=model.wte)]
    return layers + _stack_layers(model.decoder, "decoder", carry=False) + [_head(model)]


#: how each model kind of :data:`memtrain.kinds.KINDS` is cut into layers (a test checks every kind has one)
_BUILDERS = {"memory": _memory_layers, "autoencoder": _autoencoder_layers, "clm": _clm_layers}


def pipeline_layers(model) -> list[PipeLayer]:
    """The layers of ``model`` in order; every parameter of the model belongs to exactly one layer.

    Applied in sequence to ``(input_ids,)`` they compute ``model(input_ids)`` (hidden [R, T, d]).
    """
    layers = _BUILDERS[model.kind](model)
    owner: dict[int, str] = {}
    for layer in layers:
        for p in layer.parameters():
            if id(p) in owner:
                raise RuntimeError(f"pipeline layers {owner[id(p)]!r} and {layer.name!r} share a parameter")
            owner[id(p)] = layer.name
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if missing:
        raise RuntimeError(f"pipeline layers miss parameters {missing[:3]}")
    return layers


def run_layers(layers: Sequence[nn.Module], input_ids: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` in order to ``(input_ids,)`` in one process: hidden [R, T, d]."""
    acts: Any = (input_ids,)  # tuples of tensors between layers; the last layer gives the hidden states
    for layer in layers:
        acts = layer(acts)
    return acts


def layer_param_names(model, layers: Sequence[nn.Module]) -> list[dict[str, str]]:
    """For every layer: its own parameter name -> the model's name of that parameter (for converting the
    per-layer checkpoint files of a pipeline run into one model state dict)."""
    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [{n: name_of[id(p)] for n, p in layer.named_parameters()} for layer in layers]


def pipeline_parts(layers: Sequence[nn.Module], stages: int, method: str) -> list[int]:
    """Stage boundaries ``parts`` (stage s holds layers ``parts[s]:parts[s+1]``).

    A layer without trainable parameters (a frozen encoder's) joins the next layer that has some (trailing
    ones join the last); these units are then split by DeepSpeed's own partitioners: ``parameters``
    balances trainable parameters, ``uniform`` the number of layers.
    """
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    trainable = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    starts: list[int] = []  # first layer of each unit
    pending = 0
    for i, n in enumerate(trainable):
        if n:
            starts.append(pending)
            pending = i + 1
    if not starts:
        raise UserError("dist.pipeline_stages: the model has no trainable layer")
    ends = starts[1:] + [len(layers)]
    if stages > len(starts):
        raise UserError(
            f"dist.pipeline_stages {stages} is more than the {len(starts)} pipeline layers that train; use fewer stages"
        )
    if method == "parameters":
        unit_parts = partition_balanced([sum(trainable[a:b]) for a, b in zip(starts, ends)], stages)
    else:
        unit_parts = partition_uniform(len(starts), stages)
    return [starts[u] if u < len(starts) else len(layers) for u in unit_parts]


# ----------------------------------------------------------------------------------------------------
# Data and loss


def stack_tasks(
    model, ids: torch.Tensor, weights: dict[str, float], special: SpecialTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pipeline micro-batch from token rows ``ids`` [m, T]: every active objective's task rows, stacked
    in the order of ``weights``: inputs [K*m, T] and aligned labels [K*m, T] (rows k*m..(k+1)*m-1 are
    objective k's, built by :func:`memtrain.objectives.make_task` and ``model.align_labels``)."""
    inputs, labels = [], []
    for name in weights:
        x, targets = make_task(name, ids, special, task_chunks(model))
        inputs.append(x)
        labels.append(model.align_labels(targets))
    return torch.cat(inputs), torch.cat(labels)


class PipelineLoss:
    """``loss_fn`` of the pipeline: hidden [K*m, T, d] and labels [K*m, T] -> Σ_k w_k · CE_k, the weighted
    sum :func:`memtrain.objectives.compute_losses` gives for the same m rows. Each call's per-objective
    statistics (detached) are appended to :attr:`records` for logging."""

    def __init__(self, model):
        self.model = model
        self.weights: dict[str, float] = {}
        self.records: list[dict] = []

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m = labels.shape[0] // len(self.weights)
        total = None
        record = {}
        for k, (name, w) in enumerate(self.weights.items()):
            stats = supervised_loss(self.model, hidden[k * m : (k + 1) * m], labels[k * m : (k + 1) * m])
            record[name] = stats
            total = w * stats.loss if total is None else total + w * stats.loss
        self.records.append(record)
        assert total is not None  # self.weights is not empty (m divides by its length)
        return total


# ----------------------------------------------------------------------------------------------------
# Between stages


def to_wire(acts):
    """A stage's outputs (a tensor or a tuple) -> what DeepSpeed sends: float tensors that need no gradient
    as integer views."""
    if not torch.is_grad_enabled():
        return acts

    def one(t):
        return t.view(_AS_INT[t.dtype]) if t.dtype in _AS_INT and not t.requires_grad else t

    return tuple(one(t) for t in acts) if isinstance(acts, tuple) else one(acts)


def from_wire(acts):
    """What a stage received (a tensor or a tuple) -> its inputs (integer views back to the float tensors
    they carry)."""

    def one(t):
        return t.view(_AS_FLOAT[t.dtype]) if t.dtype in _AS_FLOAT else t

    return tuple(one(t) for t in acts) if isinstance(acts, tuple) else one(acts)


def build_pipeline_module(model, stages: int, method: str, loss_fn: PipelineLoss, activation_checkpointing: bool):
    """A DeepSpeed ``PipelineModule`` over :func:`pipeline_layers` of ``model`` with :func:`pipeline_parts`
    boundaries (needs an initialised process group). Returns (module, layers, parts)."""
    from deepspeed.pipe import PipelineModule

    class MemtrainPipe(PipelineModule):
        """PipelineModule with preset stage boundaries that converts activations for the wire at stage edges."""

        def _partition_layers(self, method="uniform"):
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def forward(self, forward_input):
            out = super().forward(from_wire(forward_input))
            if self._local_stop == len(layers):
                return out
            # always a tuple: DeepSpeed skips non-float members of a tuple when it returns gradients, but it
            # wants a gradient for a lone tensor (non-reentrant checkpointing unwraps one-element tuples)
            return to_wire(out if isinstance(out, tuple) else (out,))

    layers = pipeline_layers(model)
    parts = pipeline_parts(layers, stages, method)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its seed and topology settings
        module = MemtrainPipe(
            layers=layers,
            num_stages=stages,
            loss_fn=loss_fn,
            partition_method=method,
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
        )
    return module, layers, parts
