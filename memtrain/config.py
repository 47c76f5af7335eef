"""Typed run configuration, read from YAML, with ``--set a.b=c`` overrides.

Validation is pydantic's (``extra="forbid"`` everywhere, so a misspelt key is an error); this module only
turns pydantic's errors into one readable line that names the field, says what was expected and, for an
unknown key, suggests the closest valid one.

A run config has these sections (every field documented below and in ``docs/config.md``):

``run``        name, output directory, seed
``model``      what to build (memory model, autoencoder or causal LM; mixer or transformer stacks)
``objective``  weights of the causal / copy / blank-copy / reconstruction losses and the special tokens
``curriculum`` optional list of stages, each with its own steps, objective weights and frozen modules
``data``       shard directories (local or remote), batch size, loader workers
``optim``      AdamW and the learning-rate schedule
``train``      steps, precision, evaluation / logging / checkpoint cadence, device
``dist``       the distributed engine
"""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memtrain.errors import UserError

OBJECTIVES = ("causal", "copy", "blank_copy", "reconstruction")
MODULE_GROUPS = ("encoder", "decoder", "embeddings", "head")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0


class StackConfig(_Strict):
    """One stack of blocks (an encoder, a decoder, or a causal LM's body)."""

    arch: Literal["mixer", "transformer"] = "mixer"
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(2, ge=1)
    #: mixer only: taps along the feature axis of the causal token mixing (reference kernel size)
    kernel: int = Field(1, ge=1, le=64)
    #: mixer: 0 = one shared L x L mixing matrix, h > 0 = h heads each with its own matrix;
    #: transformer: number of attention heads (>= 1)
    n_heads: int = Field(0, ge=0)
    ffn_mult: int = Field(4, ge=1)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "StackConfig":
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
    #: run or checkpoint directory whose encoder is loaded and frozen; null keeps the freshly initialised
    #: encoder and freezes it (the untrained control of a retention probe)
    checkpoint: Optional[str] = None


class HFLoraConfig(_Strict):
    """LoRA adapters (peft) on an HF decoder (``model.hf_decoder.mode: lora``)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    #: module names to adapt; "all-linear" = every Linear of the LLM's body (not its output head)
    target_modules: Union[str, list[str]] = "all-linear"


class HFDecoderConfig(_Strict):
    """A pretrained Hugging Face causal LM as the memory model's decoder (docs/llm_decoders.md): the encoder's
    memories are projected to the LLM's embedding width and read as prefix slots before each chunk's tokens."""

    #: local directory that transformers' AutoModelForCausalLM loads (config.json, weights, tokenizer)
    path: str
    #: full: every LLM weight trains; lora: only LoRA adapters train, the LLM's own weights stay as loaded;
    #: frozen: the LLM stays as loaded and only the projector (and a trainable encoder) train
    mode: Literal["full", "lora", "frozen"] = "full"
    lora: HFLoraConfig = HFLoraConfig()
    #: the LLM tokenizer's tokens per chunk (shards made with `memtrain data shards --decoder-tokenizer`);
    #: null = model.chunk_len
    chunk_len: Optional[int] = Field(None, ge=2)
    #: recompute the LLM's layer activations in the backward pass (transformers' gradient checkpointing)
    gradient_checkpointing: bool = False
    #: dtype the LLM's weights are loaded in
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class ModelConfig(_Strict):
    kind: Literal["memory", "autoencoder", "clm"] = "memory"
    #: vocabulary size; null takes it from the data's tokenizer
    vocab_size: Optional[int] = Field(None, ge=8)
    #: L: tokens per chunk (the autoencoder's and the memory encoder's context)
    chunk_len: int = Field(64, ge=2)
    #: C: chunks per row. Memory model: C chunks of L tokens; clm: context C*L; autoencoder: must be 1
    n_chunks: int = Field(4, ge=1)
    encoder: StackConfig = StackConfig()
    decoder: StackConfig = StackConfig()
    #: which encoder position is the memory: -1 last, -2 second to last (for causal-LM encoders)
    memory_position: int = Field(-1, le=-1)
    #: autoencoder: how the memory feeds the decoder positions
    injection: Literal["repeat", "unroll"] = "repeat"
    #: bottleneck factor: memory -> Linear(d, d/c) -> Linear(d/c, d); 1 = none
    compression: int = Field(1, ge=1)
    #: memory model control: every memory slot is a constant and the encoder never runs
    no_memory: bool = False
    frozen_encoder: Optional[FrozenEncoderConfig] = None
    #: a pretrained Hugging Face causal LM as the decoder (kind: memory); null = memtrain's own decoder stack
    hf_decoder: Optional[HFDecoderConfig] = None
    final_norm: bool = True
    tie_embeddings: bool = False
    #: implementation of the mixer layers: Triton kernels on CUDA (`auto`), or the pure-torch reference
    kernels: Literal["auto", "triton", "torch"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
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
        causal: float = Field(0.0, ge=0)
        copy: float = Field(0.0, ge=0)
        blank_copy: float = Field(0.0, ge=0)
        reconstruction: float = Field(0.0, ge=0)

        def active(self) -> dict[str, float]:
            """Objectives with a weight > 0, in a fixed order."""
            return {k: v for k, v in self.model_dump().items() if v > 0}


#: Effective weighting of the reference code's "combined" objective: per-chunk CE averaged over C chunks
#: for the causal pass plus the copy pass's loss summed over its 2 supervised chunks and divided by C = 4,
#: i.e. the copy loss weighted 1/2 against the causal loss (reference-implementation.md section 4.3).
PRESETS: dict[str, dict[str, float]] = {
    "reference_combined": {"causal": 1.0, "copy": 0.5},
    "reference_blank_combined": {"causal": 1.0, "blank_copy": 0.5},
}


class ObjectiveConfig(_Strict):
    weights: ObjectiveWeights = ObjectiveWeights(causal=1.0)
    #: named weighting that replaces ``weights`` (see PRESETS)
    preset: Optional[Literal["reference_combined", "reference_blank_combined"]] = None
    #: copy delimiter token id; null = the tokenizer's <sep>
    delimiter_id: Optional[int] = Field(None, ge=0)
    #: how many delimiter tokens open the copied half (they replace its first tokens and are not scored)
    n_delimiters: int = Field(1, ge=0)
    #: blank-copy filler token id; null = the tokenizer's <blank>
    filler_id: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ObjectiveConfig":
        if self.preset is not None:
            object.__setattr__(self, "weights", ObjectiveWeights(**PRESETS[self.preset]))
        if not self.weights.active():
            raise ValueError("at least one objective weight must be > 0")
        return self


class StageConfig(_Strict):
    name: str
    steps: int = Field(..., ge=1)
    weights: ObjectiveWeights
    #: module groups whose parameters do not train in this stage
    freeze: list[Literal["encoder", "decoder", "embeddings", "head"]] = []

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if not self.weights.active():
            raise ValueError(f"stage {self.name!r}: at least one objective weight must be > 0")
        return self


class DataConfig(_Strict):
    #: MDS shard directory made by `memtrain data shards` (its train/ and val/ splits), or a remote URL
    shards: str = "data/demo/shards"
    #: local cache directory when `shards` is remote
    cache_dir: Optional[str] = None
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    #: memory-shard directory made by `memtrain precompute` from these shards with the model's frozen encoder:
    #: training reads the stored memories with every batch and skips the encoder (docs/precompute.md)
    memories: Optional[str] = None


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1)


class TrainConfig(_Strict):
    steps: int = Field(1000, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(200, ge=0)
    eval_batches: int = Field(16, ge=1)
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(500, ge=0)
    keep_ckpts: int = Field(2, ge=1)
    compile: bool = False
    threads: Optional[int] = Field(None, ge=1)
    progress: bool = True


class DistConfig(_Strict):
    """The distributed engine (docs/distributed.md). Invalid combinations are refused here, before any
    process group starts."""

    #: plain: one process or torchrun DDP; deepspeed: DeepSpeed ZeRO / pipeline engine
    engine: Literal["plain", "deepspeed"] = "plain"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    #: DeepSpeed ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters partitioned
    zero_stage: int = Field(0, ge=0, le=3)
    #: ZeRO-Offload: keep the optimizer states (stage >= 1) / the parameters (stage 3) in CPU memory
    offload_optimizer: bool = False
    offload_param: bool = False
    #: DeepSpeed pipeline stages (1 = no pipeline); must divide the number of ranks
    pipeline_stages: int = Field(1, ge=1)
    #: parameters: balance trainable parameters per stage; uniform: the same number of pipeline layers
    pipeline_partition: Literal["parameters", "uniform"] = "parameters"
    #: recompute each block's activations in the backward pass instead of storing them
    activation_checkpointing: bool = False
    #: rows per micro-batch (one forward/backward; the pipeline's unit): every loaded batch of
    #: data.batch_size rows runs as data.batch_size / micro_batch_size micro-batches; null = data.batch_size
    micro_batch_size: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "DistConfig":
        if self.engine == "plain":
            for name, value, default in (("zero_stage", self.zero_stage, 0), ("pipeline_stages", self.pipeline_stages, 1),
                                         ("offload_optimizer", self.offload_optimizer, False),
                                         ("offload_param", self.offload_param, False)):
                if value != default:
                    raise ValueError(f"{name}: {value} needs engine: deepspeed (the plain engine is one process "
                                     "or torchrun DDP)")
        if self.pipeline_stages > 1 and self.zero_stage >= 2:
            raise ValueError(f"ZeRO-{self.zero_stage} partitions gradients, which DeepSpeed's pipeline cannot do; "
                             "use zero_stage 0 or 1 with pipeline_stages > 1")
        if self.pipeline_stages > 1 and (self.offload_optimizer or self.offload_param):
            raise ValueError("offload is not supported with pipeline_stages > 1; use ZeRO-2/3 without a pipeline")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3 (only ZeRO-3 partitions the parameters)")
        return self


class SlurmConfig(_Strict):
    """Resources and launch for `memtrain submit` / `memtrain sweep` (flags override these)."""

    nodes: int = Field(1, ge=1)
    #: GPUs per node (0 = CPU-only tasks; then `tasks_per_node` ranks per node)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int = Field(1, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    #: srun: one task per rank (signals reach every rank); torchrun: one torchrun per node (c10d
    #: rendezvous on the head node); deepspeed: the deepspeed launcher with a hostfile from the node list
    launcher: Literal["srun", "torchrun", "deepspeed"] = "srun"
    #: seconds before the time limit at which Slurm sends USR1: ranks checkpoint and the job requeues
    signal_seconds: int = Field(120, ge=0)
    requeue: bool = True
    extra_sbatch: list[str] = []

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


class Config(_Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    curriculum: list[StageConfig] = []
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.curriculum:
            total = sum(s.steps for s in self.curriculum)
            if total != self.train.steps:
                raise ValueError(
                    f"curriculum stages add up to {total} steps but train.steps is {self.train.steps}; "
                    "make them equal")
            for s in self.curriculum:
                _check_objectives_fit(self.model.kind, s.weights, where=f"curriculum stage {s.name!r}")
        else:
            _check_objectives_fit(self.model.kind, self.objective.weights, where="objective.weights")
        _check_dist(self)
        return self

    def stages(self) -> list[StageConfig]:
        """The curriculum, or one stage covering the whole run with ``objective.weights``."""
        if self.curriculum:
            return list(self.curriculum)
        return [StageConfig(name="main", steps=self.train.steps, weights=self.objective.weights)]


def pipeline_units(model: ModelConfig) -> int:
    """How many pipeline layers of this model train (memtrain.engine.pipeline builds one layer per block plus
    an embedding, a memory assembly or injection, and a head layer; a frozen layer shares the stage of the
    next one that trains), i.e. the most pipeline stages the model can fill."""
    n = model.decoder.n_layers + 1  # decoder blocks + head (final norm, lm_head)
    if model.kind == "clm":
        return n + 1  # + token embedding
    if model.kind == "memory":
        n += 1  # memory assembly (decoder embedding)
        if not model.no_memory and model.frozen_encoder is None:
            n += model.encoder.n_layers + 1  # encoder blocks + its embedding
        return n
    inject = model.encoder.d_model != model.decoder.d_model or model.injection == "unroll"  # trainable inject
    if model.frozen_encoder is None:
        inject = inject or model.final_norm or model.compression > 1
        n += model.encoder.n_layers + 1
    return n + int(inject)


def _check_dist(cfg: "Config") -> None:
    """Cross-section rules of ``dist`` (it needs the model and the batch size)."""
    d = cfg.dist
    mbs = d.micro_batch_size
    if mbs is not None and cfg.data.batch_size % mbs:
        raise ValueError(f"dist.micro_batch_size {mbs} does not divide data.batch_size {cfg.data.batch_size}; "
                         "every loaded batch must split into whole micro-batches")
    if d.pipeline_stages > 1:
        if cfg.model.hf_decoder is not None:
            raise ValueError("model.hf_decoder: a Hugging Face decoder is not split into pipeline stages; use "
                             "dist.pipeline_stages: 1 (with ZeRO to spread its memory)")
        if cfg.model.tie_embeddings:
            raise ValueError("model.tie_embeddings ties weights that a pipeline places on different stages; set "
                             "tie_embeddings: false or dist.pipeline_stages: 1")
        if cfg.data.memories:
            raise ValueError("data.memories: precomputed memories do not travel through pipeline stages; use "
                             "dist.pipeline_stages: 1 (with ZeRO to spread the memory)")
        units = pipeline_units(cfg.model)
        if d.pipeline_stages > units:
            raise ValueError(f"dist.pipeline_stages {d.pipeline_stages} is more than the {units} pipeline layers "
                             "of this model that train; every stage needs one, so use fewer stages")


def _check_objectives_fit(kind: str, weights: ObjectiveWeights, where: str) -> None:
    active = set(weights.active())
    if kind == "autoencoder" and active - {"reconstruction"}:
        raise ValueError(f"{where}: an autoencoder trains only the reconstruction objective, "
                         f"got {sorted(active)}")
    if kind != "autoencoder" and "reconstruction" in active:
        raise ValueError(f"{where}: reconstruction is the autoencoder's objective; a {kind} model "
                         "trains causal, copy and blank_copy")


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


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
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
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {text!r}: '{p}' is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors for a missing, malformed or non-mapping file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
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
