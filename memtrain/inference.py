"""Memory inference: documents -> memory files -> text continued from memories plus a prompt.

    reader = MemoryReader.from_checkpoint("runs/hf-llama")          # a run, a checkpoint or an export-decoder dir
    reader = MemoryReader.from_pretrained("exports/hf-llama")       # or a `memtrain export` folder / Hub repo id
    docs = reader.encode(["long text ..."], ids=["doc-1"])          # [DocumentMemories]: memories [n, e] + spans
    save_memories("mem.safetensors", docs, reader.memory_metadata())
    out = reader.generate(docs[0], "The prompt", max_new_tokens=32)  # greedy; or greedy=False, temperature, top_p, seed
    report = reader.compare(docs[0], "The prompt")                   # memories vs the full text, timed in this run

How the decoder reads memories: the memories of a document's last ``C - 1`` chunks (the most a memory model
was trained to read) go into the decoder's prefix slots, and the prompt's tokens follow, exactly as a chunk's
tokens follow its memories in training.

- **HF decoders** (``model.hf_decoder``): the LLM reads ``[BOS, m_0..m_{k-1}, prompt]`` as ``inputs_embeds``
  of transformers' ``generate`` (KV cache; ``use_cache=False`` recomputes every step instead; both give the
  same greedy tokens), so its options apply: sampling, top-k, repetition penalty, beam search, stop strings.
  The comparison feeds ``[BOS, the chunks' text as tokens, prompt]`` through the same ``generate``.
- **memtrain's own decoders** (mixer or transformer :class:`~memtrain.models.memory.MemoryModel`): generation
  *recomputes* the decoder over its fixed ``C + L`` positions for every new token (no KV cache: a mixer mixes a
  fixed-length sequence, and memtrain's transformer blocks keep no cache). Prompt plus continuation fit in one
  chunk (L tokens). There is no full-text comparison: these decoders read at most L tokens.

Memory files are safetensors: tensor ``memories`` [N, e] (float32, every document's chunks in order) and
``offsets`` [D + 1] (document d owns rows offsets[d]:offsets[d+1]), with string metadata: ``format``,
``encoder_sha256`` (of the encoder's weights), ``tokenizer_sha256``, ``decoder_tokenizer_sha256``, ``chunk_len``,
``decoder_chunk_len``, ``n_chunks``, ``memory_width``, ``checkpoint`` and ``docs`` (JSON: id, character spans of
the chunks and, unless left out, the text).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memtrain.errors import UserError
from memtrain.fileio import write_json

MEMORY_FORMAT = "memtrain-memories/1"
#: meta.json key of an export-decoder directory's memory part
EXPORT_KEY = "hf_decoder_export"


@dataclass
class DocumentMemories:
    """One document's memories [n, e] (float32, CPU), the character spans of its n chunks, and its text."""

    doc_id: str
    memories: torch.Tensor
    spans: list[tuple[int, int]]
    text: str | None = None

    def span_text(self, first: int = 0, last: int | None = None) -> str:
        """The text of chunks ``first .. last-1`` (needs the text)."""
        if self.text is None:
            raise UserError(
                f"document {self.doc_id!r}: its text was not stored with the memories (encoded with "
                "--no-text), so the full-text comparison cannot run"
            )
        spans = self.spans[first:last]
        return self.text[spans[0][0] : spans[-1][1]] if spans else ""


@dataclass
class Generation:
    """A continuation: its text and token ids, the positions the decoder read before generating (prefix slots +
    prompt tokens), the wall time of prefill + decoding, and how it decoded (``kv`` cache or ``recompute``)."""

    text: str
    token_ids: list[int]
    input_positions: int
    seconds: float
    cache: str
    memories_used: int = 0
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def read_run_checkpoint(path: str | Path):
    """(checkpoint directory, run config, meta) of a run, checkpoint or ``memtrain export-decoder`` directory."""
    from memtrain.engine.checkpoint import read_checkpoint

    p = Path(path)
    if (p / "memory" / "meta.json").is_file() and (p / "decoder" / "config.json").is_file():
        p = p / "memory"  # an export-decoder directory
    ck, cfg, meta = read_checkpoint(p)
    if meta.get(EXPORT_KEY):  # the LLM lives beside it, wherever the export was moved
        if cfg.model.hf_decoder is None:
            raise UserError(f"{ck}: an export whose config has no model.hf_decoder")
        cfg.model.hf_decoder.path = str((ck / meta[EXPORT_KEY]["decoder_dir"]).resolve())
    return ck, cfg, meta


def load_memory_model(ck: Path, cfg, meta: dict, device: torch.device, pretrained_llm: bool = False):
    """The trained model of a checkpoint (or export) in eval mode. The LLM of an HF-decoder checkpoint is built
    without reading its pretrained weights (the checkpoint holds them), except for an export, whose memory
    part holds only the encoder and projector and whose LLM is the exported directory."""
    from safetensors.torch import load_file

    from memtrain.engine import checkpoint as ckpt

    vocab = int(meta["vocab_size"])
    if cfg.model.hf_decoder is None:
        return ckpt.load_model(ck, device)[0]
    from memtrain.models.hf_memory import HFMemoryModel

    export = bool(meta.get(EXPORT_KEY))
    model = HFMemoryModel(cfg.model, vocab, pretrained=export or pretrained_llm)
    if not export:
        ckpt.load_model_weights(model, ck)
        return model.to(device).eval()
    state = load_file(str(ck / "model.safetensors"))
    own = {k for k in model.state_dict() if not k.startswith("llm.")}
    if set(state) != own:
        raise UserError(
            f"{ck / 'model.safetensors'}: not the encoder and projector of this export's config "
            f"(missing {sorted(own - set(state))[:3]}, unexpected {sorted(set(state) - own)[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def find_encoder_tokenizer(ck: Path, cfg, meta: dict, tokenizer: str | Path | None = None):
    """The checkpoint's memtrain tokenizer: ``tokenizer`` if given, else ``tokenizer.model`` beside the
    checkpoint (exports) or in its training shards; checked against the checkpoint's tokenizer hash."""
    from memtrain.data.tokenizer import TOKENIZER_FILE, Tokenizer

    want = meta.get("tokenizer_sha256")
    candidates = [Path(tokenizer)] if tokenizer else [ck / TOKENIZER_FILE, Path(cfg.data.shards) / TOKENIZER_FILE]
    for cand in candidates:
        if tokenizer or cand.is_file():
            tok = Tokenizer.load(cand)
            if want and tok.sha256 != want:
                raise UserError(
                    f"{tok.path}: tokenizer sha256 {tok.sha256[:12]}… but {ck} was trained with "
                    f"{want[:12]}…; pass the tokenizer it was trained with (--tokenizer)"
                )
            return tok
    raise UserError(f"{ck}: no tokenizer.model beside it or in its shards ({cfg.data.shards}); pass --tokenizer PATH")


# ----------------------------------------------------------------------------------------------------
# Decoding


def pick_token(
    logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """The next token from logits [V]: argmax when ``greedy``; else a sample from softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus)."""
    if greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


#: transformers ``generate`` options of HF decoders beyond greedy / temperature / top-p / seed, with their defaults
HF_OPTIONS: dict[str, Any] = {"top_k": None, "repetition_penalty": 1.0, "num_beams": 1, "stop": ()}


def _sampler(greedy: bool, temperature: float, top_p: float, seed: int, stop_at_eos: bool) -> dict[str, Any]:
    """The sampling settings every decoder takes, checked."""
    if not greedy and temperature <= 0:
        raise UserError(f"--temperature: expected > 0 for sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: expected a number in (0, 1], got {top_p}")
    return dict(greedy=greedy, temperature=temperature, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos)


def memory_file_hash(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, shapes, dtypes and bytes (identifies an encoder's weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class MemoryReader:
    """A trained memory model with its tokenizers, for encoding documents into memories and continuing text
    from memories plus a prompt. Build it with :meth:`from_checkpoint`."""

    def __init__(
        self,
        model,
        cfg,
        tokenizer,
        decoder_tokenizer: Any = None,
        device: str | torch.device = "cpu",
        checkpoint: Path | None = None,
    ):
        self.model, self.cfg, self.tokenizer, self.decoder_tokenizer = model, cfg, tokenizer, decoder_tokenizer
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        self.is_hf = cfg.model.hf_decoder is not None
        if self.is_hf and decoder_tokenizer is None:
            raise ValueError("an HF-decoder memory model needs its decoder tokenizer")
        if getattr(model, "encoder", None) is None:
            raise UserError(
                f"{checkpoint}: this memory model has no encoder (model.no_memory), so it reads no memories"
            )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None
    ) -> MemoryReader:
        """Load a run directory (its newest checkpoint), a checkpoint, a ``memtrain export-decoder`` directory or
        a ``memtrain export`` folder (:meth:`from_pretrained`); ``tokenizer``: the encoder's ``tokenizer.model``
        when it is not beside the checkpoint or in its shards. Raises :class:`UserError` for anything that is
        not a memory model with an encoder."""
        from memtrain.hub import is_export

        if is_export(Path(path)) and tokenizer is None:
            return cls.from_pretrained(path, device)
        ck, cfg, meta = read_run_checkpoint(path)
        if cfg.model.kind != "memory":
            raise UserError(f"{ck}: a {cfg.model.kind} model; memory inference needs a memory model")
        dev = torch.device(device)
        model = load_memory_model(ck, cfg, meta, dev)
        dec_tok = None
        if cfg.model.hf_decoder is not None:
            from memtrain.data.dual import load_decoder_tokenizer

            dec_tok = load_decoder_tokenizer(cfg.model.hf_decoder.path)
        return cls(model, cfg, find_encoder_tokenizer(ck, cfg, meta, tokenizer), dec_tok, dev, ck)

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, device: str | torch.device = "cpu", revision: str | None = None
    ) -> MemoryReader:
        """Load a ``memtrain export`` folder or a Hub repository id (:mod:`memtrain.hub`): no run directory
        needed. Raises :class:`UserError` for anything that is not a memory model's export."""
        from memtrain.hub import CONFIG_FILE, load_pretrained

        loaded = load_pretrained(path_or_repo, device, revision)
        if loaded.config.model.kind != "memory":
            raise UserError(
                f"{loaded.folder / CONFIG_FILE}: a {loaded.config.model.kind} model; memory inference needs a "
                "memory model"
            )
        return cls(loaded.model, loaded.config, loaded.tokenizer, loaded.decoder_tokenizer, device, loaded.folder)

    # -- encoding -----------------------------------------------------------------------------------------
    def chunks(self, text: str) -> list[tuple[int, int, list[int]]]:
        """A document's chunks as (start, end, encoder ids <= L): text spans that fit both tokenizers for an
        HF decoder (:class:`~memtrain.data.dual.TextSpanChunker`), else L-token pieces of the document's ids
        (EOS after the document, as in the shards)."""
        L = self.cfg.model.chunk_len
        if self.is_hf:
            from memtrain.data.dual import dual_chunker

            chunker = dual_chunker(self.tokenizer, self.decoder_tokenizer, L, self.cfg.model.decoder_chunk_len)
            return [(s.start, s.end, s.enc_ids) for s in chunker.spans(text)]
        from memtrain.data.dual import sentencepiece_token_ends

        ids = self.tokenizer.encode([text])[0] + [self.tokenizer.eos_id]
        ends = sentencepiece_token_ends(self.tokenizer)(text) + [len(text)]
        out, start = [], 0
        for i in range(0, len(ids), L):
            end = ends[min(i + L, len(ids)) - 1]
            out.append((start, end, ids[i : i + L]))
            start = end
        return out

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], ids: Sequence[str] | None = None, keep_text: bool = True, batch_size: int = 64
    ) -> list[DocumentMemories]:
        """Memories of each document: chunks (see :meth:`chunks`) -> encoder -> [n_chunks, e] float32."""
        ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        L, pad = self.cfg.model.chunk_len, self.tokenizer.pad_id
        out = []
        for doc_id, text in zip(ids, texts):
            chunks = self.chunks(text)
            rows = torch.full((len(chunks), L), pad, dtype=torch.long)
            for i, (_, _, enc) in enumerate(chunks):
                rows[i, : len(enc)] = torch.tensor(enc, dtype=torch.long)
            parts = [
                self.model._run_encoder(rows[i : i + batch_size].to(self.device)).float().cpu()
                for i in range(0, len(chunks), batch_size)
            ]
            memories = torch.cat(parts) if parts else torch.zeros(0, self.cfg.model.encoder.d_model)
            out.append(
                DocumentMemories(str(doc_id), memories, [(s, e) for s, e, _ in chunks], text if keep_text else None)
            )
        return out

    def encoder_sha256(self) -> str:
        """Hash of the encoder's weights (recorded in memory files, checked when they are read)."""
        return memory_file_hash(self.model.encoder.state_dict())

    def memory_metadata(self) -> dict[str, str]:
        """What a memory file records about the model that made it."""
        m = self.cfg.model
        meta = {
            "format": MEMORY_FORMAT,
            "encoder_sha256": self.encoder_sha256(),
            "tokenizer_sha256": self.tokenizer.sha256,
            "chunk_len": str(m.chunk_len),
            "decoder_chunk_len": str(m.decoder_chunk_len),
            "n_chunks": str(m.n_chunks),
            "memory_width": str(m.encoder.d_model),
            "checkpoint": str(self.checkpoint or ""),
        }
        if self.is_hf:
            from memtrain.data.dual import decoder_tokenizer_sha256

            meta["decoder_tokenizer_sha256"] = decoder_tokenizer_sha256(self.decoder_tokenizer)
        return meta

    def check_memory_file(self, meta: dict[str, str], where: str) -> None:
        """Raise :class:`UserError` when memories of a file cannot be read by this model: another width
        (the projector / decoder slots are built for this encoder's), or another encoder altogether."""
        width = int(meta.get("memory_width", -1))
        if width != self.cfg.model.encoder.d_model:
            raise UserError(
                f"{where}: memories of width {width}, but this model's projector was built for width "
                f"{self.cfg.model.encoder.d_model} (model.encoder.d_model); encode the documents with "
                f"{self.checkpoint}"
            )
        if meta.get("encoder_sha256") != self.encoder_sha256():
            raise UserError(
                f"{where}: made by encoder {str(meta.get('encoder_sha256'))[:12]}…, but "
                f"{self.checkpoint}'s encoder is {self.encoder_sha256()[:12]}…; encode the documents "
                "with this checkpoint"
            )

    # -- generation ---------------------------------------------------------------------------------------
    def _memories_of(self, memories) -> torch.Tensor:
        m = memories.memories if isinstance(memories, DocumentMemories) else memories
        if m.dim() != 2:
            raise ValueError(f"memories must be [n, e], got {list(m.shape)}")
        if m.shape[1] != self.cfg.model.encoder.d_model:
            from memtrain.models.hf_memory import MemoryWidthError

            raise MemoryWidthError(
                f"memories of width {m.shape[1]}, but this model's projector was built for width "
                f"{self.cfg.model.encoder.d_model} (model.encoder.d_model)"
            )
        return m[-(self.cfg.model.n_chunks - 1) :] if m.shape[0] else m  # the chunks nearest the prompt

    def prompt_ids(self, prompt: str) -> list[int]:
        """The decoder's token ids of ``prompt`` (no special tokens)."""
        if self.is_hf:
            return self.decoder_tokenizer.encode(prompt, add_special_tokens=False)
        return self.tokenizer.encode([prompt])[0]

    def _decode(self, ids: list[int]) -> str:
        if self.is_hf:
            return self.decoder_tokenizer.decode(ids)
        return self.tokenizer.decode(ids)

    def _eos(self) -> int:
        return self.decoder_tokenizer.eos_token_id if self.is_hf else self.tokenizer.eos_id

    @torch.no_grad()
    def generate(
        self,
        memories,
        prompt: str,
        max_new_tokens: int = 32,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        **options,
    ) -> Generation:
        """Continue ``prompt`` after the memories of a document (:class:`DocumentMemories` or [n, e]).

        Greedy by default; ``greedy=False`` samples with ``temperature`` and nucleus ``top_p``, seeded with
        ``seed`` (the same seed gives the same text). Stops after ``max_new_tokens`` or at EOS. An HF decoder
        generates through transformers' ``generate(inputs_embeds=...)`` with the memories as the prefix;
        ``use_cache=False`` recomputes every step instead of using its KV cache, and ``options``
        (:data:`HF_OPTIONS`: ``top_k``, ``repetition_penalty``, ``num_beams``, ``stop``) go to it as well.
        memtrain's own decoders recompute their fixed-length input for every token and take no ``options``.
        """
        sampler = _sampler(greedy, temperature, top_p, seed, stop_at_eos)
        m = self._memories_of(memories).to(self.device)
        ids = self.prompt_ids(prompt)
        if self.is_hf:
            prefix = self.model.prefix_embeddings(m[None] if m.shape[0] else None)
            out = self._hf_decode(prefix, ids, max_new_tokens, use_cache, **sampler, **options)
        else:
            unused = {k: v for k, v in options.items() if v not in (None, HF_OPTIONS.get(k))}
            if unused:
                raise UserError(
                    f"{', '.join(sorted(unused))}: options of transformers' generate, for HF decoders; memtrain's "
                    "own decoders take greedy, temperature, top-p and seed"
                )
            out = self._memtrain_decode(m, ids, max_new_tokens, **sampler)
        out.memories_used = int(m.shape[0])
        return out

    @torch.no_grad()
    def generate_from_text(
        self,
        context: str,
        prompt: str,
        max_new_tokens: int = 32,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        **options,
    ) -> Generation:
        """The baseline of an HF decoder: ``[BOS, context as tokens, prompt]`` through the same ``generate``."""
        if not self.is_hf:
            raise UserError(
                "feeding the full text needs an HF decoder; memtrain's own decoders read at most "
                f"{self.cfg.model.chunk_len} tokens per chunk"
            )
        sampler = _sampler(greedy, temperature, top_p, seed, stop_at_eos)
        prefix = self.model.prefix_embeddings(None)
        ids = self.decoder_tokenizer.encode(context, add_special_tokens=False) + self.prompt_ids(prompt)
        return self._hf_decode(prefix, ids, max_new_tokens, use_cache, **sampler, **options)

    def _hf_decode(
        self,
        prefix: torch.Tensor,
        ids: list[int],
        max_new_tokens: int,
        use_cache: bool,
        *,
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: int,
        stop_at_eos: bool,
        top_k: int | None = None,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        stop: Sequence[str] = (),
    ) -> Generation:
        """prefix [1, P, d] + prompt ids -> continuation, through the LLM's ``generate(inputs_embeds=...)``."""
        x = torch.cat(
            [
                prefix.to(self.device),
                self.model.token_embeddings(torch.tensor([ids], device=self.device, dtype=torch.long)).to(prefix.dtype),
            ],
            dim=1,
        )
        if x.shape[1] == 0:
            raise UserError("nothing to continue from: no memories, no BOS token and an empty prompt")
        if num_beams < 1 or (top_k is not None and top_k < 0) or repetition_penalty <= 0:
            raise UserError(
                f"--num-beams {num_beams}, --top-k {top_k}, --repetition-penalty {repetition_penalty}: expected "
                "num-beams >= 1, top-k >= 0 and a repetition penalty > 0"
            )
        eos = self._eos()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            use_cache=use_cache,
            eos_token_id=eos if stop_at_eos else None,
            pad_token_id=self.decoder_tokenizer.pad_token_id
            if self.decoder_tokenizer.pad_token_id is not None
            else eos,
        )
        if not greedy:  # no top-k unless asked (transformers' default would be 50)
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.decoder_tokenizer)
        mask = torch.ones(1, x.shape[1], dtype=torch.long, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.causal_lm().generate(inputs_embeds=x, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - t0
        new = [int(t) for t in out[0].tolist()]
        if stop_at_eos and eos in new:
            new = new[: new.index(eos)]
        return Generation(self._decode(new), new, int(x.shape[1]), seconds, "kv" if use_cache else "recompute")

    def _memtrain_decode(
        self,
        memories: torch.Tensor,
        ids: list[int],
        max_new_tokens: int,
        *,
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: int,
        stop_at_eos: bool,
    ) -> Generation:
        """Recompute the memory decoder for every token: the prompt and continuation sit in chunk k (k = the
        number of memories), which reads memories 0..k-1; at most L tokens fit in a chunk."""
        C, L = self.cfg.model.n_chunks, self.cfg.model.chunk_len
        k = int(memories.shape[0])
        if len(ids) >= L:
            raise UserError(f"--prompt: {len(ids)} tokens leave no room in a chunk of {L} (model.chunk_len)")
        slots = torch.zeros(1, C - 1, memories.shape[1], device=self.device)
        slots[0, :k] = memories
        row = torch.full((1, C * L), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        tokens = list(ids)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        t0 = time.perf_counter()
        new: list[int] = []
        while len(new) < max_new_tokens and len(tokens) < L:
            row[0, k * L : k * L + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)
            hidden = self.model(row, memories=slots)[0, k * L + len(tokens)]
            token = pick_token(self.model.logits(hidden).float().cpu(), greedy, temperature, top_p, gen)
            if stop_at_eos and token == self._eos():
                break
            tokens.append(token)
            new.append(token)
        seconds = time.perf_counter() - t0
        details = {"chunk_full": len(tokens) >= L and len(new) < max_new_tokens}
        return Generation(self._decode(new), new, (C - 1) + len(ids), seconds, "recompute", details=details)

    def compare(
        self, doc: DocumentMemories, prompt: str, max_new_tokens: int = 32, repeats: int = 3, **sampling
    ) -> dict:
        """Generate from the memories and from the full text they stand for (HF decoders), each ``repeats``
        times after one warm-up run, in this process; returns the report (best time of each)."""

        def best(fn):
            fn()
            runs = [fn() for _ in range(max(1, repeats))]
            return min(runs, key=lambda g: g.seconds)

        mem = best(lambda: self.generate(doc, prompt, max_new_tokens, **sampling))
        n_used = mem.memories_used
        first = len(doc.spans) - n_used
        report = {
            "doc": doc.doc_id,
            "chunks": len(doc.spans),
            "memories_used": n_used,
            "chunks_used": [first, len(doc.spans) - 1] if n_used else [],
            "continuation": mem.text,
            "new_tokens": len(mem.token_ids),
            "cache": mem.cache,
            "positions_with_memories": mem.input_positions,
            "seconds_with_memories": mem.seconds,
            "prompt_tokens": len(self.prompt_ids(prompt)),
        }
        if not self.is_hf:
            report["full_text"] = "n/a: memtrain's own decoders read at most model.chunk_len tokens"
            return report
        context = doc.span_text(first) if n_used else ""
        full = best(lambda: self.generate_from_text(context, prompt, max_new_tokens, **sampling))
        text_tokens = len(self.decoder_tokenizer.encode(context, add_special_tokens=False))
        report.update(
            {
                "text_tokens_replaced": text_tokens,
                "positions_with_full_text": full.input_positions,
                "prompt_tokens_saved": full.input_positions - mem.input_positions,
                "seconds_with_full_text": full.seconds,
                "seconds_saved": full.seconds - mem.seconds,
                "speedup": full.seconds / mem.seconds if mem.seconds > 0 else float("nan"),
                "full_text_continuation": full.text,
                "same_continuation": full.token_ids == mem.token_ids,
            }
        )
        return report


# ----------------------------------------------------------------------------------------------------
# Memory files


def save_memories(path: str | Path, docs: Sequence[DocumentMemories], meta: dict[str, str]) -> Path:
    """Write documents' memories and ``meta`` (from :meth:`MemoryReader.memory_metadata`) to a safetensors
    file (atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    counts = [d.memories.shape[0] for d in docs]
    width = int(meta["memory_width"])
    tensors = {
        "memories": torch.cat([d.memories.float() for d in docs]) if docs else torch.zeros(0, width),
        "offsets": torch.tensor([0] + counts, dtype=torch.long).cumsum(0),
    }
    docs_meta = [
        {"id": d.doc_id, "spans": [list(s) for s in d.spans], **({"text": d.text} if d.text is not None else {})}
        for d in docs
    ]
    tmp = p.with_name(f".{p.name}.tmp")
    save_file(tensors, str(tmp), metadata={**meta, "docs": json.dumps(docs_meta)})
    tmp.replace(p)
    return p


def load_memories(path: str | Path) -> tuple[list[DocumentMemories], dict[str, str]]:
    """(documents, metadata) of a memory file; :class:`UserError` for a missing or foreign file."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: memory file not found (make one with `memtrain encode`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != MEMORY_FORMAT:
                raise UserError(
                    f"{p}: not a memtrain memory file (format {meta.get('format')!r}); make one with `memtrain encode`"
                )
            memories, offsets = f.get_tensor("memories"), f.get_tensor("offsets")
    except SafetensorError as exc:
        raise UserError(f"{p}: not a readable safetensors file ({exc})") from None
    entries = json.loads(meta.pop("docs", "[]"))
    docs = [
        DocumentMemories(e["id"], memories[offsets[i] : offsets[i + 1]], [tuple(s) for s in e["spans"]], e.get("text"))
        for i, e in enumerate(entries)
    ]
    return docs, meta


def find_document(docs: Sequence[DocumentMemories], doc_id: str | None, where: str) -> DocumentMemories:
    """The document ``doc_id`` (or the only one when None)."""
    if doc_id is None:
        if len(docs) == 1:
            return docs[0]
        raise UserError(
            f"{where}: holds {len(docs)} documents; choose one with --doc "
            f"({', '.join(d.doc_id for d in docs[:5])}{', …' if len(docs) > 5 else ''})"
        )
    for d in docs:
        if d.doc_id == doc_id:
            return d
    raise UserError(
        f"{where}: no document {doc_id!r} (it holds {', '.join(d.doc_id for d in docs[:5])}"
        f"{', …' if len(docs) > 5 else ''})"
    )


# ----------------------------------------------------------------------------------------------------
# Command line: memtrain encode | generate | export-decoder | capability


def _cmd_encode(args) -> int:
    from memtrain.data.documents import iter_documents

    reader = MemoryReader.from_checkpoint(args.checkpoint, args.device, args.tokenizer)
    docs_in = list(iter_documents(args.input))
    if not docs_in:
        raise UserError(f"{', '.join(args.input)}: no documents found")
    t0 = time.perf_counter()
    docs = reader.encode([t for _, t in docs_in], [i for i, _ in docs_in], keep_text=not args.no_text)
    seconds = time.perf_counter() - t0
    path = save_memories(args.out, docs, reader.memory_metadata())
    n = sum(d.memories.shape[0] for d in docs)
    print(
        f"{path}: {len(docs)} document(s), {n} memories of width {reader.cfg.model.encoder.d_model} "
        f"({reader.cfg.model.chunk_len}-token chunks) in {seconds:.2f} s"
    )
    return 0


def _cmd_generate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    reader = MemoryReader.from_checkpoint(args.checkpoint, args.device, args.tokenizer)
    docs, meta = load_memories(args.memories)
    reader.check_memory_file(meta, str(args.memories))
    doc = find_document(docs, args.doc, str(args.memories))
    if args.greedy and args.temperature is not None:
        raise UserError("--greedy and --temperature: choose greedy decoding or sampling, not both")
    sampling = {
        "greedy": args.temperature is None,
        "temperature": args.temperature or 1.0,
        "top_p": args.top_p,
        "seed": args.seed,
        "use_cache": not args.no_cache,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "num_beams": args.num_beams,
        "stop": tuple(args.stop or ()),
    }
    report = reader.compare(doc, args.prompt, args.max_new_tokens, repeats=args.repeats, **sampling)
    print(f"continuation: {report['continuation']!r}")
    used = report["memories_used"]
    where = f"chunks {report['chunks_used'][0]}-{report['chunks_used'][1]} of {report['chunks']}" if used else "none"
    mode = (
        "greedy"
        if sampling["greedy"]
        else f"sampled (T={sampling['temperature']}, top-p {args.top_p}, seed {args.seed})"
    )
    mode += f", {args.num_beams} beams" if args.num_beams > 1 else ""
    mode += f", repetition penalty {args.repetition_penalty}" if args.repetition_penalty != 1.0 else ""
    if "text_tokens_replaced" in report:
        print(
            f"memories: {used} ({where}) stand for {report['text_tokens_replaced']} text tokens: the decoder read "
            f"{report['positions_with_memories']} positions instead of {report['positions_with_full_text']} "
            f"({report['prompt_tokens_saved']} prompt tokens replaced by memories)"
        )
        print(
            f"latency ({mode}, {report['new_tokens']} new tokens, {report['cache']} cache, best of {args.repeats}, "
            f"{reader.device}): memories {report['seconds_with_memories'] * 1e3:.1f} ms, full text "
            f"{report['seconds_with_full_text'] * 1e3:.1f} ms: {report['seconds_saved'] * 1e3:.1f} ms saved "
            f"({report['speedup']:.2f}x); same continuation: {'yes' if report['same_continuation'] else 'no'}"
        )
    else:
        print(
            f"memories: {used} ({where}); the decoder read {report['positions_with_memories']} positions "
            f"(memory slots + prompt)"
        )
        print(
            f"latency ({mode}, {report['new_tokens']} new tokens, recomputed per token, best of {args.repeats}): "
            f"{report['seconds_with_memories'] * 1e3:.1f} ms; full text: {report['full_text']}"
        )
    if args.json:
        write_json(args.json, report)
    return 0


def register(subparsers) -> None:
    """Add ``encode`` and ``generate`` to the ``memtrain`` subcommands."""
    e = subparsers.add_parser("encode", help="turn documents into a memory file (safetensors + metadata)")
    e.add_argument("checkpoint", help="run, checkpoint or export-decoder directory of a memory model")
    e.add_argument("--input", nargs="+", required=True, metavar="SRC", help="jsonl / txt / parquet documents")
    e.add_argument("--out", required=True, metavar="FILE", help="memory file to write, e.g. mem.safetensors")
    e.add_argument("--tokenizer", metavar="PATH", help="the encoder's tokenizer.model (default: found with the run)")
    e.add_argument("--no-text", action="store_true", help="do not store the documents' text (no full-text comparison)")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_cmd_encode)

    g = subparsers.add_parser("generate", help="continue a prompt from a document's memories; report the saving")
    g.add_argument("checkpoint", help="run, checkpoint or export-decoder directory of a memory model")
    g.add_argument("--memories", required=True, metavar="FILE", help="memory file from `memtrain encode`")
    g.add_argument("--doc", metavar="ID", help="document id in the memory file (default: its only document)")
    g.add_argument("--prompt", default="", help="text that follows the document")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (the default without --temperature)")
    g.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--no-cache", action="store_true", help="recompute the decoder every step (no KV cache)")
    g.add_argument("--top-k", type=int, default=None, help="HF decoders: sample from the k most likely tokens only")
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="HF decoders: transformers' repetition penalty"
    )
    g.add_argument("--num-beams", type=int, default=1, help="HF decoders: beam search with this many beams")
    g.add_argument("--stop", action="append", metavar="TEXT", help="HF decoders: stop after this text (repeatable)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs of each path after a warm-up (default 3)")
    g.add_argument("--tokenizer", metavar="PATH", help="the encoder's tokenizer.model (default: found with the run)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    g.set_defaults(func=_cmd_generate)
