"""SentencePiece tokenizers: training on any corpus :mod:`memtrain.data.ingest` reads, and loading.

Every memtrain tokenizer has the same special ids, which the objectives and the shard format rely on:

====  =========  ==================================================
id    piece      use
====  =========  ==================================================
0     <pad>      padding; never a target
1     <unk>      unknown (rare: byte fallback covers every byte)
2     <s>        beginning of sequence (not inserted by the packer)
3     </s>       end of document; appended after every document
4     <sep>      copy delimiter
5     <blank>    blank-copy filler
====  =========  ==================================================

followed by the 256 byte-fallback pieces ``<0x00>..<0xFF>`` and the learned pieces. Normalisation is the
identity and whitespace is kept as is, so ``decode(encode(text)) == text`` for any text.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from memtrain.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID, BLANK_ID = 0, 1, 2, 3, 4, 5
SEP_PIECE, BLANK_PIECE = "<sep>", "<blank>"
MAX_SENTENCE_BYTES = 16384
#: default amount of text sampled from the corpus for training (bytes of UTF-8)
DEFAULT_SAMPLE_BYTES = 100_000_000


def _spm():
    import sentencepiece as spm

    return spm


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Training


def _sentences(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Lines of ``text`` for the trainer; lines over ``max_bytes`` UTF-8 bytes are cut at spaces."""
    for line in text.split("\n"):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            yield line
            continue
        # cut long lines into pieces of at most max_bytes bytes, preferring whitespace boundaries
        piece: list[str] = []
        size = 0
        for word in re.split(r"(?<=\s)", line):
            wb = len(word.encode("utf-8"))
            if wb > max_bytes:  # a single enormous "word": hard-cut by characters
                if piece:
                    yield "".join(piece)
                    piece, size = [], 0
                chunk = max_bytes // 4
                for k in range(0, len(word), chunk):
                    yield word[k : k + chunk]
                continue
            if size + wb > max_bytes and piece:
                yield "".join(piece)
                piece, size = [], 0
            piece.append(word)
            size += wb
        if piece:
            yield "".join(piece)


class _Sample:
    """Deterministic sample of documents, spread over the whole corpus, up to ``sample_bytes`` of text."""

    def __init__(self, sources: Sequence[str], sample_bytes: int, seed: int) -> None:
        from memtrain.data.documents import estimate_text_bytes, expand_sources

        self.files = expand_sources(sources)
        self.sources = list(sources)
        self.sample_bytes = int(sample_bytes)
        self.seed = seed
        total = estimate_text_bytes(self.files)
        #: fraction of documents taken (by a stable hash of the document id)
        self.rate = 1.0 if total <= sample_bytes else sample_bytes / total
        self.documents = 0
        self.bytes = 0
        self.sentences = 0

    def __iter__(self) -> Iterator[str]:
        from memtrain.data.documents import iter_documents, stable_fraction

        for doc_id, text in iter_documents(self.sources):
            if self.rate < 1.0 and stable_fraction(doc_id, self.seed, purpose=b"tokenizer") >= self.rate:
                continue
            self.documents += 1
            self.bytes += len(text.encode("utf-8"))
            for s in _sentences(text):
                self.sentences += 1
                yield s
            if self.bytes >= self.sample_bytes:
                return


def train_tokenizer(
    sources: Sequence[str],
    out_dir: str | Path,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    threads: int = 2,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Train a SentencePiece tokenizer on the documents of ``sources``; returns ``out_dir/tokenizer.model``.

    Args:
        sources: files, directories or globs of parquet / jsonl / txt (see :func:`ingest.iter_documents`).
        out_dir: directory to write ``tokenizer.model`` into (created if needed; the file is replaced
            atomically).
        vocab_size: total pieces, including the 6 special ids and the 256 byte-fallback pieces.
        model_type: ``"bpe"`` (fast) or ``"unigram"``.
        sample_bytes: at most this much UTF-8 text is fed to the trainer: documents are chosen by a stable
            hash of their id (spread over the whole corpus, the same for the same corpus), one sentence
            per non-empty line.
        threads: trainer threads.
        seed: changes which documents are sampled when the corpus exceeds ``sample_bytes``.
        verbose: show SentencePiece's own log.

    The output depends only on the corpus and these arguments (same bytes on every run).
    Raises :class:`UserError` for missing sources, an empty corpus, or a vocabulary that does not fit the
    corpus.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type: expected 'bpe' or 'unigram', got {model_type!r}")
    min_vocab = 6 + 256 + 1
    if vocab_size < min_vocab:
        raise UserError(
            f"--vocab-size: {vocab_size} is too small; it must be at least {min_vocab} "
            "(6 special ids + 256 byte-fallback pieces + learned pieces), e.g. 4096 or 8000"
        )
    if vocab_size > 65536 * 4:
        raise UserError(f"--vocab-size: {vocab_size} is unreasonably large (max 262144)")
    sample = _Sample(sources, sample_bytes, seed)
    sentences = iter(sample)
    first = next(sentences, None)
    if first is None:
        raise UserError(
            f"{', '.join(map(str, sources))}: no documents found (empty corpus); nothing to train a tokenizer on"
        )

    def feed() -> Iterator[str]:
        yield first
        yield from sentences

    spm = _spm()
    model = io.BytesIO()
    kwargs: dict[str, Any] = dict(
        sentence_iterator=feed(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9995,
        max_sentence_length=MAX_SENTENCE_BYTES,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=[SEP_PIECE, BLANK_PIECE],
        num_threads=max(1, int(threads)),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=0 if verbose else 2,
    )
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as err:
        raise UserError(_explain_trainer_error(str(err), vocab_size, sample)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
    os.replace(tmp, path)
    if verbose:
        print(
            f"trained {model_type} vocab {vocab_size} on {sample.documents} documents "
            f"({sample.bytes / 1e6:.1f} MB, {sample.sentences} sentences) in {time.time() - t0:.1f} s"
        )
    return path


def _explain_trainer_error(msg: str, vocab_size: int, sample: _Sample) -> str:
    """Turn a SentencePiece trainer error into one line a person can act on."""
    where = f"tokenizer training on {sample.documents} documents ({sample.bytes / 1e6:.2f} MB)"
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (
            f"{where}: --vocab-size {vocab_size} is too large for this corpus; use at most {m.group(2)} "
            "or add more text"
        )
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (
            f"{where}: --vocab-size {vocab_size} cannot hold the corpus's {int(m.group(2)) - 262} "
            f"distinct characters plus 262 reserved pieces; use at least {int(m.group(2)) + 64}"
        )
    last = msg.strip().splitlines()[-1] if msg.strip() else msg
    return f"{where}: sentencepiece failed: {last}"


# ----------------------------------------------------------------------------------------------------
# Loading and use


class Tokenizer:
    """A trained memtrain SentencePiece tokenizer.

    ``encode`` returns plain token ids (no BOS/EOS added); ``decode`` inverts it exactly.
    """

    def __init__(self, processor, path: Path, sha256: str) -> None:
        self._sp = processor
        self.path = path
        self._sha256 = sha256

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load ``path`` (a ``.model`` file, or a directory holding ``tokenizer.model``).

        Raises :class:`UserError` if the file is missing, is not a SentencePiece model, or lacks
        memtrain's special pieces at their ids.
        """
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise UserError(f"{p}: tokenizer model not found; make one with `memtrain data tokenizer`")
        data = p.read_bytes()
        sp = _spm().SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception:  # sentencepiece raises RuntimeError/OSError depending on the damage
            raise UserError(f"{p}: not a SentencePiece model file") from None
        expect = {PAD_ID: "pad", UNK_ID: "unk", BOS_ID: "bos", EOS_ID: "eos"}
        got = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
        for want_id, name in expect.items():
            if got[name] != want_id:
                raise UserError(
                    f"{p}: not a memtrain tokenizer: its {name} id is {got[name]}, expected {want_id}; "
                    "make one with `memtrain data tokenizer`"
                )
        for want_id, piece in ((SEP_ID, SEP_PIECE), (BLANK_ID, BLANK_PIECE)):
            if sp.GetPieceSize() <= want_id or sp.IdToPiece(want_id) != piece:
                raise UserError(
                    f"{p}: not a memtrain tokenizer: id {want_id} is not {piece}; "
                    "make one with `memtrain data tokenizer`"
                )
        return cls(sp, p, hashlib.sha256(data).hexdigest())

    @property
    def processor(self):
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the ``.model`` file's bytes (identifies the tokenizer in shards and checkpoints)."""
        return self._sha256

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in ``[0, vocab_size)``."""
        return int(self._sp.GetPieceSize())

    pad_id = property(lambda self: PAD_ID, doc="Padding id (0).")
    unk_id = property(lambda self: UNK_ID, doc="Unknown-piece id (1).")
    bos_id = property(lambda self: BOS_ID, doc="Beginning-of-sequence id (2).")
    eos_id = property(lambda self: EOS_ID, doc="End-of-document id (3), appended after every document.")
    sep_id = property(lambda self: SEP_ID, doc="Copy delimiter ``<sep>`` id (4).")
    blank_id = property(lambda self: BLANK_ID, doc="Blank-copy filler ``<blank>`` id (5).")

    @property
    def special_ids(self) -> dict[str, int]:
        """``{"pad", "unk", "bos", "eos", "sep", "blank"}`` -> id."""
        return {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "sep": SEP_ID, "blank": BLANK_ID}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text: ``list[str]`` -> ``list[list[int]]`` (no BOS/EOS added)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings; wrap a single text in a list")
        return self._sp.Encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of one id sequence (a list, array or 1-D tensor of ints)."""
        tolist = getattr(ids, "tolist", None)
        if tolist is not None:
            ids = tolist()
        return self._sp.Decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i``."""
        return self._sp.IdToPiece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"
