"""Typed run configuration, read from YAML, with ``--set a.b=c`` overrides.

Validation is pydantic's (``extra="forbid"`` everywhere, so a misspelt key is an error); this module only
turns pydantic's errors into one readable line that names the field, says what was expected and, for an
unknown key, suggests the closest valid one.

A run config has these sections:

``run``        name, output directory, seed
``model``      what to build (memory model, autoencoder or causal LM; mixer or transformer stacks)
``objective``  weights of the causal / copy / blank-copy / reconstruction losses and the special tokens
``curriculum`` optional list of stages, each with its own steps, objective weights and frozen modules
``data``       shard directories (local or remote), batch size, loader workers
``optim``      AdamW and the learning-rate schedule
``train``      steps, precision, evaluation / logging / checkpoint cadence, device
``dist``       the distributed engine
``slurm``      resources and launcher of ``memtrain submit`` / ``memtrain sweep``

Every field is documented where it is declared, in its ``Field(description=...)`` (Markdown). Those
descriptions, the class docstrings and the notes in :mod:`memtrain.config_docs` are the source of
``docs/config.md``: regenerate it with ``python -m memtrain.config_docs --write docs/config.md``
(``tests/test_config_docs.py`` fails while it is out of date or a field has no description).
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import yaml
from memtrain.errors import UserError
from memtrain.kinds import KINDS

OBJECTIVES = ("causal", "copy", "blank_copy", "reconstruction")
MODULE_GROUPS = ("encoder", "decoder", "embeddings", "head")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: str) -> str:
    """Refuse control characters (newline, carriage return, tab, escape, NUL ...) in a one-line text."""
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("must be one line of printable text (no newline or other control character)")
    return value


class RunConfig(_Strict):
    name: str = Field(
        default="run", description=("Label of the run in logs, results tables and reports, and its Slurm job name.")
    )
    out_dir: str = Field(
        default="runs/run",
        description=(
            "Run directory: `config.yaml`, `checkpoints/`, `tb/`, `metrics.jsonl`, `summary.json`. One run per "
            "directory: a directory holding a different run is refused, and one holding this run's checkpoints "
            "needs `--resume`."
        ),
    )
    seed: int = Field(
        default=0, description="Seed of the model's initialisation and of the data order (the loader's shuffle)."
    )

    _one_line = field_validator("name", "out_dir")(_no_control)


class StackConfig(_Strict):
    """One stack of blocks (an encoder, a decoder, or a causal LM's body)."""

    arch: Literal["mixer", "transformer"] = Field(
        default="mixer",
        description=(
            "`mixer`: masked-mixer blocks (learned, position-specific causal token mixing; LayerNorm; GELU FFN; no "
            "positional encoding). `transformer`: Llama-style blocks (RMSNorm, rotary causal attention, SwiGLU MLP). "
            "See `docs/models.md`."
        ),
    )
    d_model: int = Field(
        default=128, ge=8, description=("Width of the hidden states (the encoder's is the memory width).")
    )
    n_layers: int = Field(default=2, ge=1, description="Number of blocks.")
    kernel: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Mixer only (a transformer needs 1): taps along the feature axis of the causal token mixing (the "
            "reference's Conv1d kernel size); 1 = one dense L×L mixing matrix shared by all features."
        ),
    )
    n_heads: int = Field(
        default=0,
        ge=0,
        description=(
            "Mixer: 0 = one shared L×L mixing matrix, h > 0 = h heads of width d_model/h, each with its own mixing "
            "matrix, between an input and an output projection. Transformer: attention heads (>= 1, and "
            "d_model/n_heads must be even). Must divide d_model."
        ),
    )
    ffn_mult: int = Field(
        default=4,
        ge=1,
        description=(
            "Feed-forward hidden width as a multiple of d_model (mixer: GELU FFN d → ffn_mult·d → d; transformer: "
            "SwiGLU MLP with hidden ffn_mult·d)."
        ),
    )
    norm_eps: float = Field(
        default=1e-5, gt=0, description="Epsilon of the norms (LayerNorm in a mixer, RMSNorm in a transformer)."
    )
    rope_theta: float = Field(
        default=10000.0, gt=0, description="Transformer only: base θ of the rotary position embeddings."
    )

    @model_validator(mode="after")
    def _check(self) -> StackConfig:
        if self.arch == "transformer":
            if self.n_heads < 1:
                raise ValueError("n_heads must be >= 1 for a transformer stack")
            if self.kernel != 1:
                raise ValueError("kernel applies to mixer stacks only; set kernel: 1 for a transformer")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.arch == "transformer" and (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model / n_heads must be even for rotary embeddings")
        return self


class FrozenEncoderConfig(_Strict):
    """An encoder that does not train: loaded from a checkpoint (or left as initialised) and frozen for the
    whole run; it then runs under ``torch.no_grad()``. Only a memory model with memories or an autoencoder
    has an encoder to freeze."""

    checkpoint: str | None = Field(
        default=None,
        description=(
            "Run directory (its newest checkpoint) or checkpoint directory of an autoencoder or memory model whose "
            "encoder, token embedding included, is loaded and frozen; its shape must match `model.encoder`, "
            "`model.compression` and `model.final_norm`. null keeps the freshly initialised encoder and freezes it "
            "(the untrained control of a retention probe)."
        ),
    )


class HFLoraConfig(_Strict):
    """LoRA adapters (peft) on an HF decoder (``model.hf_decoder.mode: lora``)."""

    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha (peft's `lora_alpha`; the adapters are scaled by alpha / r)."
    )
    dropout: float = Field(
        default=0.0, ge=0, lt=1, description=("Dropout on the adapters' input (peft's `lora_dropout`).")
    )
    target_modules: str | list[str] = Field(
        default="all-linear",
        description=(
            "Modules to adapt: `all-linear` = every Linear of the LLM's body (not its output head), or a list of "
            "module names such as `[q_proj, v_proj]`; names that match nothing are an error."
        ),
    )


class HFDecoderConfig(_Strict):
    """A pretrained Hugging Face causal LM as the memory model's decoder (docs/llm_decoders.md): the encoder's
    memories are projected to the LLM's embedding width and read as prefix slots before each chunk's tokens."""

    path: str = Field(
        ...,
        description=(
            "Local directory that transformers' `AutoModelForCausalLM` loads (config.json, weights, tokenizer)."
        ),
    )
    mode: Literal["full", "lora", "frozen"] = Field(
        default="full",
        description=(
            "`full`: every LLM weight trains; `lora`: only LoRA adapters train, the LLM's own weights stay as loaded; "
            "`frozen`: the LLM stays as loaded and only the projector (and the encoder, unless `model.frozen_encoder` "
            "is set) train."
        ),
    )
    lora: HFLoraConfig = Field(
        default=HFLoraConfig(), description=("The LoRA adapters of `mode: lora` (unused otherwise).")
    )
    chunk_len: int | None = Field(
        default=None,
        ge=2,
        description=(
            "L_dec: the LLM tokenizer's tokens per chunk (shards made with `memtrain data shards "
            "--decoder-tokenizer`); null = `model.chunk_len`."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute the LLM's layer activations in the backward pass (transformers' gradient checkpointing, "
            "non-reentrant)."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description=(
            "Dtype the LLM's weights (and the projector) are loaded in; DeepSpeed bf16 casts the whole model itself."
        ),
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        default="sdpa", description=("transformers' attention implementation for the LLM.")
    )


class ModelConfig(_Strict):
    """Built by ``memtrain.models.build_model`` (docs/models.md). A row of data holds
    ``n_chunks × chunk_len`` tokens (with ``hf_decoder``: ``n_chunks × (chunk_len + hf_decoder.chunk_len)``),
    and the shards' rows must have exactly that length."""

    kind: Literal["memory", "autoencoder", "clm"] = Field(
        default="memory",
        description=(
            "`memory`: an encoder turns each chunk into one memory and the decoder of chunk c reads the memories of "
            "chunks 0..c−1; `autoencoder`: one chunk reconstructed from its memory; `clm`: a causal LM over the "
            "whole row (the full-context baseline)."
        ),
    )
    vocab_size: int | None = Field(
        default=None,
        ge=8,
        description=(
            "Vocabulary size; null takes it from the shards' tokenizer, and a value must equal it (with "
            "`hf_decoder`: the encoder's vocabulary; the LLM keeps its own)."
        ),
    )
    chunk_len: int = Field(
        default=64, ge=2, description=("L: tokens per chunk (the autoencoder's and the memory encoder's context).")
    )
    n_chunks: int = Field(
        default=4,
        ge=1,
        description=(
            "C: chunks per row. Memory model: C >= 2 chunks of L tokens (even for the copy objectives, whose halves "
            "are whole chunks); clm: a context of C·L tokens; autoencoder: must be 1."
        ),
    )
    encoder: StackConfig = Field(
        default=StackConfig(),
        description=("The encoder stack (memory model, autoencoder); its d_model is the memory width."),
    )
    decoder: StackConfig = Field(
        default=StackConfig(),
        description=("The decoder stack (for `clm`: the model's body; unused with `hf_decoder`)."),
    )
    memory_position: int = Field(
        default=-1,
        le=-1,
        description=(
            "Encoder position read as the memory: -1 the last, -2 the second to last (for encoders trained as causal "
            "LMs, whose last position never trained)."
        ),
    )
    injection: Literal["repeat", "unroll"] = Field(
        default="repeat",
        description=(
            "Autoencoder: how the memory feeds the decoder positions: `repeat` puts it at every position; `unroll` "
            "takes cyclic windows of width d/2 of it, then Linear(d/2, d) (needs an even `decoder.d_model`)."
        ),
    )
    compression: int = Field(
        default=1,
        ge=1,
        description=(
            "Memory bottleneck factor c: memory → Linear(e, e/c) → Linear(e/c, e); 1 = none. Must divide "
            "`encoder.d_model`."
        ),
    )
    no_memory: bool = Field(
        default=False,
        description=(
            "Memory-model control: no encoder is built and every memory slot stays zero (the same decoder without "
            "memories)."
        ),
    )
    frozen_encoder: FrozenEncoderConfig | None = Field(
        default=None,
        description=("Freeze the encoder for the whole run, loaded from `checkpoint`; null = the encoder trains."),
    )
    hf_decoder: HFDecoderConfig | None = Field(
        default=None,
        description=(
            "A pretrained Hugging Face causal LM as the decoder (`kind: memory` only); null = memtrain's own "
            "decoder stack."
        ),
    )
    final_norm: bool = Field(
        default=True,
        description=(
            "A final norm at the end of the encoder (before the memory is read) and before the LM head (the "
            "reference has neither)."
        ),
    )
    tie_embeddings: bool = Field(
        default=False,
        description=(
            "The LM head shares the token embedding (the decoder's; an autoencoder's encoder embedding); their "
            "shapes must match. Not with `dist.pipeline_stages` > 1, nor for an autoencoder whose encoder or head "
            "alone is frozen (`model.frozen_encoder`, a stage's `freeze`): the shared weight would freeze on both "
            "sides."
        ),
    )
    init: Literal["arch", "torch"] = Field(
        default="arch",
        description=(
            "How the Linear and Embedding weights of memtrain's own stacks start: `arch` = as each architecture "
            "does (transformers N(0, 0.02) like HF Llama, mixers PyTorch's defaults); `torch` = PyTorch's defaults "
            "for every one (embeddings N(0, 1), Linear U(±1/√fan_in)). A small transformer autoencoder leaves the "
            "token-frequency plateau several times sooner with `torch` (docs/reproduction.md)."
        ),
    )
    kernels: Literal["auto", "triton", "torch"] = Field(
        default="auto",
        description=(
            "Implementation of the mixer blocks and of the output head + loss: `auto` = the one measured fastest, "
            "today the pure-torch reference on every device (on an H200 each Triton kernel lost to torch eager, "
            "docs/performance.md; `train.compile` fuses the reference); `triton` = the Triton kernels (on CPU only "
            "under `TRITON_INTERPRET=1`), e.g. for the chunked head's memory at a large vocabulary; `torch` = the "
            "reference everywhere. Same results up to rounding."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "autoencoder" and self.n_chunks != 1:
            raise ValueError("an autoencoder reads one chunk: set n_chunks: 1")
        if self.kind == "memory" and self.n_chunks < 2:
            raise ValueError("a memory model needs n_chunks >= 2")
        if -self.memory_position > self.chunk_len:
            raise ValueError(f"memory_position {self.memory_position} lies outside a chunk of {self.chunk_len}")
        if self.compression > 1 and self.encoder.d_model % self.compression:
            raise ValueError("encoder.d_model must be divisible by compression")
        if self.kind == "autoencoder" and self.injection == "unroll" and self.decoder.d_model % 2:
            raise ValueError("unroll injection needs an even decoder.d_model")
        if self.hf_decoder is not None and self.kind != "memory":
            raise ValueError("hf_decoder: an LLM decoder reads memories, so it needs kind: memory")
        return self

    @property
    def decoder_chunk_len(self) -> int:
        """Decoder tokens per chunk: hf_decoder.chunk_len (or L) with an HF decoder, else L."""
        hf = self.hf_decoder
        return self.chunk_len if hf is None or hf.chunk_len is None else hf.chunk_len

    @property
    def seq_len(self) -> int:
        """Tokens per data row: C * L; with an HF decoder C * (L + L_dec), each chunk's encoder tokens then its
        decoder tokens (the dual rows of memtrain.data.dual)."""
        if self.hf_decoder is not None:
            return self.n_chunks * (self.chunk_len + self.decoder_chunk_len)
        return self.chunk_len * self.n_chunks


with warnings.catch_warnings():  # the objective is called "copy"; it shadows BaseModel.copy on purpose
    warnings.simplefilter("ignore", UserWarning)

    class ObjectiveWeights(_Strict):
        """Objective name -> weight (0 = not trained). Each active objective (weight > 0) is one forward pass
        (under a pipeline, the objectives' task rows share each micro-batch) whose loss is the cross-entropy
        averaged over its supervised tokens; the training loss is the weighted sum. An autoencoder trains
        ``reconstruction`` only; the other models train ``causal``, ``copy`` and ``blank_copy``."""

        causal: float = Field(
            default=0.0,
            ge=0,
            description=(
                "Next-token prediction over the row (a memory model's decoder reads the memories of the earlier "
                "chunks)."
            ),
        )
        copy: float = Field(
            default=0.0,
            ge=0,
            description=(
                "Copy: the row becomes its first half twice, the copied half opening with `n_delimiters` delimiter "
                "tokens; only the copied half is scored."
            ),
        )
        blank_copy: float = Field(
            default=0.0,
            ge=0,
            description=(
                "Blank copy: copy with the copied half's inputs replaced by the filler token, so the copied tokens "
                "reach the decoder only through the memories."
            ),
        )
        reconstruction: float = Field(
            default=0.0,
            ge=0,
            description=("Reconstruction of every token of the chunk from its memory (autoencoder only)."),
        )

        def active(self) -> dict[str, float]:
            """Objectives with a weight > 0, in a fixed order."""
            return {k: v for k, v in self.model_dump().items() if v > 0}


#: Effective weighting of the reference code's "combined" objective: per-chunk CE averaged over C chunks
#: for the causal pass plus the copy pass's loss summed over its 2 supervised chunks and divided by C = 4,
#: i.e. the copy loss weighted 1/2 against the causal loss (docs/reference.md §4.3).
PRESETS: dict[str, dict[str, float]] = {
    "reference_combined": {"causal": 1.0, "copy": 0.5},
    "reference_blank_combined": {"causal": 1.0, "blank_copy": 0.5},
}


class ObjectiveConfig(_Strict):
    weights: ObjectiveWeights = Field(
        default=ObjectiveWeights(causal=1.0),
        description=(
            "Objective weights for the whole run (unused when a `curriculum` is given); at least one must be > 0."
        ),
    )
    preset: Literal["reference_combined", "reference_blank_combined"] | None = Field(
        default=None,
        description=(
            "Named weighting that replaces `weights`: `reference_combined` = causal 1 + copy 0.5, the reference "
            'code\'s effective weighting of its "combined" objective (`docs/reference.md` §4.3); '
            "`reference_blank_combined` = causal 1 + blank_copy 0.5."
        ),
    )
    delimiter_id: int | None = Field(
        default=None, ge=0, description=("Token id of the copy delimiter; null = the tokenizer's `<sep>`.")
    )
    n_delimiters: int = Field(
        default=1,
        ge=0,
        description=(
            "Delimiter tokens opening the copied half: they replace its first tokens and are not scored (the "
            "reference uses 3)."
        ),
    )
    filler_id: int | None = Field(
        default=None, ge=0, description=("Token id of the blank-copy filler; null = the tokenizer's `<blank>`.")
    )

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.preset is not None:
            object.__setattr__(self, "weights", ObjectiveWeights(**PRESETS[self.preset]))
        if not self.weights.active():
            raise ValueError("at least one objective weight must be > 0")
        return self


class StageConfig(_Strict):
    name: str = Field(..., description="Label of the stage in logs.")
    steps: int = Field(..., ge=1, description="Optimizer steps of this stage.")
    weights: ObjectiveWeights = Field(..., description="Objective weights in this stage; at least one must be > 0.")
    freeze: list[Literal["encoder", "decoder", "embeddings", "head"]] = Field(
        default=[],
        description=(
            "Module groups whose parameters do not train in this stage: `encoder` (its embedding, blocks, norm and "
            "bottleneck), `decoder` (the decoder stack with its embedding and memory projection; an HF decoder's "
            "LLM body), `embeddings` (every token embedding), `head` (final norm and LM head)."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if not self.weights.active():
            raise ValueError(f"stage {self.name!r}: at least one objective weight must be > 0")
        return self


class DataConfig(_Strict):
    shards: str = Field(
        default="data/demo/shards",
        description=(
            "MDS shard directory made by `memtrain data shards` (its `train/` and `val/` splits), or a remote URL "
            "that mosaicml-streaming reads (`s3://`, `gs://`, `file://`, ...; `docs/data.md`, "
            "`docs/remote-shards.md`)."
        ),
    )
    cache_dir: str | None = Field(
        default=None,
        description=(
            "Local cache directory when `shards` is a URL (node-local storage: the ranks of a node share it, and "
            "it must be a directory of this user that no one else can write to); null = `memtrain-<uid>/shard-cache` "
            "in the temp directory (`$TMPDIR`, else `/tmp`)."
        ),
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        description=(
            "Rows per loaded batch on each rank (each rank reads its own rows). One optimizer step takes "
            "`optim.grad_accum` loaded batches per rank, so the global batch is `batch_size × grad_accum × ranks` "
            "rows; `dist.micro_batch_size` splits each loaded batch for the forward/backward passes. Also the "
            "batch size of held-out evaluation."
        ),
    )
    num_workers: int = Field(
        default=0, ge=0, description=("DataLoader worker processes per rank (0 = load in the training process).")
    )
    num_canonical_nodes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Number of nodes the training order is laid out for (mosaicml-streaming's `num_canonical_nodes`): "
            "runs with the same value read the same global sample order on any number of nodes, so set it to "
            "compare or resume runs across node counts. null = the number of nodes of the run "
            "(WORLD_SIZE / LOCAL_WORLD_SIZE). A resumed run keeps the value its checkpoint was written with."
        ),
    )
    shuffle: bool = Field(
        default=True,
        description=(
            "Shuffle the training rows, deterministically from `run.seed` (held-out batches are never shuffled)."
        ),
    )
    memories: str | None = Field(
        default=None,
        description=(
            "Memory-shard directory made by `memtrain precompute` from these shards with the model's frozen encoder: "
            "training reads the stored memories with every batch and skips the encoder (`docs/precompute.md`)."
        ),
    )


class OptimConfig(_Strict):
    """AdamW (apex's ``FusedAdam`` on CUDA when apex is installed, else torch's fused AdamW; torch's AdamW
    under DeepSpeed) and transformers' warmup + decay schedule, stepped once per optimizer step."""

    lr: float = Field(default=5e-4, gt=0, description="Peak learning rate, reached at the end of the warmup.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        description=(
            "AdamW weight decay, on matrices (parameters with >= 2 dimensions) only; norms and biases are not decayed."
        ),
    )
    warmup_steps: int = Field(
        default=100, ge=0, description=("Steps of linear warmup from 0 (at most `train.steps` − 1).")
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description=("After the warmup: cosine decay to 0, linear decay to 0, or constant.")
    )
    grad_clip: float = Field(
        default=1.0, ge=0, description=("Clip the global gradient norm to this; 0 disables clipping.")
    )
    grad_accum: int = Field(
        default=1,
        ge=1,
        description=(
            "Loaded batches (of `data.batch_size` rows) per rank per optimizer step; their gradients are "
            "accumulated. Global batch = `data.batch_size × grad_accum × ranks` rows. Not DeepSpeed's "
            "`gradient_accumulation_steps`, which counts micro-batches."
        ),
    )


class WandbConfig(_Strict):
    """Weights & Biases settings, used when `train.loggers` names `wandb` (docs/observability.md). W&B's own
    environment variables (`WANDB_MODE=offline`, `WANDB_API_KEY`, `WANDB_BASE_URL` ...) apply as usual."""

    project: str = Field(default="memtrain", description="W&B project.")
    entity: str | None = Field(default=None, description="W&B entity (user or team); null = the account's default.")
    group: str | None = Field(default=None, description="W&B run group, e.g. a sweep's name; null = none.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")

    _one_line = field_validator("project", "entity", "group")(_no_control)


class MlflowConfig(_Strict):
    """MLflow settings, used when `train.loggers` names `mlflow` (docs/observability.md)."""

    tracking_uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking URI (`http://host:5000`, `sqlite:///mlflow.db`, `file:///path/mlruns` ...); null = "
            "MLflow's default (`MLFLOW_TRACKING_URI`)."
        ),
    )
    experiment: str = Field(default="memtrain", description="MLflow experiment; created if missing.")

    _one_line = field_validator("tracking_uri", "experiment")(_no_control)


class ProfileConfig(_Strict):
    """A torch.profiler trace of a few training steps (docs/observability.md)."""

    start: int = Field(
        ..., ge=1, description=("First profiled optimizer step (steps are numbered from 1, as in the logs).")
    )
    steps: int = Field(default=5, ge=1, le=1000, description="Profiled steps: `start` .. `start + steps - 1`.")
    memory: bool = Field(
        default=True,
        description=("On CUDA, also record the allocator's history over those steps and write a memory snapshot."),
    )


class TrainConfig(_Strict):
    steps: int = Field(
        default=1000,
        ge=1,
        description=("Optimizer steps of the run (the schedule's length; `curriculum` stages must add up to it)."),
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "`bf16`: bf16 autocast (plain engine) or a bf16 model with fp32 master weights (DeepSpeed); `fp32`; "
            "`auto`: bf16 on a CUDA device that supports it, else fp32."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description=(
            "`auto`: CUDA when available (GPU `LOCAL_RANK` of the node), else CPU; `cuda` fails without a GPU."
        ),
    )
    eval_every: int = Field(
        default=200,
        ge=0,
        description=(
            "Held-out evaluation every this many steps, and always at the end; 0 = only at the end. Shards "
            "without a `val` split train without evaluation."
        ),
    )
    eval_batches: int = Field(
        default=16,
        ge=1,
        description=(
            "Held-out batches per evaluation: the first `eval_batches` batches of `data.batch_size` rows of the "
            "`val` split on each rank, the same at every evaluation; metrics are pooled over all ranks."
        ),
    )
    log_every: int = Field(
        default=10,
        ge=1,
        description=(
            "Log every this many steps (and at the last one) to every sink of `loggers`: loss and accuracy per "
            "objective pooled over the steps since the previous log and over all ranks, learning rate, gradient "
            "norm, tokens/s (all ranks and per rank), model TFLOP/s per device, MFU, peak memory, step time and "
            "ETA (docs/observability.md). Without a progress bar, rank 0 also prints these as one plain line."
        ),
    )
    loggers: list[Literal["tensorboard", "jsonl", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard", "jsonl"],
        description=(
            "Where the logged numbers go: `tensorboard` (`tb/`), `jsonl` (`metrics.jsonl`, which `sweep collect`, "
            "the plots and `repro` read), `wandb` (see `wandb`), `mlflow` (see `mlflow`). W&B and MLflow are "
            "optional installs (`pip install wandb`, `pip install mlflow`); a resumed run continues the same W&B "
            "and MLflow run."
        ),
    )
    wandb: WandbConfig = Field(default=WandbConfig(), description="W&B project, entity, group and tags.")
    mlflow: MlflowConfig = Field(default=MlflowConfig(), description="MLflow tracking URI and experiment.")
    peak_tflops: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Dense peak TFLOP/s of one device for the MFU column; null = the datasheet peak of a known GPU at the "
            "run's precision (docs/performance.md), and no MFU on CPU or an unknown device."
        ),
    )
    profile: ProfileConfig | None = Field(
        default=None,
        description=(
            "Profile a few steps: a torch.profiler trace per rank, and on CUDA a memory snapshot, under "
            "`<run>/profile/`; training then continues. null = no profiling."
        ),
    )
    ckpt_every: int = Field(
        default=500,
        ge=0,
        description=(
            "Checkpoint every this many steps; 0 = only at the end (a run stopped early or preempted also checkpoints)."
        ),
    )
    stop_check_every: int = Field(
        default=10,
        ge=1,
        description=(
            "In a multi-rank run, the ranks agree whether a preemption signal (USR1/TERM, `slurm.signal_seconds`) "
            "reached any of them every this many steps, and also at every checkpoint step and at the last step "
            "(of the run, or of `--stop-after`); they then all stop after the same step, checkpoint and exit 75. "
            "Agreeing is an all-reduce that waits for the device, so checking at every step (1) would stall a GPU "
            "at every step; at the default 10 it coincides with the wait that `log_every: 10` already makes. A "
            "single process checks its own flag at every step whatever this is. A signal therefore costs at most "
            "this many steps before the checkpoint starts: send it (`slurm.signal_seconds`) at least "
            "`stop_check_every` step times plus one checkpoint write before the time limit."
        ),
    )
    keep_ckpts: int = Field(default=2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    compile: bool = Field(default=False, description="`torch.compile` the model.")
    threads: int | None = Field(
        default=None, ge=1, description=("torch CPU threads (`torch.set_num_threads`); null = torch's default.")
    )
    progress: bool = Field(
        default=True,
        description=(
            "A progress bar on rank 0 when stderr is a terminal; in a batch log (stderr not a terminal), or with "
            "`false`, one plain line per `log_every` steps instead."
        ),
    )

    @field_validator("loggers")
    @classmethod
    def _unique_loggers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each logger at most once")
        return value


class DistConfig(_Strict):
    """The distributed engine (docs/distributed.md). Invalid combinations are refused when the config is read,
    before any process group starts."""

    engine: Literal["plain", "deepspeed"] = Field(
        default="plain",
        description=("`plain`: one process, or DDP under `torchrun`; `deepspeed`: DeepSpeed ZeRO / pipeline engine."),
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description=("Process-group backend; `auto` = `nccl` on CUDA, `gloo` on CPU.")
    )
    zero_stage: int = Field(
        default=0,
        ge=0,
        le=3,
        description=(
            "DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters partitioned over the "
            "data-parallel ranks (`engine: deepspeed`)."
        ),
    )
    offload_optimizer: bool = Field(
        default=False,
        description=("ZeRO-Offload: keep the optimizer states in CPU memory (`zero_stage` >= 1, no pipeline)."),
    )
    offload_param: bool = Field(
        default=False, description=("ZeRO-Offload: keep the parameters in CPU memory (`zero_stage: 3`, no pipeline).")
    )
    pipeline_stages: int = Field(
        default=1,
        ge=1,
        description=(
            "DeepSpeed pipeline stages (1 = no pipeline); must divide the number of ranks, `zero_stage` 0 or 1, no "
            "offload, `hf_decoder`, `tie_embeddings` or `data.memories`, and at most as many stages as the model "
            "has trainable pipeline layers."
        ),
    )
    pipeline_partition: Literal["parameters", "uniform"] = Field(
        default="parameters",
        description=(
            "How layers are split into stages: `parameters` balances trainable parameters, `uniform` the number of "
            "layers."
        ),
    )
    activation_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute each block's activations in the backward pass instead of storing them (every engine; an HF "
            "decoder's LLM has `model.hf_decoder.gradient_checkpointing`)."
        ),
    )
    timeout_s: int = Field(
        default=600,
        ge=1,
        description=(
            "Seconds a rank waits in the process group's start-up and in any collective (all-reduce, barrier, "
            "checkpoint) for the other ranks before it fails. A rank that dies or hangs then ends the whole run "
            "within about this time instead of leaving the others waiting; keep it above the longest "
            "checkpoint write or evaluation."
        ),
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Rows per forward/backward pass (a micro-batch; the pipeline's unit). Each loaded batch of "
            "`data.batch_size` rows runs as `data.batch_size / micro_batch_size` micro-batches (it must divide "
            "`data.batch_size`); null = `data.batch_size`. Trades activation memory for passes: the global batch, "
            "data order and optimizer steps stay the same."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> DistConfig:
        if self.engine == "plain":
            for name, value, default in (
                ("zero_stage", self.zero_stage, 0),
                ("pipeline_stages", self.pipeline_stages, 1),
                ("offload_optimizer", self.offload_optimizer, False),
                ("offload_param", self.offload_param, False),
            ):
                if value != default:
                    raise ValueError(
                        f"{name}: {value} needs engine: deepspeed (the plain engine is one process or torchrun DDP)"
                    )
        if self.pipeline_stages > 1 and self.zero_stage >= 2:
            raise ValueError(
                f"ZeRO-{self.zero_stage} partitions gradients, which DeepSpeed's pipeline cannot do; "
                "use zero_stage 0 or 1 with pipeline_stages > 1"
            )
        if self.pipeline_stages > 1 and (self.offload_optimizer or self.offload_param):
            raise ValueError("offload is not supported with pipeline_stages > 1; use ZeRO-2/3 without a pipeline")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3 (only ZeRO-3 partitions the parameters)")
        return self


_SLURM_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_SLURM_NAMES = re.compile(r"^[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_CONTAINER_IMAGE = re.compile(r"^[A-Za-z0-9._/:@#+~-]+$")
_MOUNT = re.compile(r"^/[A-Za-z0-9._/+~-]*(:/[A-Za-z0-9._/+~-]*(:(ro|rw))?)?$")
_SBATCH_OPTION = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"\\`\x00-\x1f\x7f]+)?$")


class SlurmConfig(_Strict):
    """Resources and launch for ``memtrain submit`` / ``memtrain sweep``; their flags override these."""

    nodes: int = Field(default=1, ge=1, description="Nodes to allocate.")
    gpus_per_node: int = Field(
        default=0,
        ge=0,
        description=("GPUs per node, one rank per GPU; 0 = CPU-only ranks, `tasks_per_node` of them per node."),
    )
    tasks_per_node: int = Field(
        default=1,
        ge=1,
        description=(
            "Ranks per node when `gpus_per_node` is 0 (with GPUs there is one rank per GPU; with the `srun` "
            "launcher leave it at 1)."
        ),
    )
    cpus_per_task: int | None = Field(
        default=None,
        ge=1,
        description=(
            "CPUs per Slurm task: per rank with the `srun` launcher, per node with `torchrun` and `deepspeed` (one "
            "launcher task per node). null = from the partition (`sinfo`): with GPUs, the node's CPUs divided by its "
            "GPUs for each GPU asked for; without, all the node's CPUs shared by its ranks; when the cluster cannot "
            "be asked (a dry run on a laptop), 8 per GPU or 1 per CPU rank. Each rank's `OMP_NUM_THREADS` is its "
            "share."
        ),
    )
    time: str | None = Field(
        default=None,
        description=(
            "Time limit, e.g. `01:00:00` or `2-00:00:00`. null = `01:00:00` for runs of at most 10,000 steps; longer "
            "runs must give one (a run that outlives it checkpoints and requeues itself)."
        ),
    )
    partition: str | None = Field(default=None, description="Partition; null = the cluster's default partition.")
    account: str | None = Field(default=None, description="Account to charge; null = none given.")
    launcher: Literal["srun", "torchrun", "deepspeed"] = Field(
        default="srun",
        description=(
            "`srun`: one task per rank (signals reach every rank); `torchrun`: one torchrun per node (c10d "
            "rendezvous on the head node); `deepspeed`: the deepspeed launcher with a hostfile from the node list."
        ),
    )
    signal_seconds: int = Field(
        default=120,
        ge=0,
        description=(
            "Seconds before the time limit at which Slurm sends USR1 to the training ranks (with every launcher; "
            "`torchrun` and the DeepSpeed launcher ignore it and only the ranks act on it): they finish the step, "
            "checkpoint and the job requeues. The ranks have all of this time; 0 = no signal."
        ),
    )
    requeue: bool = Field(default=True, description="Let Slurm requeue the job (`--requeue`); false = `--no-requeue`.")
    max_requeues: int = Field(
        default=20,
        ge=0,
        description=(
            "Most times a preempted job requeues itself (Slurm's `SLURM_RESTART_COUNT` is compared with it); after "
            "that a preempted job stops with a log line, and resubmitting continues from the newest checkpoint. "
            "0 = never requeue."
        ),
    )
    gpu_flag: Literal["auto", "gres", "gpus-per-node"] = Field(
        default="auto",
        description=(
            "How GPUs are asked for: `gres` = `--gres=gpu:N`, `gpus-per-node` = `--gpus-per-node=N`; `auto` = "
            "`--gres` when `sinfo` reports the partition's GPUs as gres, `--gpus-per-node` when the cluster cannot "
            "be asked."
        ),
    )
    setup: list[str] = Field(
        default=[],
        description=(
            "Shell lines the job runs before it launches training, one command per item (e.g. `module load "
            "cuda/12.4`, `source /shared/venv/bin/activate`); the job stops, naming the line, when one fails. They "
            "run as written: read them before submitting a config from someone else."
        ),
    )
    container: str | None = Field(
        default=None,
        description=(
            "A container image the ranks run in (with every launcher): an enroot/pyxis image (`nvcr.io#nvidia/"
            "pytorch:24.08-py3` or a `.sqsh` path) or an apptainer `.sif`, see `container_runtime`. null = none."
        ),
    )
    container_runtime: Literal["pyxis", "apptainer"] = Field(
        default="pyxis",
        description=(
            "`pyxis`: srun's `--container-image`, `--container-mounts`, `--container-workdir`; `apptainer`: "
            "`apptainer exec --bind ...` (with `--nv` when there are GPUs) in front of each task."
        ),
    )
    container_mounts: list[str] = Field(
        default=[],
        description=(
            "Folders mounted into the container besides the job's working directory, each `SRC` or `SRC:DST` "
            "(data shards, tokenizers, caches outside it)."
        ),
    )
    python: str | None = Field(
        default=None,
        description=(
            "The Python that runs memtrain on the compute nodes. null = the one running `memtrain submit` (a "
            "shared environment), or `python` inside a container."
        ),
    )
    extra_sbatch: list[str] = Field(
        default=[],
        description=(
            "Further `#SBATCH` options, one per item, e.g. `--qos=high`: each an option starting with `-`, with an "
            "optional `=value`, and no spaces, quotes or control characters."
        ),
    )

    @field_validator("partition", "account", mode="before")
    @classmethod
    def _name_as_text(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads `account: 12345` as a number
        return value

    @field_validator("partition")
    @classmethod
    def _partition(cls, value):
        if value is not None and not _SLURM_NAMES.match(value):
            raise ValueError(
                "expected a Slurm partition name (letters, digits, '.', '_', '-'; several separated by commas)"
            )
        return value

    @field_validator("account")
    @classmethod
    def _account(cls, value):
        if value is not None and not _SLURM_NAME.match(value):
            raise ValueError("expected a Slurm account name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(
                "write the time limit as a quoted string, e.g. '10:00:00' (YAML reads 10:00:00 "
                "unquoted as a number of seconds)"
            )
        if isinstance(value, str) and not _SLURM_TIME.match(value):
            raise ValueError(f"{value!r} is not a Slurm time limit (e.g. 01:00:00 or 2-00:00:00)")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, value):
        for item in value:
            if not _SBATCH_OPTION.match(item):
                raise ValueError(
                    f"{item!r} is not one sbatch option (e.g. --qos=high: starts with '-', an "
                    "optional =value, no spaces, quotes or control characters)"
                )
        return value

    @field_validator("setup")
    @classmethod
    def _setup(cls, value):
        for i, line in enumerate(value):
            if _CONTROL_CHARS.search(line) or not line.strip():
                raise ValueError(f"item {i}: expected one non-empty line of shell (no newline or control character)")
        return value

    @field_validator("container", "python")
    @classmethod
    def _path_like(cls, value):
        if value is not None and not _CONTAINER_IMAGE.match(value):
            raise ValueError("expected an image name or path (letters, digits and . _ - / : @ # + ~, no spaces)")
        return value

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, value):
        for item in value:
            if not _MOUNT.match(item):
                raise ValueError(
                    f"{item!r}: expected SRC, SRC:DST or SRC:DST:ro with absolute paths (letters, digits and "
                    ". _ - / + ~, no spaces or commas)"
                )
        return value

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


class Config(_Strict):
    run: RunConfig = Field(default=RunConfig(), description="Name, run directory and seed.")
    model: ModelConfig = Field(
        default=ModelConfig(),
        description=(
            "What to build: a memory model, an autoencoder or a causal LM from mixer or transformer stacks, or a "
            "memory model with a pretrained Hugging Face LLM as its decoder."
        ),
    )
    objective: ObjectiveConfig = Field(
        default=ObjectiveConfig(),
        description=(
            "The weights of the causal / copy / blank-copy / reconstruction losses and the special tokens of the "
            "copy tasks."
        ),
    )
    curriculum: list[StageConfig] = Field(
        default=[],
        description=(
            "Optional list of stages run back to back, each with its own steps, objective weights and frozen module "
            "groups; their `steps` must add up to `train.steps`. Empty: the run is one stage with "
            "`objective.weights`."
        ),
    )
    data: DataConfig = Field(
        default=DataConfig(), description=("Where the token rows come from and how many each rank loads.")
    )
    optim: OptimConfig = Field(
        default=OptimConfig(), description="The optimizer, learning-rate schedule, clipping and gradient accumulation."
    )
    train: TrainConfig = Field(
        default=TrainConfig(),
        description=("Length, precision, device, and the evaluation / logging / checkpoint cadence."),
    )
    dist: DistConfig = Field(
        default=DistConfig(),
        description=("One process or `torchrun` DDP, or DeepSpeed ZeRO 0–3 / pipeline; and the micro-batch size."),
    )
    slurm: SlurmConfig = Field(
        default=SlurmConfig(), description=("Slurm jobs (`docs/slurm.md`); `memtrain train` ignores this section.")
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.curriculum:
            total = sum(s.steps for s in self.curriculum)
            if total != self.train.steps:
                raise ValueError(
                    f"curriculum stages add up to {total} steps but train.steps is {self.train.steps}; make them equal"
                )
            for s in self.curriculum:
                _check_objectives_fit(self.model.kind, s.weights, where=f"curriculum stage {s.name!r}")
        else:
            _check_objectives_fit(self.model.kind, self.objective.weights, where="objective.weights")
        _check_dist(self)
        _check_tied_autoencoder(self)
        return self

    def stages(self) -> list[StageConfig]:
        """The curriculum, or one stage covering the whole run with ``objective.weights``."""
        if self.curriculum:
            return list(self.curriculum)
        return [StageConfig(name="main", steps=self.train.steps, weights=self.objective.weights)]


def pipeline_units(model: ModelConfig) -> int:
    """How many pipeline layers of this model train (memtrain.engine.pipeline builds one layer per block plus
    an embedding, a memory assembly or injection, and a head layer; a frozen layer shares the stage of the
    next one that trains), i.e. the most pipeline stages the model can fill: the kind's rule in
    :data:`memtrain.kinds.KINDS`."""
    return KINDS[model.kind].pipeline_units(model)


def _check_dist(cfg: Config) -> None:
    """Cross-section rules of ``dist`` (it needs the model and the batch size)."""
    d = cfg.dist
    mbs = d.micro_batch_size
    if mbs is not None and cfg.data.batch_size % mbs:
        raise ValueError(
            f"dist.micro_batch_size {mbs} does not divide data.batch_size {cfg.data.batch_size}; "
            "every loaded batch must split into whole micro-batches"
        )
    if d.pipeline_stages > 1:
        if cfg.model.hf_decoder is not None:
            raise ValueError(
                "model.hf_decoder: a Hugging Face decoder is not split into pipeline stages; use "
                "dist.pipeline_stages: 1 (with ZeRO to spread its memory)"
            )
        if cfg.model.tie_embeddings:
            raise ValueError(
                "model.tie_embeddings ties weights that a pipeline places on different stages; set "
                "tie_embeddings: false or dist.pipeline_stages: 1"
            )
        if cfg.data.memories:
            raise ValueError(
                "data.memories: precomputed memories do not travel through pipeline stages; use "
                "dist.pipeline_stages: 1 (with ZeRO to spread the memory)"
            )
        units = pipeline_units(cfg.model)
        if d.pipeline_stages > units:
            raise ValueError(
                f"dist.pipeline_stages {d.pipeline_stages} is more than the {units} pipeline layers "
                "of this model that train; every stage needs one, so use fewer stages"
            )


def _check_tied_autoencoder(cfg: Config) -> None:
    """An autoencoder's tied LM head *is* its encoder's token embedding: freezing one side freezes the other."""
    m = cfg.model
    if m.kind != "autoencoder" or not m.tie_embeddings:
        return
    if m.frozen_encoder is not None:
        raise ValueError(
            "model.tie_embeddings: an autoencoder's tied LM head is its encoder's token embedding, so "
            "model.frozen_encoder would freeze the head too; set tie_embeddings: false"
        )
    for s in cfg.curriculum:
        encoder, head = "encoder" in s.freeze, "head" in s.freeze
        if encoder != head:
            frozen, other = ("encoder", "head") if encoder else ("head", "encoder")
            raise ValueError(
                f"model.tie_embeddings: curriculum stage {s.name!r} freezes the {frozen} but not the "
                f"{other}, and an autoencoder's tied LM head is its encoder's token embedding, so both "
                "would freeze; set tie_embeddings: false or freeze both"
            )


def _check_objectives_fit(kind: str, weights: ObjectiveWeights, where: str) -> None:
    spec = KINDS[kind]
    foreign = sorted(set(weights.active()) - set(spec.objectives))
    if foreign:
        owners = " / ".join(k.title for k in KINDS.values() if foreign[0] in k.objectives)
        article = "an" if spec.title[0] in "aeiou" else "a"
        raise ValueError(
            f"{where}: {foreign[0]} is the {owners}'s objective; {article} {spec.title} trains only "
            f"{', '.join(spec.objectives)}"
        )


# ----------------------------------------------------------------------------------------------------
# Loading


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the model that holds the field at ``loc`` (for suggestions)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending field, what was expected, and a suggestion for typos."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        valid = _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"{source}: unknown config key '{dotted}'{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{source}: {dotted}: {msg}{got_s}"


def _is_text_field(path: list[str]) -> bool:
    """The field at ``path`` holds text (``str`` or ``Optional[str]``), so an override's value is taken as
    written: ``--set slurm.time=10:00:00`` or ``slurm.account=12345`` are not YAML numbers."""
    model: Any = Config
    ann: Any = None
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        ann = field.annotation
        model = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
    args = set(getattr(ann, "__args__", ())) - {type(None)}
    return ann is str or (bool(args) and args <= {str})


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value): the value alone parsed as YAML (``3e-4``, ``true``, ``[1, 2]``,
    ``null``), except for text fields, which take it as written."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_text_field(path):
        value = raw.strip()
    return path, value


def set_path(raw: dict, path: list[str], value: Any, what: str = "") -> dict:
    """Set ``value`` (a Python value, never re-read as YAML) at the dotted ``path`` of a config dict."""
    node = raw
    for p in path[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{what or '.'.join(path)}: '{p}' is not a section")
        node = nxt
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list) -> dict:
    """Apply overrides in order: ``"a.b=value"`` texts (``--set``, see :func:`parse_override`) or
    ``("a.b", value)`` pairs, whose value is set as it is."""
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
            path = [p for p in str(key).split(".") if p]
            set_path(raw, path, value, what=str(key))
        else:
            path, value = parse_override(item)
            set_path(raw, path, value, what=f"--set {item!r}")
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors for a missing, malformed or non-mapping file.

    A name with no file behind it is looked up among the shipped configs (``tiny``, ``paper/repro``, ...).
    """
    from memtrain.shipped import resolve_config

    p = resolve_config(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found (shipped configs by name: memtrain configs list)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{p}: malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data


def config_from_dict(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read ``path``, apply ``--set`` overrides, validate. Raises :class:`UserError` with one line."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return config_from_dict(raw, source=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
