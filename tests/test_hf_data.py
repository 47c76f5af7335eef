"""Dual token streams: the text-span chunker, dual rows, dual shards, and the objectives on dual rows."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import L_DEC, C, L, corpus, dual_shards, encoder_tokenizer, first_rows, shm_retry, tiny_llm

from memtrain.cli import main
from memtrain.data.documents import is_val_document
from memtrain.data.dual import PAD_SLOT, TOKEN_OFFSET, DualLayout, TextSpanChunker, dual_chunker, load_decoder_tokenizer
from memtrain.data.loader import read_shard_info
from memtrain.data.tokenizer import Tokenizer
from memtrain.errors import UserError
from memtrain.objectives import SpecialTokens, make_task


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return Tokenizer.load(encoder_tokenizer(tmp_path_factory)), load_decoder_tokenizer(tiny_llm(tmp_path_factory))


def _check_spans(text, spans, enc, dec, enc_len, dec_len):
    assert "".join(text[s.start : s.end] for s in spans) == text
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    for i, s in enumerate(spans):
        last = i == len(spans) - 1
        piece = text[s.start : s.end]
        assert s.enc_ids == enc.encode([piece])[0] + ([enc.eos_id] if last else [])
        assert s.dec_ids == dec.encode(piece, add_special_tokens=False) + ([dec.eos_token_id] if last else [])
        assert len(s.enc_ids) <= enc_len and len(s.dec_ids) <= dec_len


def test_spans_cover_the_text_and_fit_both_tokenizers(tmp_path_factory, tokenizers):
    enc, dec = tokenizers
    chunker = dual_chunker(enc, dec, L, L_DEC)
    texts = [r["text"] for r in corpus(tmp_path_factory)[1][:6]]
    texts.append("  leading space, a " + "x" * 200 + " very long word, and trailing space  ")
    for text in texts:
        spans = chunker.spans(text)
        _check_spans(text, spans, enc, dec, L, L_DEC)
        assert spans == chunker.spans(text)  # deterministic
        inner = [s for s in spans[:-1] if not text[s.start : s.end].strip().startswith("x")]
        assert all(
            s.end == len(text) or text[s.end].isspace() or not text[s.end - 1].isspace() for s in inner
        )  # cut before a word's leading whitespace, i.e. on word boundaries
    # most chunk positions are used: the guess from the document's token offsets is close
    spans = chunker.spans(texts[0])
    assert sum(len(s.enc_ids) for s in spans) / (len(spans) * L) > 0.6


def test_binary_search_without_offsets_gives_valid_spans(tmp_path_factory, tokenizers):
    enc, dec = tokenizers
    plain = TextSpanChunker(
        enc.processor.EncodeAsIds,
        lambda t: dec.encode(t, add_special_tokens=False),
        L,
        L_DEC,
        enc.eos_id,
        dec.eos_token_id,
    )
    text = corpus(tmp_path_factory)[1][1]["text"]
    _check_spans(text, plain.spans(text), enc, dec, L, L_DEC)
    with pytest.raises(UserError, match="use longer chunks"):
        TextSpanChunker(lambda t: [1] * 3 * len(t), lambda t: [1] * len(t), 2, 2, 0, 0).spans("abc")


def test_dual_rows_pack_split_and_decode():
    lay = DualLayout(n_chunks=2, enc_len=3, dec_len=2)
    enc = torch.tensor([[[7, 8, 0], [9, 0, 0]]])
    dec = torch.tensor([[[0, 5], [6, 3]]])
    mask = torch.tensor([[[1, 1], [1, 0]]])
    rows = lay.pack(enc, dec, mask)
    assert rows.tolist() == [[7, 8, 0, -TOKEN_OFFSET, -TOKEN_OFFSET - 5, 9, 0, 0, -TOKEN_OFFSET - 6, PAD_SLOT]]
    e, s = lay.split(rows)
    assert torch.equal(e, enc)
    ids, m = DualLayout.decoder_tokens(s)
    assert ids.tolist() == [[[0, 5], [6, 0]]] and m.tolist() == [[[True, True], [True, False]]]
    # tasks write raw ids (filler, greedy predictions) and -100 (unscored) into rows and targets
    s2 = torch.tensor([4, -TOKEN_OFFSET - 2, PAD_SLOT, -100])
    assert DualLayout.decoder_labels(s2).tolist() == [4, 2, -100, -100]
    with pytest.raises(ValueError, match="-100..-2"):
        DualLayout.decoder_tokens(torch.tensor([-5]))
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        lay.split(torch.zeros(1, 9, dtype=torch.long))


def test_dual_shards_hold_both_streams_of_the_same_spans(tmp_path_factory, tokenizers):
    enc, dec = tokenizers
    shards = dual_shards(tmp_path_factory)
    info = read_shard_info(shards)
    d = info.raw["dual"]
    assert info.row_len == C * (L + L_DEC) and (d["n_chunks"], d["chunk_len"], d["decoder_chunk_len"]) == (C, L, L_DEC)
    assert d["decoder_vocab_size"] == len(dec) and (shards / d["decoder_tokenizer"] / "tokenizer.json").is_file()
    assert info.rows("train") > 20 and info.rows("val") > 0
    rows = first_rows(tmp_path_factory, n=3)  # the loader's first batch of 3 rows
    assert rows.shape == (3, info.row_len) and rows.dtype == torch.long
    lay = DualLayout(C, L, L_DEC)
    e, s = lay.split(rows)
    ids, mask = DualLayout.decoder_tokens(s)
    # the first row holds the first spans of the first training document, on both sides
    first = next(r for r in corpus(tmp_path_factory)[1] if not is_val_document(r["id"], info.raw["val_fraction"]))
    spans = dual_chunker(enc, dec, L, L_DEC).spans(first["text"])
    for c in range(C):
        n_enc, n_dec = len(spans[c].enc_ids), int(mask[0, c].sum())
        assert e[0, c, :n_enc].tolist() == spans[c].enc_ids and (e[0, c, n_enc:] == enc.pad_id).all()
        assert ids[0, c, :n_dec].tolist() == spans[c].dec_ids and not mask[0, c, n_dec:].any()


def test_copy_and_blank_copy_work_on_dual_rows(tmp_path_factory):
    rows = first_rows(tmp_path_factory)
    special = SpecialTokens(pad_id=0, delimiter_id=4, n_delimiters=1, filler_id=5)
    lay = DualLayout(C, L, L_DEC)
    inputs, targets = make_task("copy", rows, special, n_chunks=C)
    e_in, s_in = lay.split(inputs)
    _, s_tgt = lay.split(targets)
    e_src, s_src = lay.split(rows)
    h = C // 2
    assert torch.equal(s_in[:, h:], s_src[:, :h])  # the copied half's decoder stream repeats the source half
    assert (e_in[:, h, 0] == 4).all() and torch.equal(e_in[:, h, 1:], e_src[:, 0, 1:])  # delimiter: encoder only
    labels = DualLayout.decoder_labels(s_tgt)
    assert (labels[:, :h] == -100).all()
    assert torch.equal(labels[:, h:], DualLayout.decoder_labels(s_src[:, :h]))  # decoder tokens of the source
    blank, blank_targets = make_task("blank_copy", rows, special, n_chunks=C)
    _, s_blank = lay.split(blank)
    assert (s_blank[:, h:] == 5).all() and torch.equal(blank_targets, targets)


def test_shards_cli_and_bad_decoder_tokenizers(tmp_path, tmp_path_factory, capsys):
    src, enc = corpus(tmp_path_factory)[0], encoder_tokenizer(tmp_path_factory)
    llm = tiny_llm(tmp_path_factory)
    out = tmp_path / "cli-shards"
    args = [
        "data",
        "shards",
        "--input",
        str(src),
        "--tokenizer",
        str(enc),
        "--out",
        str(out),
        "--chunk-len",
        "16",
        "--chunks",
        "2",
        "--decoder-tokenizer",
        str(llm),
        "--decoder-chunk-len",
        "10",
        "--no-progress",
        "--val-fraction",
        "0.1",
    ]
    assert shm_retry(main, args) == 0
    printed = capsys.readouterr().out
    assert "dual rows: 2 chunks x (16 encoder + 10 decoder) positions" in printed and "filled: encoder" in printed
    assert json.loads((out / "memtrain_shards.json").read_text())["row_len"] == 2 * 26

    def error(extra_args, replace=None):
        a = list(args)
        a[a.index("--out") + 1] = str(tmp_path / "not-written")
        if replace:
            a[a.index(replace[0]) + 1] = replace[1]
        assert main(a + extra_args) == 2
        return capsys.readouterr().err.strip()

    assert "give --chunk-len L and --chunks C" in error(["--row-len", "32"])
    assert "decoder tokenizer directory not found" in error([], ("--decoder-tokenizer", str(tmp_path / "nope")))
    (tmp_path / "junk").mkdir()
    assert "not a Hugging Face tokenizer directory" in error([], ("--decoder-tokenizer", str(tmp_path / "junk")))
    from memtrain.models.hf_tiny import train_tiny_tokenizer

    no_eos = train_tiny_tokenizer(["some text to train on"] * 10, "llama", vocab_size=280)
    no_eos.eos_token = None
    no_eos.save_pretrained(str(tmp_path / "no-eos"))
    msg = error([], ("--decoder-tokenizer", str(tmp_path / "no-eos")))
    assert "has no eos_token" in msg and "\n" not in msg
    assert not (tmp_path / "not-written").exists()
